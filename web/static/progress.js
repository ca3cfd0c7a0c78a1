// Live progress for the batches list, the batch page and the workers page (what each runs, the denoising step
// of its slice in flight): polls the JSON API and updates the figures in place.
// No build step, no framework. The pages work without it; this only keeps them fresh.
(function () {
  "use strict";
  // Statuses whose figures still change ("cancelling": cancelled, slices in flight not stopped yet).
  var ACTIVE = { queued: true, running: true, cancelling: true };

  function rate(perSecond) {
    if (perSecond === null || perSecond === undefined) return "–";
    return perSecond >= 1 ? perSecond.toFixed(2) + "/s" : (perSecond * 60).toFixed(1) + "/min";
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    var s = Math.round(seconds);
    if (s < 60) return s + "s";
    var m = Math.floor(s / 60); s = s % 60;
    if (m < 60) return m + "m " + String(s).padStart(2, "0") + "s";
    var h = Math.floor(m / 60); m = m % 60;
    if (h < 48) return h + "h " + String(m).padStart(2, "0") + "m";
    return Math.floor(h / 24) + "d " + (h % 24) + "h";
  }

  function when(iso) {
    return iso ? iso.replace("T", " ").replace(/\.\d+/, "").replace("Z", "") : "–";
  }

  function percent(done, total) {
    return total ? Math.floor(100 * done / total) : 0;
  }

  function setId(id, text) {
    var el = document.getElementById(id);
    if (el && el.textContent !== text) el.textContent = text;
  }

  function setText(root, field, text) {
    var el = root.querySelector('[data-field="' + field + '"]');
    if (el && el.textContent !== text) el.textContent = text;
    return el;
  }

  function setStatus(el, status) {
    if (!el) return;
    el.textContent = status;
    el.className = "badge status-" + status;
  }

  function poll(url, onData, interval) {
    function tick() {
      fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" })
        .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
        .then(function (data) {
          var again = onData(data);
          if (again !== false) setTimeout(tick, again || interval);
        })
        .catch(function () { setTimeout(tick, interval * 5); });
    }
    setTimeout(tick, interval);
  }

  function batchesList(live) {
    var shown = live.getAttribute("data-ids");
    poll(live.getAttribute("data-poll"), function (data) {
      var ids = data.batches.map(function (b) { return b.id; }).join(",");
      if (ids !== shown) { window.location.reload(); return false; }
      var busy = false;
      data.batches.forEach(function (b) {
        var row = document.querySelector('tr[data-batch-id="' + b.id + '"]');
        if (!row) return;
        var p = b.progress;
        setStatus(row.querySelector('[data-field="status"]'), b.status);
        var bar = row.querySelector('[data-field="bar"]');
        if (bar) { bar.max = p.total || 1; bar.value = p.done; }
        setText(row, "percent", percent(p.done, p.total) + "%");
        setText(row, "done", p.done + " / " + p.total);
        setText(row, "rejected", String(p.rejected || 0));
        setText(row, "failed", String(p.failed || 0));
        setText(row, "throughput", rate(b.throughput));
        setText(row, "eta", duration(b.eta_seconds));
        setText(row, "finished", when(b.finished_at));
        if (ACTIVE[b.status]) busy = true;
      });
      return busy ? 2000 : 10000;
    }, 2000);
  }

  function batchPage(live) {
    var first = live.getAttribute("data-status");
    poll(live.getAttribute("data-poll"), function (b) {
      var p = b.progress;
      var bar = document.getElementById("batch-bar");
      if (bar) { bar.max = p.total || 1; bar.value = p.done; }
      setId("batch-percent", percent(p.done, p.total) + "%");
      setId("batch-done", p.done + " / " + p.total + " final");
      ["passed", "rejected", "failed"].forEach(function (k) {
        setId("batch-" + k, String(p[k] || 0));
        var el = document.getElementById("batch-" + k);
        if (el) el.parentNode.classList.toggle("zero", !p[k]);
      });
      setId("batch-throughput", rate(b.throughput));
      setId("batch-eta", duration(b.eta_seconds));
      setId("batch-finished", when(b.finished_at));
      setStatus(document.getElementById("batch-status"), b.status);
      // A new status changes what the page offers (buttons, winners): render it afresh.
      if (b.status !== first) { window.location.reload(); return false; }
      return ACTIVE[b.status] ? 2000 : false;
    }, 2000);
  }

  function workersPage(live) {
    var shown = live.getAttribute("data-names");
    poll(live.getAttribute("data-poll"), function (data) {
      var names = data.workers.map(function (w) { return w.name; }).join(",");
      if (names !== shown) { window.location.reload(); return false; }
      data.workers.forEach(function (w) {
        var row = live.querySelector('tr[data-worker="' + CSS.escape(w.name) + '"]');
        if (!row) return;
        setText(row, "current", w.current || "idle");
        var stepping = !!(w.current && w.step !== null && w.step !== undefined && w.steps);
        var box = row.querySelector('[data-field="stepping"]');
        if (box) box.hidden = !stepping;
        var bar = row.querySelector('[data-field="step-bar"]');
        if (bar && stepping) { bar.max = w.steps; bar.value = w.step; }
        if (stepping) setText(row, "step", "step " + w.step + "/" + w.steps);
      });
      return 2000;
    }, 2000);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var list = document.getElementById("batches-live");
    if (list) batchesList(list);
    var page = document.getElementById("batch-live");
    if (page && ACTIVE[page.getAttribute("data-status")]) batchPage(page);
    var workers = document.getElementById("workers-live");
    if (workers) workersPage(workers);
  });
})();
