// The Celery tab's live charts and per-task / per-worker tables, drawn beside the tab's table from /celery/stats
// (Locust's extended tabs render tables only). Plain SVG: the page loads nothing from outside this machine.
(function () {
  var COLORS = ["#2e7d32", "#c62828", "#ef6c00", "#1565c0", "#6a1b9a"];
  var PANEL_ID = "loadlab-celery-charts";

  function tabTable() {
    var cells = document.querySelectorAll("td");
    for (var i = 0; i < cells.length; i++) {
      if (cells[i].textContent === "Workers up" || cells[i].textContent.indexOf("Tasks submitted") === 0) {
        return cells[i].closest("table");
      }
    }
    return null;
  }

  function el(tag, attrs, text) {
    var node = document.createElementNS(tag === "div" || tag === "table" || tag === "tr" || tag === "td" ||
      tag === "th" || tag === "h4" || tag === "span" ? "http://www.w3.org/1999/xhtml" : "http://www.w3.org/2000/svg", tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // one chart: series = [{name, points: [[x, y], ...]}], x in epoch seconds; span = [x0, x1], the time axis every
  // chart of the panel shares (else each would end at its own last point: the queue sampler's and the series'
  // differ)
  function chart(title, unit, series, span) {
    var W = 380, H = 170, L = 48, B = 22, T = 20;
    var box = el("div", {"class": "loadlab-chart", "data-title": title,
                         "style": "display:inline-block;margin:0 16px 12px 0;vertical-align:top"});
    var svg = el("svg", {width: W, height: H, viewBox: "0 0 " + W + " " + H});
    box.appendChild(svg);
    svg.appendChild(el("text", {x: L, y: 13, "font-size": 12, fill: "currentColor"}, title + " (" + unit + ")"));
    var xs = [], ys = [0];
    series.forEach(function (s) { s.points.forEach(function (p) { if (p[1] !== null) { xs.push(p[0]); ys.push(p[1]); } }); });
    var x0 = span ? span[0] : Math.min.apply(null, xs.length ? xs : [0]);
    var x1 = span ? span[1] : Math.max.apply(null, xs.length ? xs : [1]);
    var y1 = Math.max.apply(null, ys) || 1;
    if (x1 <= x0) x1 = x0 + 1;
    box.setAttribute("data-span", x0.toFixed(3) + "-" + x1.toFixed(3));
    function px(x) { return L + (x - x0) / (x1 - x0) * (W - L - 8); }
    function py(y) { return H - B - y / y1 * (H - B - T); }
    svg.appendChild(el("line", {x1: L, y1: H - B, x2: W - 8, y2: H - B, stroke: "#888"}));
    svg.appendChild(el("line", {x1: L, y1: T, x2: L, y2: H - B, stroke: "#888"}));
    svg.appendChild(el("text", {x: L - 4, y: T + 4, "font-size": 10, "text-anchor": "end", fill: "currentColor"},
                       String(Math.round(y1 * 10) / 10)));
    svg.appendChild(el("text", {x: L - 4, y: H - B, "font-size": 10, "text-anchor": "end", fill: "currentColor"}, "0"));
    svg.appendChild(el("text", {x: W - 8, y: H - 6, "font-size": 10, "text-anchor": "end", fill: "currentColor"},
                       Math.round(x1 - x0) + " s"));
    series.forEach(function (s, i) {
      var points = s.points.filter(function (p) { return p[1] !== null; })
        .map(function (p) { return px(p[0]).toFixed(1) + "," + py(p[1]).toFixed(1); });
      svg.appendChild(el("polyline", {points: points.join(" "), fill: "none", stroke: COLORS[i % COLORS.length],
                                      "stroke-width": 1.5, "data-series": s.name}));
      svg.appendChild(el("text", {x: L + 6 + i * 78, y: T + 12, "font-size": 10, fill: COLORS[i % COLORS.length]},
                         s.name));
    });
    return box;
  }

  function table(title, columns, rows, key) {
    var box = el("div", {style: "margin:0 0 12px 0"});
    box.appendChild(el("h4", {style: "margin:4px 0"}, title));
    var t = el("table", {"data-table": key, style: "border-collapse:collapse;font-size:13px"});
    var head = el("tr");
    columns.forEach(function (c) { head.appendChild(el("th", {style: "text-align:left;padding:2px 12px 2px 0"}, c)); });
    t.appendChild(head);
    rows.forEach(function (r) {
      var tr = el("tr");
      r.forEach(function (v) { tr.appendChild(el("td", {style: "padding:2px 12px 2px 0"}, String(v))); });
      t.appendChild(tr);
    });
    box.appendChild(t);
    return box;
  }

  function draw(stats) {
    var anchor = tabTable();
    if (!anchor || !stats) return;
    var holder = anchor.closest(".MuiTableContainer-root") || anchor;
    var panel = document.getElementById(PANEL_ID);
    if (!panel || panel.nextSibling !== holder) {
      if (panel) panel.remove();
      panel = el("div", {id: PANEL_ID, style: "margin:8px 0 16px 0"});
      holder.parentNode.insertBefore(panel, holder);
    }
    panel.textContent = "";
    var start = stats.series ? stats.series.start : stats.since;
    var rows = stats.series ? stats.series.rows : [];
    function line(field) { return rows.map(function (r) { return [start + r.t_s, r[field]]; }); }
    var queue = stats.queue_history || [];
    var ends = rows.map(function (r) { return start + r.t_s; }).concat(queue.map(function (q) { return q[0]; }));
    var x0 = Math.min.apply(null, ends.length ? ends : [start]), span = [x0, Math.max.apply(null, ends.concat([x0 + 1]))];
    panel.appendChild(chart("Throughput by state", "tasks/s", [
      {name: "succeeded", points: line("completed_per_s")}, {name: "failed", points: line("failed_per_s")},
      {name: "retried", points: line("retried_per_s")}, {name: "submitted", points: line("submitted_per_s")}], span));
    panel.appendChild(chart("Queue depth", "messages", [
      {name: "ready", points: queue.map(function (q) { return [q[0], q[1]]; })},
      {name: "unacked", points: queue.map(function (q) { return [q[0], q[2]]; })}], span));
    panel.appendChild(chart("End-to-end latency", "ms", [
      {name: "p50", points: line("end_to_end_p50_ms")}, {name: "p95", points: line("end_to_end_p95_ms")}], span));
    panel.appendChild(chart("Queue wait and execution", "ms", [
      {name: "wait p50", points: line("queue_wait_p50_ms")}, {name: "wait p95", points: line("queue_wait_p95_ms")},
      {name: "exec p50", points: line("execution_p50_ms")}, {name: "exec p95", points: line("execution_p95_ms")}],
      span));
    var byTask = stats.by_task || {};
    panel.appendChild(table("Per task", ["task", "succeeded", "failed", "end-to-end p50 ms", "p95 ms", "samples"],
      Object.keys(byTask).map(function (name) {
        var t = byTask[name], e = t.end_to_end_ms;
        return [name, t.states.SUCCESS || 0, t.states.FAILURE || 0, Math.round(e.p50 * 10) / 10,
                Math.round(e.p95 * 10) / 10, e.count];
      }), "by_task"));
    var byWorker = stats.by_worker || {};
    panel.appendChild(table("Per worker (attempts)", ["worker", "succeeded", "failed", "retried"],
      Object.keys(byWorker).map(function (host) {
        var w = byWorker[host];
        return [host, w.SUCCESS || 0, w.FAILURE || 0, w.RETRY || 0];
      }), "by_worker"));
  }

  function poll() {
    if (!tabTable()) return;
    fetch("./celery/stats").then(function (r) { return r.json(); }).then(draw).catch(function () {});
  }
  setInterval(poll, 2000);
  new MutationObserver(function () {
    if (tabTable() && !document.getElementById(PANEL_ID)) poll();
  }).observe(document.documentElement, {childList: true, subtree: true});
})();
