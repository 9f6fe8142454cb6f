// The forward dialog, one step at a time (without this script every step shows at once
// and the server checks the same things): Next checks the step's fields, the two
// email addresses must match, someone forwarded to before needs no new-individual
// details, and Finish stays disabled until the disclaimer box is ticked.
(function () {
  "use strict";
  var form = document.getElementById("forward-form");
  if (!form) { return; }
  var steps = Array.prototype.slice.call(form.querySelectorAll("fieldset.fwd-step"));
  var marks = Array.prototype.slice.call(document.querySelectorAll(".fwd-steps li"));
  var email = document.getElementById("email");
  var confirmEmail = document.getElementById("email_confirm");
  var individual = document.getElementById("new-individual");
  var knownNote = document.getElementById("known-note");
  var sms = document.getElementById("channel-sms");
  var mobile = document.getElementById("otp_mobile");
  var otpEmail = document.getElementById("otp_email");
  var agree = document.getElementById("agree");
  var finish = document.getElementById("finish");
  var days = document.getElementById("days");
  var until = document.getElementById("retention-until");
  var known = {};
  Array.prototype.forEach.call(document.querySelectorAll("#known-emails option"), function (o) {
    known[o.value.toLowerCase()] = true;
  });
  var current = Math.min(Math.max(parseInt(form.getAttribute("data-step"), 10) || 1, 1),
                         steps.length);

  function typed(input) { return input.value.trim().toLowerCase(); }

  function show(n) {
    current = n;
    steps.forEach(function (step, i) { step.hidden = i + 1 !== n; });
    marks.forEach(function (mark, i) {
      mark.classList.toggle("done", i + 1 < n);
      if (i + 1 === n) { mark.setAttribute("aria-current", "step"); }
      else { mark.removeAttribute("aria-current"); }
    });
    var first = steps[n - 1].querySelector("input:not([type=hidden]), select, textarea");
    if (first && document.activeElement && document.activeElement.tagName === "BUTTON") {
      first.focus();
    }
  }

  function sync() {
    var isKnown = Object.prototype.hasOwnProperty.call(known, typed(email));
    individual.hidden = isKnown;
    knownNote.hidden = !isKnown;
    Array.prototype.forEach.call(individual.querySelectorAll("[data-needed]"), function (f) {
      f.required = !isKnown;
    });
    mobile.required = !isKnown && sms.checked;
    otpEmail.required = !isKnown && !sms.checked;
    mobile.disabled = !sms.checked;
    otpEmail.disabled = sms.checked;
    confirmEmail.setCustomValidity(
      confirmEmail.value && typed(confirmEmail) !== typed(email)
        ? "The two email addresses differ: type the same address twice." : "");
    otpEmail.setCustomValidity(
      otpEmail.value && typed(otpEmail) === typed(email)
        ? "Give another email address than the recipient's." : "");
    Array.prototype.forEach.call(document.querySelectorAll("[data-fill=recipient]"),
      function (span) { span.textContent = email.value.trim() || "The recipient"; });
    var chosen = days.options[days.selectedIndex];
    if (chosen && until) { until.textContent = chosen.getAttribute("data-until"); }
    finish.disabled = !agree.checked;
  }

  function stepIsValid(n) {
    var fields = steps[n - 1].querySelectorAll("input, select, textarea");
    for (var i = 0; i < fields.length; i++) {
      if (!fields[i].disabled && !fields[i].checkValidity()) {
        fields[i].reportValidity();
        return false;
      }
    }
    return true;
  }

  form.addEventListener("input", sync);
  form.addEventListener("change", sync);
  form.addEventListener("click", function (event) {
    var button = event.target.closest("button");
    if (!button) { return; }
    if (button.hasAttribute("data-next")) {
      sync();
      if (stepIsValid(current)) { show(current + 1); }
    } else if (button.hasAttribute("data-back")) {
      show(current - 1);
    }
  });
  form.addEventListener("submit", function (event) {
    sync();
    if (!agree.checked) { event.preventDefault(); }
  });

  Array.prototype.forEach.call(form.querySelectorAll(".fwd-buttons, [data-back]"),
    function (el) { el.hidden = false; });
  form.classList.add("fwd-js");
  sync();
  show(current);
}());
