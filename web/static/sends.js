// Live progress of sends to DICOM nodes: every table with data-sends-url is
// refreshed from that JSON endpoint (every 2 s while a send is unfinished, else
// every 10 s, so new sends appear). Text only: nothing from the server is parsed
// as HTML.
(function () {
  "use strict";

  function text(job) {
    var progress = job.sent + " / " + job.total;
    if (job.failed) { progress += ", " + job.failed + " failed"; }
    return ["#" + job.id, job.ae_title, job.state, progress, job.error || ""];
  }

  function render(table, jobs) {
    var body = table.tBodies[0];
    jobs.slice().reverse().forEach(function (job) {
      var row = body.querySelector('tr[data-job="' + job.id + '"]');
      if (!row) {
        row = body.insertRow(0);
        row.setAttribute("data-job", String(job.id));
        for (var i = 0; i < 6; i++) { row.insertCell(); }
        row.cells[5].appendChild(document.createElement("progress"));
      }
      var values = text(job);
      [0, 1, 2, 3].forEach(function (i) { row.cells[i].textContent = values[i]; });
      row.cells[4].textContent = values[4];
      row.cells[2].className = "send-state send-" + job.state;
      var bar = row.cells[5].querySelector("progress");
      bar.max = Math.max(job.total, 1);
      bar.value = job.sent + job.failed;
    });
    var empty = table.parentNode.querySelector(".sends-empty");
    if (empty && jobs.length) { empty.hidden = true; table.hidden = false; }
  }

  function watch(table) {
    var url = table.getAttribute("data-sends-url");
    function poll() {
      fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (response) { return response.ok ? response.json() : null; })
        .then(function (data) {
          var busy = false;
          if (data && data.jobs) {
            render(table, data.jobs);
            busy = data.jobs.some(function (job) { return !job.finished; });
          }
          window.setTimeout(poll, busy ? 2000 : 10000);
        })
        .catch(function () { window.setTimeout(poll, 10000); });
    }
    poll();
  }

  document.querySelectorAll("table[data-sends-url]").forEach(watch);
})();
