// Upload page of a request (issue 7): drop zone, folders, per-file and overall progress,
// resumable chunked uploads (POST announce -> PATCH chunks at Upload-Offset -> HEAD to
// resume), message, Send with a confirmation dialog, Cancel. No build step, no library.
// Everything the user or a file supplies is shown with textContent (never as HTML).
(function () {
  "use strict";
  var app = document.getElementById("upload-app");
  if (!app) { return; }
  var base = app.dataset.base;
  var csrf = app.dataset.csrf;
  var chunkBytes = parseInt(app.dataset.chunk, 10);
  var parallel = parseInt(app.dataset.parallel, 10) || 3;
  var maxFile = parseInt(app.dataset.maxFile, 10);
  var rows = document.getElementById("file-rows");
  var overall = document.getElementById("overall-progress");
  var overallText = document.getElementById("overall-text");
  var errorBox = document.getElementById("upload-error");
  var entries = [];
  var queue = [];
  var running = 0;

  function mb(bytes) {
    if (bytes < 10240) { return bytes + " bytes"; }
    if (bytes < 1048576) { return (bytes / 1024).toFixed(0) + " KB"; }
    return (bytes / 1048576).toFixed(2) + " MB";
  }

  function showError(text) {
    errorBox.textContent = text;
    errorBox.hidden = !text;
  }

  function cell(tr, text, cls) {
    var td = document.createElement("td");
    if (cls) { td.className = cls; }
    td.textContent = text || "";
    tr.appendChild(td);
    return td;
  }

  function makeRow(entry) {
    var tr = document.createElement("tr");
    tr.className = "file-row";
    entry.mark = cell(tr, "", "file-mark");
    entry.nameCell = cell(tr, entry.name, "file-name");
    cell(tr, entry.relpath, "muted");
    cell(tr, mb(entry.size), "num");
    var status = cell(tr, "", "file-status");
    entry.bar = document.createElement("progress");
    entry.bar.max = Math.max(entry.size, 1);
    entry.bar.value = entry.offset;
    entry.statusText = document.createElement("span");
    status.appendChild(entry.bar);
    status.appendChild(entry.statusText);
    var actions = cell(tr, "");
    var remove = document.createElement("button");
    remove.type = "button";
    remove.className = "secondary file-remove";
    remove.textContent = "Remove";
    remove.addEventListener("click", function () { removeEntry(entry); });
    actions.appendChild(remove);
    entry.row = tr;
    rows.appendChild(tr);
  }

  function render(entry) {
    entry.bar.value = entry.offset;
    entry.bar.hidden = entry.state === "done" || entry.state === "skipped";
    entry.row.dataset.state = entry.state;
    if (entry.state === "done") {
      entry.mark.textContent = "\u2713";
      entry.mark.className = "file-mark file-ok";
      var kind = entry.verdict || "";
      if (kind === "dicomdir") {
        entry.statusText.textContent = "DICOMDIR (index of the other files)";
      } else if (kind === "pdf" || kind === "jpeg" || kind === "png") {
        entry.statusText.textContent = kind.toUpperCase() + " document";
      } else {
        entry.statusText.textContent = entry.objects ? entry.objects + " DICOM object" +
          (entry.objects === 1 ? "" : "s") : "uploaded";
      }
    } else if (entry.state === "skipped") {
      entry.mark.textContent = "\u2013";
      entry.mark.className = "file-mark file-skipped";
      entry.statusText.textContent = "skipped: " + (entry.reason || "not usable");
    } else if (entry.state === "failed") {
      entry.mark.textContent = "!";
      entry.mark.className = "file-mark file-failed";
      entry.statusText.textContent = entry.reason;
    } else if (entry.state === "incomplete") {
      entry.statusText.textContent = " interrupted: add the file again to resume";
    } else if (entry.state === "checking") {
      entry.statusText.textContent = " checking the file\u2026";
    } else if (entry.state === "retrying") {
      entry.statusText.textContent = " connection lost, resuming\u2026";
    } else {
      entry.statusText.textContent = " " + Math.floor(100 * entry.offset / Math.max(entry.size, 1)) + "%";
    }
    summary();
  }

  function summary() {
    var total = 0, done = 0;
    entries.forEach(function (e) { total += e.size; done += e.offset; });
    overall.max = Math.max(total, 1);
    overall.value = done;
    overallText.textContent = total ? mb(done) + " of " + mb(total) : "";
    document.getElementById("file-total").textContent = String(entries.length);
    document.getElementById("no-files").hidden = entries.length > 0;
  }

  function settle(entry, body) {
    entry.offset = body.offset;
    if (body.complete) {
      entry.offset = entry.size;
      entry.verdict = body.verdict;
      entry.reason = body.reason;
      entry.objects = body.objects;
      entry.state = body.verdict === "skipped" ? "skipped" : "done";
    } else if (body.verdict === "checking") {
      // Every byte arrived and the server is inspecting the file: poll for the verdict.
      entry.state = "checking";
    } else if (entry.state === "checking") {
      // The inspection was given up: finish the file again (or have it added again).
      entry.state = entry.file ? "uploading" : "incomplete";
    }
  }

  function request(method, url, body, headers, onProgress, holder) {
    return new Promise(function (resolve, reject) {
      var xhr = new XMLHttpRequest();
      xhr.open(method, url);
      Object.keys(headers || {}).forEach(function (k) { xhr.setRequestHeader(k, headers[k]); });
      if (onProgress) { xhr.upload.onprogress = onProgress; }
      xhr.onload = function () {
        var data = null;
        try { data = JSON.parse(xhr.responseText); } catch (e) { data = null; }
        resolve({ status: xhr.status, body: data, xhr: xhr });
      };
      xhr.onerror = function () { reject(new Error("network")); };
      xhr.onabort = function () { reject(new Error("aborted")); };
      if (holder) { holder.xhr = xhr; }
      xhr.send(body);
    });
  }

  function sleep(ms) { return new Promise(function (r) { setTimeout(r, ms); }); }

  async function serverOffset(entry) {
    var res = await request("HEAD", entry.url, null, {});
    if (res.status !== 200) { throw new Error("status " + res.status); }
    return parseInt(res.xhr.getResponseHeader("Upload-Offset"), 10);
  }

  async function upload(entry) {
    var delay = 1000;
    if (entry.state !== "checking") { entry.state = "uploading"; }
    render(entry);
    while (entry.state === "uploading" || entry.state === "retrying" ||
           entry.state === "checking") {
      if (entry.state === "checking") {
        render(entry);
        await sleep(delay);
        delay = Math.min(delay * 2, 5000);
        try {
          var polled = await request("GET", entry.url, null, {});
          if (polled.status === 200) { settle(entry, polled.body); }
        } catch (e) { /* keep polling */ }
        if (entry.state !== "checking") { delay = 1000; }
        render(entry);
        continue;
      }
      var start = entry.offset;
      var end = Math.min(start + chunkBytes, entry.size);
      var progress = function (ev) {
        entry.offset = start + ev.loaded;
        if (entry.offset > end) { entry.offset = end; }
        render(entry);
      };
      try {
        var res = await request("PATCH", entry.url, entry.file.slice(start, end), {
          "Upload-Offset": String(start), "X-CSRF-Token": csrf,
          "Content-Type": "application/offset+octet-stream" }, progress, entry);
        entry.xhr = null;
        if (res.status === 200) {
          delay = 1000;
          entry.state = "uploading";
          settle(entry, res.body);
        } else if (res.status === 409 && res.body && typeof res.body.offset === "number") {
          entry.offset = res.body.offset;
          if (entry.offset >= entry.size) {
            var state = await request("GET", entry.url, null, {});
            if (state.status !== 200) { throw new Error("retry"); }
            settle(entry, state.body);
          }
        } else if (res.status === 409 || res.status >= 500) {
          throw new Error("retry");
        } else {
          entry.state = "failed";
          entry.reason = (res.body && res.body.error) || ("refused (" + res.status + ")");
        }
      } catch (err) {
        if (entry.state === "removed" || err.message === "aborted") { return; }
        entry.state = "retrying";
        render(entry);
        await sleep(delay);
        delay = Math.min(delay * 2, 15000);
        try { entry.offset = await serverOffset(entry); } catch (e) { continue; }
      }
      if (entry.offset >= entry.size && entry.state !== "done" && entry.state !== "skipped" &&
          entry.state !== "failed" && entry.state !== "checking") {
        // The last chunk's answer was lost: ask again to learn the verdict.
        entry.state = "retrying";
      }
      render(entry);
    }
  }

  function pump() {
    while (running < parallel && queue.length) {
      var entry = queue.shift();
      running += 1;
      upload(entry).finally(function () { running -= 1; pump(); });
    }
  }

  async function announce(file, relpath) {
    if (file.size > maxFile) {
      showError(file.name + " is larger than the " + mb(maxFile) + " allowed for one file.");
      return;
    }
    var form = new FormData();
    form.append("csrf", csrf);
    form.append("name", file.name);
    form.append("relpath", relpath);
    form.append("size", String(file.size));
    var res = await fetch(base + "/files", { method: "POST", body: form, credentials: "same-origin" });
    var body = await res.json().catch(function () { return {}; });
    if (res.status !== 201) {
      showError(file.name + ": " + (body.error || "could not be added (" + res.status + ")"));
      return;
    }
    var entry = entries.find(function (e) { return e.id === body.id; });
    if (!entry) {
      entry = { id: body.id, name: body.name, relpath: body.relpath, size: body.size,
                offset: 0, state: "new", url: body.url };
      entries.push(entry);
      makeRow(entry);
    }
    entry.url = body.url;
    entry.file = file;
    if (entry.state === "queued" || entry.state === "uploading" || entry.state === "retrying" ||
        entry.state === "checking") {
      return;  // the same file dropped twice: it is on its way already
    }
    if (body.complete) {
      settle(entry, body);
    } else {
      entry.offset = body.offset;
      entry.state = "queued";
      queue.push(entry);
    }
    render(entry);
  }

  async function addAll(items) {
    showError("");
    for (var i = 0; i < items.length; i += 1) {
      await announce(items[i].file, items[i].relpath);
    }
    pump();
  }

  function folderOf(path) {
    var parts = (path || "").split("/").filter(Boolean);
    parts.pop();
    return parts.join("/");
  }

  function readEntries(dirEntry) {
    var reader = dirEntry.createReader();
    var all = [];
    return new Promise(function (resolve, reject) {
      (function more() {
        reader.readEntries(function (batch) {
          if (!batch.length) { resolve(all); return; }
          all = all.concat(Array.prototype.slice.call(batch));
          more();
        }, reject);
      })();
    });
  }

  async function walk(entry, out) {
    if (entry.isFile) {
      var file = await new Promise(function (res, rej) { entry.file(res, rej); });
      out.push({ file: file, relpath: folderOf(entry.fullPath) });
    } else if (entry.isDirectory) {
      var children = await readEntries(entry);
      for (var i = 0; i < children.length; i += 1) { await walk(children[i], out); }
    }
  }

  async function dropped(dataTransfer) {
    var out = [];
    var items = dataTransfer.items ? Array.prototype.slice.call(dataTransfer.items) : [];
    var entriesDropped = items.map(function (it) {
      return it.kind === "file" && it.webkitGetAsEntry ? it.webkitGetAsEntry() : null;
    });
    if (entriesDropped.length && entriesDropped.every(Boolean)) {
      for (var i = 0; i < entriesDropped.length; i += 1) { await walk(entriesDropped[i], out); }
    } else {
      Array.prototype.forEach.call(dataTransfer.files, function (f) {
        out.push({ file: f, relpath: "" });
      });
    }
    await addAll(out);
  }

  function removeEntry(entry) {
    entry.state = "removed";
    if (entry.xhr) { entry.xhr.abort(); }
    queue = queue.filter(function (e) { return e !== entry; });
    fetch(entry.url || (base + "/files/" + entry.id), {
      method: "DELETE", headers: { "X-CSRF-Token": csrf }, credentials: "same-origin" });
    entries = entries.filter(function (e) { return e !== entry; });
    entry.row.remove();
    summary();
  }

  // -- wiring --
  var zone = document.getElementById("dropzone");
  var input = document.getElementById("file-input");
  var folderInput = document.getElementById("folder-input");
  input.addEventListener("change", function () {
    addAll(Array.prototype.map.call(input.files, function (f) {
      return { file: f, relpath: folderOf(f.webkitRelativePath) };
    }));
    input.value = "";
  });
  folderInput.addEventListener("change", function () {
    addAll(Array.prototype.map.call(folderInput.files, function (f) {
      return { file: f, relpath: folderOf(f.webkitRelativePath) };
    }));
    folderInput.value = "";
  });
  ["dragenter", "dragover"].forEach(function (name) {
    zone.addEventListener(name, function (ev) { ev.preventDefault(); zone.classList.add("over"); });
  });
  zone.addEventListener("dragleave", function () { zone.classList.remove("over"); });
  zone.addEventListener("drop", function (ev) {
    ev.preventDefault();
    zone.classList.remove("over");
    dropped(ev.dataTransfer);
  });
  zone.addEventListener("keydown", function (ev) {
    if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); input.click(); }
  });

  JSON.parse(document.getElementById("upload-state").textContent).forEach(function (f) {
    var entry = { id: f.id, name: f.name, relpath: f.relpath, size: f.size, offset: f.offset,
                  url: base + "/files/" + f.id, file: null, state: "incomplete" };
    entries.push(entry);
    makeRow(entry);
    if (f.complete || f.verdict === "checking") { settle(entry, f); }
    render(entry);
    if (entry.state === "checking") { queue.push(entry); }  // poll for its verdict
  });
  pump();
  summary();

  var dialog = document.getElementById("confirm-dialog");
  var fields = ["family_name", "given_name", "birth_date", "sex"];
  document.getElementById("send-button").addEventListener("click", function () {
    showError("");
    var missing = fields.filter(function (id) { return !document.getElementById(id).value.trim(); });
    if (missing.length) {
      showError("Fill in the patient's last name, first name, date of birth and gender.");
      return;
    }
    if (!entries.length) { showError("Add the files to upload first."); return; }
    var waiting = entries.filter(function (e) { return e.state !== "done" && e.state !== "skipped"; });
    if (waiting.length) {
      showError("Wait until every file has a check mark (" + waiting.length + " still uploading).");
      return;
    }
    dialog.showModal();
  });
  document.getElementById("confirm-no").addEventListener("click", function () { dialog.close(); });
  document.getElementById("confirm-yes").addEventListener("click", async function () {
    dialog.close();
    var form = new FormData();
    form.append("csrf", csrf);
    fields.forEach(function (id) { form.append(id, document.getElementById(id).value); });
    form.append("message", document.getElementById("message").value);
    var button = document.getElementById("send-button");
    button.disabled = true;
    var res = await fetch(base + "/send", { method: "POST", body: form, credentials: "same-origin" });
    var body = await res.json().catch(function () { return {}; });
    if (res.ok && body.ok) {
      window.location.assign(body.location);
    } else {
      button.disabled = false;
      showError(body.error || "Sending failed (" + res.status + "). Please try again.");
    }
  });
  document.getElementById("cancel-form").addEventListener("submit", function () {
    entries.forEach(function (e) { e.state = "removed"; if (e.xhr) { e.xhr.abort(); } });
    queue = [];
  });
})();
