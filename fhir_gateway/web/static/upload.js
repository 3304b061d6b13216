/* The patient upload page: files or whole folders (drag and drop with directory traversal, or
   the folder picker), each sent over tus (tus-js-client, resumable) with the link's token in a
   header, a progress bar per file, and the server's result (received / refused and why). */
(function () {
  "use strict";
  const PARALLEL = 4;
  const zone = document.getElementById("uploader");
  const list = document.getElementById("files");
  const earlier = document.getElementById("earlier");
  const summary = document.getElementById("summary");
  const headers = {};
  headers[zone.dataset.header] = zone.dataset.token;
  const counts = { accepted: 0, rejected: 0, ignored: 0, sending: 0, queued: 0 };
  const queue = [];
  let running = 0;

  function say() {
    const parts = [counts.accepted + " received", counts.rejected + " refused"];
    if (counts.ignored) parts.push(counts.ignored + " not needed");
    if (counts.sending + counts.queued) parts.push((counts.sending + counts.queued) + " still sending");
    summary.textContent = parts.join(", ") + ".";
    summary.dataset.accepted = String(counts.accepted);
    summary.dataset.rejected = String(counts.rejected);
    summary.dataset.pending = String(counts.sending + counts.queued);
  }

  function row(name) {
    const li = document.createElement("li");
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = name;
    const bar = document.createElement("progress");
    bar.max = 100;
    bar.value = 0;
    bar.setAttribute("aria-label", "progress of " + name);
    const state = document.createElement("span");
    state.className = "state muted";
    state.textContent = "waiting";
    li.append(label, bar, state);
    list.append(li);
    return { li: li, bar: bar, state: state };
  }

  function show(r, result) {
    r.li.dataset.result = result.result;
    r.bar.value = 100;
    if (result.result === "accepted") {
      r.state.className = "state ok";
      r.state.textContent = "received" + (result.instances ? " (" + result.kind + " image)" : "");
    } else if (result.result === "ignored") {
      r.state.className = "state muted";
      r.state.textContent = "not needed: " + (result.reason || "");
    } else {
      r.state.className = "state bad";
      r.state.textContent = "refused: " + (result.reason || "not accepted");
    }
  }

  function finish(r, result) {
    counts.sending -= 1;
    counts[result.result in counts ? result.result : "rejected"] += 1;
    show(r, result);
    say();
    running -= 1;
    next();
  }

  function send(file, name) {
    const r = row(name);
    counts.sending += 1;
    counts.queued -= 1;
    say();
    r.state.textContent = "sending";
    const upload = new tus.Upload(file, {
      endpoint: zone.dataset.endpoint,
      headers: headers,
      metadata: { filename: name, filetype: file.type || "application/octet-stream" },
      retryDelays: [0, 1000, 3000, 5000],
      removeFingerprintOnSuccess: true,
      onProgress: function (sent, total) {
        r.bar.value = total ? Math.floor((sent / total) * 100) : 100;
      },
      onError: function (error) {
        const res = error.originalResponse;
        let reason = "the upload failed; try again";
        if (res) {
          try {
            const body = JSON.parse(res.getBody());
            reason = body.issue[0].diagnostics;
          } catch (e) { reason = "the server refused it (HTTP " + res.getStatus() + ")"; }
        }
        finish(r, { result: "rejected", reason: reason });
      },
      onSuccess: function () {
        fetch(upload.url, { headers: headers })
          .then(function (resp) { return resp.json(); })
          .then(function (body) { finish(r, body.result || { result: "rejected", reason: "no result" }); })
          .catch(function () { finish(r, { result: "rejected", reason: "no result from the server" }); });
      },
    });
    upload.findPreviousUploads().then(function (previous) {
      if (previous.length) upload.resumeFromPreviousUpload(previous[0]);
      upload.start();
    });
  }

  function next() {
    while (running < PARALLEL && queue.length) {
      const item = queue.shift();
      running += 1;
      send(item.file, item.name);
    }
  }

  function add(file, name) {
    queue.push({ file: file, name: name || file.webkitRelativePath || file.name });
    counts.queued += 1;
  }

  function walk(entry, path) {
    return new Promise(function (resolve) {
      if (entry.isFile) {
        entry.file(function (f) { add(f, path + f.name); resolve(); }, function () { resolve(); });
      } else if (entry.isDirectory) {
        const reader = entry.createReader();
        const all = [];
        const more = function () {
          reader.readEntries(function (batch) {
            if (!batch.length) {
              Promise.all(all.map(function (e) { return walk(e, path + entry.name + "/"); })).then(resolve);
            } else {
              all.push.apply(all, batch);
              more();
            }
          }, function () { resolve(); });
        };
        more();
      } else {
        resolve();
      }
    });
  }

  zone.addEventListener("dragover", function (e) { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", function () { zone.classList.remove("over"); });
  zone.addEventListener("drop", function (e) {
    e.preventDefault();
    zone.classList.remove("over");
    const items = Array.from(e.dataTransfer.items || []);
    const entries = items.map(function (i) { return i.webkitGetAsEntry ? i.webkitGetAsEntry() : null; });
    if (entries.some(function (x) { return x; })) {
      Promise.all(entries.filter(Boolean).map(function (x) { return walk(x, ""); })).then(function () { say(); next(); });
    } else {
      Array.from(e.dataTransfer.files).forEach(function (f) { add(f); });
      say();
      next();
    }
  });
  ["pick-files", "pick-folder"].forEach(function (id) {
    document.getElementById(id).addEventListener("change", function (e) {
      Array.from(e.target.files).forEach(function (f) { add(f); });
      e.target.value = "";
      say();
      next();
    });
  });

  fetch(zone.dataset.received, { headers: headers })
    .then(function (resp) { return resp.json(); })
    .then(function (body) {
      (body.files || []).forEach(function (f) {
        const li = document.createElement("li");
        const name = document.createElement("span");
        name.className = "name";
        name.textContent = f.file;
        const what = document.createElement("span");
        what.textContent = f.result === "accepted" ? "received" : f.result === "ignored" ? "not needed" : "refused";
        const why = document.createElement("span");
        why.className = "muted";
        why.textContent = f.reason || "";
        li.append(name, what, why);
        earlier.append(li);
      });
    })
    .catch(function () { /* the list is a courtesy; uploading still works */ });
})();
