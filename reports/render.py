"""Renders a run's report.json as a self-contained ``report.html`` (plots inline as SVG, no network at view time)
and a short ``summary.md`` for a pull-request comment."""
from __future__ import annotations

import html
import io
from pathlib import Path

from loadlab.reports.recorder import REPORT_PHASES

PHASE_LABELS = {"publish": "publish", "queue_wait": "queue wait", "execution": "execution",
                "result_store": "result store", "end_to_end": "end to end"}
VERDICT_COLOURS = {"pass": "#1a7f37", "warn": "#9a6700", "fail": "#cf222e"}


def _svg(fig) -> str:
    buffer = io.StringIO()
    # no RDF metadata block: the page then carries no URL but the SVG namespace identifiers
    fig.savefig(buffer, format="svg", bbox_inches="tight",
                metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **kwargs):
    """A figure and its axes, like ``pyplot.subplots`` but without pyplot's global figure registry: nothing to close,
    and reports can be rendered in several threads at once (the web UI renders off its event loop)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


MIN_LATENCY_SAMPLES = 10  # a bucket's percentiles are drawn only from this many finished tasks up


def latency_points(rows: list[dict]) -> list[tuple[float, float | None, float | None]]:
    """(t, p50, p95) of each bucket with at least ``MIN_LATENCY_SAMPLES`` finished tasks: the drain's last buckets
    hold a handful of stragglers, mostly retried tasks whose end to end includes their backoff, and one of them
    would draw a p95 spike of seconds that no task of the load saw."""
    points = []
    for r in rows:
        finished = round((r["completed_per_s"] + r["failed_per_s"]) * r.get("width_s", 1.0))
        if finished >= MIN_LATENCY_SAMPLES:
            points.append((r["t_s"], r["end_to_end_p50_ms"], r["end_to_end_p95_ms"]))
    return points


def timeseries_plot(rows: list[dict], load_stopped_s: float | None = None, queue: str | None = None,
                    queue_peak: int | None = None) -> str | None:
    """Four panels on one time axis: rates, tasks in the system (ledger), broker queue depth (sampled), latency."""
    if not rows:
        return None
    # the rates and latencies end with the last bucket that saw a task; later buckets only hold queue samples
    active = [i for i, r in enumerate(rows) if r["submitted_per_s"] or r["completed_per_s"] or r["failed_per_s"]
              or r["retried_per_s"]]
    rate_rows = rows[:active[-1] + 1] if active else rows
    if load_stopped_s is not None and len(rate_rows) > 1 and rate_rows[-1]["t_s"] > load_stopped_s:
        rate_rows = rate_rows[:-1]  # the last interval is cut short by the end of the drain: its rates would read low
    from matplotlib.ticker import MaxNLocator

    t = [r["t_s"] for r in rate_rows]
    fig, (top, middle, depth, bottom) = _subplots(4, 1, figsize=(9, 8.4), sharex=True,
                                                  gridspec_kw={"height_ratios": [3, 2, 2, 3]})
    top.plot(t, [r["submitted_per_s"] for r in rate_rows], label="submitted/s", color="#0969da")
    top.plot(t, [r["completed_per_s"] for r in rate_rows], label="completed/s", color="#1a7f37")
    if any(r["failed_per_s"] for r in rate_rows):
        top.plot(t, [r["failed_per_s"] for r in rate_rows], label="failed/s", color="#cf222e")
    if any(r["retried_per_s"] for r in rate_rows):
        top.plot(t, [r["retried_per_s"] for r in rate_rows], label="retried/s", color="#9a6700", linestyle="--")
    top.set_ylabel("tasks/s")
    middle.fill_between(t, [r["in_system"] for r in rate_rows], step="post", color="#8c959f", alpha=0.5,
                        label="in system: sent, not yet finished (task ledger)")
    middle.set_ylabel("tasks")
    sampled = [(r["t_s"], r["queue_depth"]) for r in rows if r.get("queue_depth") is not None]
    where = f" '{queue}'" if queue else ""
    if sampled:
        xs, ys = [x for x, _ in sampled], [y for _, y in sampled]
        depth.fill_between(xs, ys, step="post", color="#fb8f44", alpha=0.25)
        depth.step(xs, ys, where="post", color="#bc4c00", linewidth=1.6, zorder=3,
                   label=f"broker queue depth: ready messages in{where} (sampled ~1/s)")
        # the caption's peak is of every sample; the steps show each bucket's last one, which can be lower
        peak = max(ys) if queue_peak is None else max(queue_peak, max(ys))
        depth.set_ylim(bottom=0, top=max(1.0, peak * 1.3))
        depth.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
        shown = "" if peak == max(ys) else f" (each bucket's last sample drawn: up to {max(ys):,})"
        depth.text(0.995, 0.93, f"peak {peak:,}{shown} · after the drain {ys[-1]:,}", transform=depth.transAxes,
                   ha="right", va="top", fontsize=8, color="#bc4c00")
    else:
        depth.set_ylim(0, 1)
        depth.text(0.5, 0.5, "no broker queue-depth samples in this report", transform=depth.transAxes,
                   ha="center", va="center", fontsize=9, color="#57606a")
    depth.set_ylabel("broker queue depth\n(messages)")
    latency = latency_points(rate_rows)
    bottom.plot([x for x, _, _ in latency], [p50 for _, p50, _ in latency], label="end-to-end p50", color="#8250df")
    bottom.plot([x for x, _, _ in latency], [p95 for _, _, p95 in latency], label="end-to-end p95", color="#bf3989")
    bottom.text(0.005, 0.93, f"buckets with fewer than {MIN_LATENCY_SAMPLES} finished tasks left out",
                transform=bottom.transAxes, ha="left", va="top", fontsize=7, color="#57606a")
    bottom.set_ylabel("latency (ms)")
    bottom.set_xlabel("seconds since the first task was sent")
    for axis in (top, middle, depth, bottom):
        if load_stopped_s is not None:
            axis.axvline(load_stopped_s, color="#57606a", linestyle=":", linewidth=1)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(loc="upper left", fontsize=8)
        axis.grid(alpha=0.3)
    if load_stopped_s is not None:
        top.annotate(" load stopped, drain →", (load_stopped_s, top.get_ylim()[1] * 0.9), fontsize=8,
                     color="#57606a")
    fig.suptitle("Throughput, tasks in the system, broker queue depth and latency over time", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98), h_pad=0.6)
    return _svg(fig)


PERCENTILE_TICKS = (50, 90, 99, 99.9, 99.99)


def percentile_plot(encoded: dict[str, str]) -> str | None:
    """Latency by percentile for each phase, from the run's HDR histograms (log-scaled tail)."""
    if not encoded:
        return None
    import math

    from hdrh.histogram import HdrHistogram

    fig, axis = _subplots(figsize=(9, 3.8))
    xs = [0, 50, 75, 90, 95, 98, 99, 99.5, 99.9, 99.95, 99.99]
    position = lambda p: -math.log10(1 - p / 100) if p < 100 else 5  # noqa: E731
    plotted = False
    for phase, data in encoded.items():
        hist = HdrHistogram.decode(data)
        if not hist.get_total_count():
            continue
        ys = [hist.get_value_at_percentile(p) / 1000 for p in xs]
        axis.plot([position(p) for p in xs], ys, marker=".", label=PHASE_LABELS.get(phase, phase))
        plotted = True
    if not plotted:
        return None
    axis.set_xticks([position(p) for p in PERCENTILE_TICKS], [f"p{p:g}" for p in PERCENTILE_TICKS])
    axis.set_yscale("log")
    axis.set_ylabel("latency (ms, log scale)")
    axis.set_xlabel("percentile")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    fig.suptitle("Latency by percentile (HDR histograms)", fontsize=11)
    return _svg(fig)


def scaling_plot(scaling: dict) -> str | None:
    points = scaling.get("points") or []
    if not points:
        return None
    n = [p["n"] for p in points]
    fig, (left, right) = _subplots(1, 2, figsize=(10, 3.8))
    left.plot(n, [p["completed_per_s"] for p in points], "o", color="#0969da", label="measured (steady window)")
    usl = scaling.get("usl")
    if usl:
        from loadlab.reports.scaling import _usl

        top = max(max(n), *(p["n"] for p in scaling.get("predictions", [])))
        xs = [1 + i * (top - 1) / 200 for i in range(201)]
        measured_top = max(n)
        ys = [_usl(x, usl["lambda"], usl["sigma"], usl["kappa"]) for x in xs]
        left.plot([x for x in xs if x <= measured_top], [y for x, y in zip(xs, ys) if x <= measured_top],
                  color="#1a7f37", label=f"USL fit (R²={usl['r2']:.3f})")
        left.plot([x for x in xs if x >= measured_top], [y for x, y in zip(xs, ys) if x >= measured_top],
                  color="#1a7f37", linestyle="--", label="USL prediction (not measured)")
        if scaling.get("knee_n"):
            left.axvline(scaling["knee_n"], color="#9a6700", linestyle=":", label=f"knee N≈{scaling['knee_n']:g}")
    left.set_xlabel("N = workers × concurrency")
    left.set_ylabel("completed tasks/s")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    right.plot(n, [p["p95_ms"] for p in points], "o-", color="#bf3989")
    right.set_xlabel("N = workers × concurrency")
    right.set_ylabel("end-to-end p95 (ms)")
    right.grid(alpha=0.3)
    fig.suptitle("Scaling", fontsize=11)
    return _svg(fig)


def serialization_plot(rows: list[dict]) -> str | None:
    """The offline matrix at a glance: encode + decode p50 against payload size per serializer (uncompressed), and
    what each compression buys and costs on json, each point the median over the payload shapes."""
    import statistics

    if not rows:
        return None

    def median_by(select, key):
        groups: dict[tuple, list[float]] = {}
        for r in rows:
            if select(r):
                groups.setdefault((key(r), r["payload_bytes"]), []).append(r)
        return groups

    fig, (cost, ratio, compress_cost) = _subplots(1, 3, figsize=(13, 3.8))
    by_serializer = median_by(lambda r: r["compression"] == "none", lambda r: r["serializer"])
    for name in sorted({k[0] for k in by_serializer}):
        sizes = sorted(size for (n, size) in by_serializer if n == name)
        cost.plot(sizes, [statistics.median(r["encode_us"]["p50"] + r["decode_us"]["p50"]
                                            for r in by_serializer[(name, size)]) for size in sizes],
                  marker="o", label=name)
    cost.set(xscale="log", yscale="log", xlabel="payload bytes", ylabel="encode + decode p50 (µs)",
             title="serializer cost (no compression)")
    cost.legend(fontsize=8)
    base = "json" if any(r["serializer"] == "json" for r in rows) else rows[0]["serializer"]
    by_compression = median_by(lambda r: r["serializer"] == base, lambda r: r["compression"])
    for name in sorted({k[0] for k in by_compression}):
        sizes = sorted(size for (n, size) in by_compression if n == name)
        ratio.plot(sizes, [statistics.median(r["wire_bytes"] / max(1, r["payload_bytes"])
                                             for r in by_compression[(name, size)]) for size in sizes],
                   marker="o", label=name)
        compress_cost.plot(sizes, [statistics.median(r["encode_us"]["p50"] + r["decode_us"]["p50"]
                                                     for r in by_compression[(name, size)]) for size in sizes],
                           marker="o", label=name)
    ratio.set(xscale="log", xlabel="payload bytes", ylabel="wire bytes / payload bytes",
              title=f"wire size by compression ({base})")
    ratio.axhline(1.0, color="#888", linewidth=0.8, linestyle=":")
    ratio.legend(fontsize=8)
    compress_cost.set(xscale="log", yscale="log", xlabel="payload bytes", ylabel="encode + decode p50 (µs)",
                      title=f"cost by compression ({base})")
    for axis in (cost, ratio, compress_cost):
        axis.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    return _svg(fig)


def _table(headers: list[str], rows: list[list], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(
            f"<td class='{'num' if i >= numeric_from else ''}'>{html.escape(_fmt(v))}</td>" for i, v in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "" if value is None else str(value)


def _percent(share: float | None) -> str | None:
    return None if share is None else f"{share * 100:.2f} %"


def littles_law_sentence(little: dict) -> str:
    window = (f" over {little['window_s']:g} s from {little['window_start_s']:g} s" if little.get("window_s")
              else "")
    text = (f"Little's law{window}: {little['arrival_rate_per_s']:.1f} tasks/s leaving × mean time in the system "
            f"{little['mean_end_to_end_s'] * 1000:.1f} ms predicts {little['predicted_in_system']:.2f} tasks in the "
            f"system; the ledger's time average is {little['observed_in_system']:.2f} (ratio {little['ratio']}")
    if little.get("tolerance") is None:
        return text + ")."
    text += f", tolerance ±{little['tolerance']:.3f}: "
    return text + ("holds)." if little.get("within_tolerance") else f"does not hold) — {little.get('reason')}.")


def arrivals_sentence(arrivals: dict) -> str:
    return (f"Arrivals: {arrivals['sends']:,} sends over {arrivals['window_s']:g} s, inter-arrival CV "
            f"{_fmt(arrivals['interarrival_cv'])} (1 for Poisson arrivals, above 1 for bursts), peak-to-mean "
            f"{_fmt(arrivals['peak_to_mean'])} per {arrivals['slot_s'] * 1000:g} ms (peak {arrivals['peak_per_slot']},"
            f" mean {arrivals['mean_per_slot']:g}).")


def audit_sentence(audit: dict) -> str:
    if audit.get("error"):
        return f"Result backend audit: the backend could not be read ({audit['error']})."
    kinds = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in audit["by_kind"].items() if n) or "none"
    return (f"Result backend audit: {audit['audited']:,} finished tasks read back after the drain, "
            f"{audit['matching']:,} stored as the ledger has them, {audit['mismatches']:,} not ({kinds})"
            + (f"; {audit['skipped_ignore_result']:,} with ignore_result left out" if audit["skipped_ignore_result"]
               else "") + ".")


def _sizes(stats: dict) -> str:
    """Tasks per workflow as "4" or "2–5" (the root included)."""
    sizes = [int(k) for k in stats["tasks_per_workflow"]]
    return "" if not sizes else str(sizes[0]) if len(sizes) == 1 else f"{min(sizes)}–{max(sizes)}"


def workflow_rows(workflows: dict) -> list[list]:
    """[root task, workflows, tasks per workflow, mean tasks, end-to-end p50, p95, p99, max ms] per root task name,
    then all of them."""
    rows = []
    for name, stats in [*workflows["by_root"].items(), *([("all", workflows)] if len(workflows["by_root"]) > 1
                                                          else [])]:
        e2e = stats["end_to_end_ms"]
        rows.append([name, stats["count"], _sizes(stats), stats["tasks_mean"], e2e["p50"], e2e["p95"], e2e["p99"],
                     e2e["max"]])
    return rows


def workflows_sentence(workflows: dict, tasks: dict) -> str:
    children = ", ".join(f"{name} {n:,}" for name, n in workflows["children_by_task"].items())
    unfinished = (f"; {workflows['unfinished']:,} workflow(s) with a task that never finished are left out"
                  if workflows["unfinished"] else "")
    return (f"{workflows['count']:,} workflow(s) of more than one task: a task and every task published under it "
            f"(chain, group, chord, .delay() in a task; Celery's root_id). {tasks.get('children', 0):,} of the "
            f"{tasks['submitted']:,} submitted tasks were published by other tasks ({children}), each counted once"
            f"{unfinished}. End to end: the root's first publish until the last task of the workflow finished.")


def render_html(report: dict) -> str:
    tasks, lat, v = report["tasks"], report["latency_ms"], report.get("verdict", {"status": "pass", "problems": []})
    colour = VERDICT_COLOURS.get(v["status"], "#57606a")
    problems = "; ".join(v["problems"]) or "every submitted task reached a terminal state"
    headline = (f"{tasks['submitted']:,} tasks submitted, {tasks['succeeded']:,} succeeded, {tasks['failed']:,} failed, "
                f"{tasks['lost']:,} lost · {report['throughput']['completed_per_s']:.1f} completed/s · "
                f"end-to-end p95 {lat['end_to_end']['p95']:.1f} ms")
    if report.get("scaling"):  # a sweep's runs are not one run: its head says what was swept
        headline = _sweep_markdown(report)[0] + " · " + _usl_line(report["scaling"])
    phases = [[PHASE_LABELS[p], lat[p]["count"], lat[p]["mean"], lat[p]["p50"], lat[p]["p90"], lat[p]["p95"],
               lat[p]["p99"], lat[p]["max"]] for p in REPORT_PHASES]
    extra = report.get("latency_ms_extra", {})
    if "result_store" in extra:
        s = extra["result_store"]
        phases.insert(3, [PHASE_LABELS["result_store"], s["count"], s["mean"], s["p50"], s["p90"], s["p95"], s["p99"],
                          s["max"]])
    workflows = report.get("workflows")
    children = workflows["children_by_task"] if workflows else None
    by_task = [[name, s["count"], *([children.get(name, 0)] if children is not None else []), s["mean"], s["p50"],
                s["p95"], s["p99"], s["max"]] for name, s in extra.get("end_to_end_by_task", {}).items()]
    ledger_rows = [[k.replace("_", " "), tasks[k]] for k in
                   ("submitted", "succeeded", "failed", "revoked", "retried", "pending_at_end", "lost", "duplicates")
                   if k in tasks]
    if tasks.get("children"):
        ledger_rows.insert(1, ["of them published by tasks", tasks["children"]])
    retries = report["retries"]
    retry_rows = [["tasks retried", retries["tasks_retried"]], ["exhausted (failed after max retries)", retries["exhausted"]]]
    retry_rows += [[f"finished after {k} attempt(s)", n] for k, n in retries["attempts"].items()]
    retry_rows += [[f"observed backoff {k}", f"{val:.3f} s"] for k, val in retries["backoff_observed_s"].items()]
    policy = "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in p.items() if v is not None)
                       for name, p in retries["policies"].items()) if retries.get("policies") else \
        ", ".join(f"{k}={v}" for k, v in retries.get("policy", {}).items())
    backoff_rows = _backoff_rows(retries)
    chain_rows = [[c["id"][:8], c["task"], c["attempts"], c["final_state"],
                   " → ".join(f"#{a['attempt']} {a.get('exception') or a.get('state')}" for a in c["chain"]),
                   round((c["finished_at"] - c["first_sent_at"]) * 1000, 1) if c.get("first_sent_at") else None]
                  for c in retries.get("chains", [])[:12]]
    settings_rows = [[k, v] for k, v in report["settings"].items()]
    sampling = report.get("queue_depth_sampling") or {}
    plot = timeseries_plot(report.get("timeseries", []), report.get("timeseries_load_stopped_s"),
                           sampling.get("queue"), sampling.get("peak"))
    percentiles = percentile_plot(report.get("histograms_hdr", {}))
    locust = report["locust"]
    lost_ids = report.get("drain", {}).get("lost_ids", [])
    artefacts = report.get("artefacts", {})
    sections = [
        f"<header style='border-left:8px solid {colour}'><h1>loadlab · {html.escape(report['scenario'])} · "
        f"<span style='color:{colour}'>{v['status'].upper()}</span></h1>"
        f"<p class='headline'>{html.escape(headline)}</p><p>{html.escape(problems)}</p>"
        + "".join(f"<p class='note'>Accounted: {html.escape(note)}.</p>" for note in v.get("notes", []))
        + f"<p class='meta'>started {html.escape(report['started_at'])} · load {report['duration_s']:.1f} s · "
        f"Locust {locust['requests']:,} requests, {locust['failures']:,} failures, {locust['rps']:.1f} req/s</p></header>",
        "<section><h2>Task ledger</h2>" + _table(["", "tasks"], ledger_rows) +
        "<p class='note'>submitted = succeeded + failed + revoked + lost; a task that retried and then succeeded "
        "counts once, as succeeded. pending at end = not finished when the load stopped (before the drain).</p></section>",
        "<section><h2>Phase latencies (ms, HDR histograms)</h2>" +
        _table(["phase", "count", "mean", "p50", "p90", "p95", "p99", "max"], phases) + (percentiles or "") +
        "<p class='note'>publish: apply_async until the broker accepted the message · queue wait: sent (or retry "
        "ETA) → started · execution: started → body returned · result store: body returned → result stored · "
        "end to end: first sent → final result stored.</p>" + _sample_counts_note(report) + "</section>",
    ]
    if plot:
        little = report.get("littles_law")
        little_text = f"<p class='note'>{html.escape(littles_law_sentence(little))}</p>" if little else ""
        arrivals = report.get("arrivals")
        if arrivals:
            little_text += f"<p class='note'>{html.escape(arrivals_sentence(arrivals))}</p>"
        depth_text = ""
        if sampling:
            depth_text = (f"<p class='note'>Broker queue depth: messages ready in queue "
                          f"'{html.escape(str(sampling['queue']))}' ({html.escape(str(sampling.get('transport')))}), "
                          f"read from the broker every {sampling['interval_s']:g} s by the load generator "
                          f"({sampling['samples']} samples, {sampling['errors']} failed polls; peak "
                          f"{_fmt(sampling['peak'])}, {_fmt(sampling['last'])} after the drain). Each bucket shows "
                          f"its last sample. Messages a worker has prefetched or is running are not in the queue: "
                          f"they count in the ledger's 'in system' (sent, not yet finished) above.</p>")
        sections.append(f"<section><h2>Over time</h2>{plot}{depth_text}{little_text}</section>")
    audit = report.get("backend_audit")
    if audit:
        audit_rows = [[f"<code>{html.escape(t['id'])}</code>", html.escape(str(t["task"])), t["ledger_state"],
                       _fmt(t["stored_state"]), t["kind"].replace("_", " ")] for t in audit["tasks"]]
        sections.append("<section><h2>Result backend audit</h2>"
                        f"<p>{html.escape(audit_sentence(audit))}</p>" +
                        (_table(["task id", "task", "ledger", "backend", "kind"], audit_rows, numeric_from=9)
                         if audit_rows else "") + "</section>")
    if by_task:
        sections.append("<section><h2>End-to-end latency by task (ms)</h2>" +
                        _table(["task", "count", *(["published by a task"] if children is not None else []), "mean",
                                "p50", "p95", "p99", "max"], by_task) + "</section>")
    if workflows:
        sections.append("<section><h2>Workflows (tasks that started tasks)</h2>"
                        f"<p>{html.escape(workflows_sentence(workflows, tasks))}</p>" +
                        _table(["root task", "workflows", "tasks each", "mean tasks", "end-to-end p50 ms", "p95 ms",
                                "p99 ms", "max ms"], workflow_rows(workflows)) + "</section>")
    retry_html = "<section><h2>Retries</h2>" + _table(["", "value"], retry_rows)
    if backoff_rows:
        retry_html += ("<h3>Observed backoff against the policy</h3>" +
                       _table(["retry", "count", "observed p50 s", "observed p95 s", "observed max s",
                               "policy allows s"], backoff_rows) +
                       "<p class='note'>observed = the failed attempt's exception → the next attempt started (countdown "
                       "plus queueing). Celery's full jitter draws a countdown uniformly in [0, min(max, factor·2^retry)] "
                       "whole seconds.</p>" + _backoff_count_note(retries, report["tasks"]))
    if chain_rows:
        retry_html += ("<h3>Retry chains (first tasks that retried)</h3>" +
                       _table(["task id", "task", "attempts", "final", "chain", "first publish → final ms"],
                              chain_rows, numeric_from=2))
    sections.append(retry_html + f"<p class='note'>policy: {html.escape(policy)}</p></section>")
    scaling = report.get("scaling")
    if scaling:
        rows = [[p["workers"], p["concurrency"], p["pool"], p["prefetch_multiplier"], p["n"], p["completed_per_s"],
                 _fmt(p.get("backlog_growth_per_s")), _saturated(p), p["p95_ms"], p.get("lost", 0)]
                for p in scaling["points"]]
        usl = scaling.get("usl")
        usl_text = (f"USL fit: λ = {usl['lambda']:.2f} tasks/s per unit, σ (contention) = {usl['sigma']:.4f}, "
                    f"κ (coherency) = {usl['kappa']:.5f}, peak N = {usl['n_peak'] if usl['n_peak'] is not None else '∞ (no retrograde)'}"
                    f", R² = {usl['r2']:.3f}; knee N ≈ {scaling.get('knee_n')}."
                    + "".join(f" Prediction (not measured): N={p['n']} → {p['completed_per_s']:.1f}/s."
                              for p in scaling.get("predictions", []))) if usl else \
            f"No USL fit: {scaling.get('usl_note', '')}"
        plot_svg = scaling_plot(scaling) or ""
        sections.append("<section><h2>Scaling</h2>" + plot_svg +
                        _table(["workers", "concurrency", "pool", "prefetch", "N", "completed/s",
                                "backlog growth /s", "saturated", "p95 ms", "lost"], rows, numeric_from=0) +
                        f"<p>{html.escape(usl_text)}</p><p class='note'>completed/s: tasks that finished in each "
                        "point's steady window (warm-up excluded, until the load stopped), whatever their send "
                        "time. A point whose backlog grew was saturated: its rate is the stack's capacity; an "
                        "unsaturated point's rate is the load offered, a lower bound of it.</p></section>")
    serialization = report.get("serialization") or []
    if serialization:
        rows = [[r["serializer"], r["compression"], r.get("shape", ""), r["payload_bytes"], r["wire_bytes"],
                 r.get("compression_ratio", ""), r["encode_us"]["p50"], r["encode_us"]["p95"], r["decode_us"]["p50"],
                 r["decode_us"]["p95"]] for r in serialization]
        sections.append("<section><h2>Serialization cost (offline, through kombu's registry)</h2>" +
                        (serialization_plot(serialization) or "") +
                        "<p>Each point is the median over the payload shapes; the table has every combination.</p>" +
                        # hundreds of rows: folded, so the plots and the sections below stay in view
                        f"<details><summary>every combination ({len(rows)} rows)</summary><div class='wide'>" +
                        _table(["serializer", "compression", "shape", "payload B", "wire B", "ratio", "encode p50 µs",
                                "encode p95 µs", "decode p50 µs", "decode p95 µs"], rows, numeric_from=3) +
                        "</div></details></section>")
    inband = report.get("serialization_inband") or []
    if inband:
        sources = {"measured": "measured (this run's histograms)", "offline_estimate": "offline estimate (metrics off)"}
        rows = [[r["serializer"], r["payload_bytes"], r["completed_per_s"], r["end_to_end_p50_ms"],
                 r["end_to_end_p95_ms"], r.get("end_to_end_mean_ms"), r.get("serialization_ms_per_task"),
                 _percent(r.get("serialization_share")),
                 sources.get(r.get("serialization_share_source"), r.get("serialization_share_source") or "none")]
                for r in inband]
        sections.append("<section><h2>Serialization in band (real runs)</h2>" +
                        _table(["serializer", "payload B", "completed/s", "e2e p50 ms", "e2e p95 ms", "e2e mean ms",
                                "serializing ms/task", "share of e2e mean", "source"], rows) +
                        "<p class='note'>share = serializing time per task / mean end-to-end latency (the share of all "
                        "tasks' end-to-end time spent serializing). measured: the run's "
                        "celery_task_serialization_seconds histograms of that serializer — encode in the producer, "
                        "decode in the worker (Celery decodes a task message in the worker's main process and again "
                        "in the pool child) and the result's encode — summed over every process's final scrape "
                        "(metrics/*.prom) and divided by the tasks submitted. offline estimate, only for a run "
                        "without metrics: request and result each encoded and decoded once at the offline matrix's "
                        "uncompressed p50.</p></section>")
    if report.get("chaos"):
        sections.append(_faults_section(report["chaos"]))
    failed_tasks = report.get("failed_tasks") or []
    if failed_tasks:
        shown = failed_tasks[:200]
        sections.append(
            "<section><h2>Tasks that failed for good</h2>" +
            _table(["task id", "task", "exception", "attempts"],
                   [[f["id"], f["task"], f["exception"], f["attempts"]] for f in shown], numeric_from=3) +
            (f"<p>The first {len(shown)} of {report['tasks']['failed']}; report.json lists up to "
             f"{len(failed_tasks)}.</p>" if report["tasks"]["failed"] > len(shown) else "") + "</section>")
    by_request = (report.get("locust") or {}).get("by_request") or []
    if by_request:
        sections.append(
            "<section><h2>Locust requests</h2>" +
            _table(["type", "name", "requests", "failures", "median ms", "p95 ms", "p99 ms", "max ms", "req/s"],
                   [[r["type"], r["name"], r["requests"], r["failures"], r["median_ms"], r["p95_ms"], r["p99_ms"],
                     r["max_ms"], r["rps"]] for r in by_request], numeric_from=2) +
            "<p>How Locust's requests relate to tasks: a Celery user's <code>publish TASK</code> is one "
            "<code>apply_async</code> (one task sent); an HTTP user's <code>POST /tasks/TASK</code> submits one task "
            "and its <code>GET /tasks/[id]</code> are status polls (no task); <code>end_to_end TASK</code> is fired "
            "once for every task that finished, by the ledger (a failure there is a task that failed, counted in "
            "the task ledger, not a failed request). Locust's total counts all of them.</p></section>")
    if lost_ids:
        sections.append("<section><h2>Lost task ids</h2><pre>" + html.escape("\n".join(lost_ids)) + "</pre></section>")
    if report.get("gates"):
        gate_rows = [[g["rule"], g["value"], g["threshold"], "pass" if g["passed"] else "FAIL"] for g in report["gates"]]
        sections.append("<section><h2>Gates</h2>" + _table(["rule", "value", "threshold", "verdict"], gate_rows) +
                        "</section>")
    sections.append("<section><h2>Settings</h2>" + _table(["setting", "value"], settings_rows, numeric_from=9) +
                    "</section>")
    if artefacts:
        sections.append("<section><h2>Files of this run</h2>" +
                        _table(["what", "where"], [[k, v] for k, v in artefacts.items()], numeric_from=9) + "</section>")
    style = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1000px;color:#1f2328}
header{padding:8px 16px;background:#f6f8fa;border-radius:6px} h1{font-size:22px;margin:8px 0}
.headline{font-size:16px;font-weight:600} .meta,.note{color:#57606a;font-size:13px}
h2{font-size:17px;border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:28px} h3{font-size:14px;margin-top:18px}
table{border-collapse:collapse;font-size:14px} th,td{padding:4px 12px;border-bottom:1px solid #eaeef2;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums} svg{max-width:100%;height:auto}
pre{background:#f6f8fa;padding:8px;font-size:12px} .wide{overflow-x:auto} details>summary{cursor:pointer;color:#0969da;margin:8px 0}
"""
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>loadlab report · {html.escape(report['scenario'])}</title><style>{style}</style></head><body>"
            + "".join(sections) + "</body></html>")


def _sample_counts_note(report: dict) -> str:
    """Why a phase can have fewer samples than tasks: said when it does, with the numbers."""
    submitted, publish = report["tasks"]["submitted"], report["latency_ms"]["publish"]["count"]
    if publish >= submitted:
        return ""
    return (f"<p class='note'>publish has {publish:,} samples for {submitted:,} tasks submitted: a publish is timed "
            f"by the producer when apply_async returns, and one under way when the load stopped (Locust stops its "
            f"users mid-call) reached the broker, so the task counts as submitted and runs, without a publish time. "
            f"Tasks sent by producers loadlab does not instrument have none either.</p>")


def _backoff_count_note(retries: dict, tasks: dict) -> str:
    observed = sum(v["count"] for v in retries.get("backoff_by_retry_s", {}).values())
    if observed >= tasks["retried"]:
        return ""
    return (f"<p class='note'>{observed:,} backoff observations for {tasks['retried']:,} retries: a delay is observed "
            f"when both the failed attempt and the next attempt's start are in the ledger by the time the task "
            f"finishes. A retry whose record reaches the ledger after its task's final one (the retry is published "
            f"before its record is written, and a zero countdown can run it first) counts as a retry with no "
            f"observation.</p>")


def _backoff_rows(retries: dict) -> list[list]:
    policy = retries.get("policy", {})
    factor, ceiling = policy.get("backoff_factor_s"), policy.get("backoff_max_s")
    rows = []
    for retry, observed in retries.get("backoff_by_retry_s", {}).items():
        allowed = None
        if factor is not None and ceiling is not None:
            allowed = f"0 – {min(ceiling, factor * 2 ** (int(retry) - 1))}" if policy.get("jitter") else \
                f"{min(ceiling, factor * 2 ** (int(retry) - 1))}"
        rows.append([retry, observed["count"], observed["p50"], observed["p95"], observed["max"], allowed])
    return rows


def _promise(fault: dict) -> str:
    limit = fault["expected_max_lost"]
    return "no promise" if limit is None else ("none" if limit == 0 else f"≤ {limit}")


def _faults_section(chaos: dict) -> str:
    """Fault injection: per fault what was done, what the settings promise and what was lost."""
    rows = [[f["fault"], f["at_s"], f["detail"] or "", f["recovered_s"], _promise(f), f["lost"],
             "yes" if f["as_expected"] else "NO"] for f in chaos["faults"]]
    promises = "".join(f"<li><b>{html.escape(f['fault'])}</b>: {html.escape(f['expectation'])}</li>"
                       for f in chaos["faults"])
    lost_ids = "".join(f"<li><b>{html.escape(f['fault'])}</b>: {html.escape(', '.join(f['lost_ids']))}"
                       f"{' …' if f['lost'] > len(f['lost_ids']) else ''}</li>" for f in chaos["faults"] if f["lost_ids"])
    restarts = chaos.get("worker_restarts") or []
    notes = (f"<p class='note'>duplicates (a redelivered task run again, counted once): {chaos['duplicates']} · "
             f"lost after every fault (not attributable): {chaos['lost_after_every_fault']} · workers the watchdog "
             f"started again: {len(restarts)}</p>")
    return ("<section><h2>Fault injection</h2>" +
            _table(["fault", "at s", "what was done", "whole again after s", "settings promise (lost)", "lost",
                    "as promised"], rows, numeric_from=9) +
            notes + f"<p class='note'>What the settings promise:</p><ul class='note'>{promises}</ul>" +
            (f"<p class='note'>Lost task ids by fault:</p><ul class='note'>{lost_ids}</ul>" if lost_ids else "") +
            "</section>")


def _saturated(point: dict) -> str:
    return {True: "yes", False: "no"}.get(point.get("saturated"), "–")


def _usl_line(scaling: dict) -> str:
    usl = scaling.get("usl")
    if not usl:
        return f"No USL fit: {scaling.get('usl_note', '')}"
    peak = _fmt(usl["n_peak"]) if usl["n_peak"] is not None else "∞"
    return (f"USL fit: λ = {usl['lambda']:.2f}/s per unit, σ = {usl['sigma']:.4f}, κ = {usl['kappa']:.5f}, "
            f"peak N = {peak}, R² = {usl['r2']:.3f}")


def _sweep_markdown(report: dict) -> list[str]:
    """A sweep's head: what was swept and each point's capacity (its runs are not added up as one)."""
    scaling, s = report["scaling"], report["settings"]
    swept = scaling.get("swept") or {}
    tasks = report["tasks"]
    lines = [f"Sweep of {len(scaling['points'])} points ("
             + " × ".join(f"{k} {','.join(str(v) for v in values)}" for k, values in swept.items())
             + f"), {report['duration_s'] / max(1, len(scaling['points'])):.0f} s of load each · "
             f"{tasks['submitted']:,} submitted · {tasks['lost']:,} lost in all",
             "", "| N | workers | concurrency | pool | prefetch | completed/s | backlog growth /s | saturated | p95 ms "
                 "| lost |", "|---:|---:|---:|---|---:|---:|---:|---|---:|---:|"]
    for p in scaling["points"]:
        lines.append(f"| {p['n']} | {p['workers']} | {p['concurrency']} | {p['pool']} | {p['prefetch_multiplier']} | "
                     f"{p['completed_per_s']:.1f} | {_fmt(p.get('backlog_growth_per_s'))} | {_saturated(p)} | "
                     f"{p['p95_ms']:.1f} | {p.get('lost', 0)} |")
    fixed = " · ".join(f"{k} {s[k]}" for k in ("broker", "backend", "serializer", "compression", "tracing", "metrics")
                       if s.get(k) is not None)
    lines += ["", _usl_line(scaling) + ".", "", f"<sub>{fixed}</sub>", ""]
    return lines


def render_markdown(report: dict) -> str:
    tasks, lat = report["tasks"], report["latency_ms"]
    v = report.get("verdict", {"status": "pass", "problems": []})
    head = [f"### loadlab · `{report['scenario']}` · **{v['status'].upper()}**", ""]
    if report.get("scaling"):
        return "\n".join(head + _sweep_markdown(report) + (["Problems: " + "; ".join(v["problems"]) + "."]
                                                           if v["problems"] else []))
    lines = head + [
        f"{tasks['submitted']:,} submitted · {tasks['succeeded']:,} succeeded · {tasks['failed']:,} failed · "
        f"{tasks['retried']:,} retries · {tasks['lost']:,} lost · "
        f"{report['throughput']['completed_per_s']:.1f} completed/s over {report['duration_s']:.0f} s",
        "",
        "| phase | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for p in REPORT_PHASES:
        s = lat[p]
        lines.append(f"| {PHASE_LABELS[p]} | {s['p50']:.2f} | {s['p95']:.2f} | {s['p99']:.2f} | {s['max']:.2f} |")
    workflows = report.get("workflows")
    if workflows:
        lines += ["", "| workflow (root task) | count | tasks each | end-to-end p50 ms | p95 ms | max ms |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {name} | {n:,} | {sizes} | {p50:.2f} | {p95:.2f} | {top:.2f} |"
                  for name, n, sizes, _mean, p50, p95, _p99, top in workflow_rows(workflows)]
        lines += ["", f"{tasks.get('children', 0):,} of the submitted tasks were published by other tasks"
                      + (f"; {workflows['unfinished']:,} workflow(s) did not finish" if workflows["unfinished"]
                         else "") + "."]
    if v["problems"]:
        lines += ["", "Problems: " + "; ".join(v["problems"]) + "."]
    if v.get("notes"):
        lines += ["", "Accounted: " + "; ".join(v["notes"]) + "."]
    failed_tasks = report.get("failed_tasks") or []
    if failed_tasks:
        lines += ["", "| failed for good | task | exception | attempts |", "|---|---|---|---:|"]
        lines += [f"| `{f['id']}` | {f['task']} | {f['exception']} | {f['attempts']} |" for f in failed_tasks[:20]]
        if report["tasks"]["failed"] > 20:
            lines.append(f"| … {report['tasks']['failed'] - 20} more in report.json | | | |")
    if report.get("chaos"):
        lines += ["", "| fault | at s | promise (lost) | lost | as promised |", "|---|---:|---|---:|---|"]
        for f in report["chaos"]["faults"]:
            lines.append(f"| {f['fault']} | {f['at_s']:g} | {_promise(f)} | {f['lost']} | "
                         f"{'yes' if f['as_expected'] else '**NO**'} |")
    if report.get("gates"):
        lines += ["", "| gate | value | threshold | verdict |", "|---|---:|---:|---|"]
        for g in report["gates"]:
            lines.append(f"| `{g['rule']}` | {_fmt(g['value'])} | {_fmt(g['threshold'])} | "
                         f"{'pass' if g['passed'] else '**FAIL**'} |")
    little, arrivals, audit = report.get("littles_law"), report.get("arrivals"), report.get("backend_audit")
    notes = [littles_law_sentence(little)] if little else []
    notes += [arrivals_sentence(arrivals)] if arrivals else []
    notes += [audit_sentence(audit)] if audit else []
    if audit and audit["tasks"]:
        notes[-1] += " " + ", ".join(f"`{t['id']}` ({t['kind'].replace('_', ' ')})" for t in audit["tasks"][:10])
    for note in notes:
        lines += ["", note]
    s = report["settings"]
    lines += ["", f"<sub>broker {s['broker']} · backend {s['backend']} · {s['workers']}×{s['pool']}({s['concurrency']}) · "
                  f"serializer {s['serializer']} · compression {s['compression']}</sub>", ""]
    return "\n".join(lines)


def write_rendered(run_dir: Path, report: dict) -> None:
    run_dir = Path(run_dir)
    (run_dir / "report.html").write_text(render_html(report))
    (run_dir / "summary.md").write_text(render_markdown(report))
