// Staff review of an upload: while a release or rejection runs (a few seconds for a
// CD, a minute for a large upload), the buttons are disabled and the page says so.
(function () {
  "use strict";
  var status = document.getElementById("upload-busy");
  document.querySelectorAll("form[data-busy]").forEach(function (form) {
    form.addEventListener("submit", function () {
      document.querySelectorAll("form[data-busy] button").forEach(function (b) {
        b.disabled = true;
      });
      if (status) {
        status.textContent = form.getAttribute("data-busy");
        status.hidden = false;
      }
    });
  });
})();
