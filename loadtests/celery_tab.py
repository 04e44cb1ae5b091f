"""The Celery tab's figures, apart from the web UI that serves them (importing Locust patches the process with
gevent): the JSON the tab draws from the recorder and the monitor's snapshot, and the rows of its table."""
from __future__ import annotations

import time
from contextlib import nullcontext

from loadlab.reports.recorder import REPORT_PHASES, histogram_stats_ms

CHART_POINTS = 300  # samples per chart line: five minutes at one per second
PHASE_LABELS = {"publish": "publish", "queue_wait": "queue wait", "execution": "execution",
                "end_to_end": "end to end"}


def celery_stats(recorder, monitor, since: float, window: dict | None = None) -> dict:
    """The JSON the tab shows: broker and worker state from the monitor's cache, task counts and phase latency
    percentiles from the recorder (the current window's, see ``SwarmWindows.window_info`` for ``window``)."""
    out: dict = {"since": since, "at": time.time(), "window": window}
    out.update(monitor.snapshot() if monitor is not None else {"queue": None, "workers": None})
    if recorder is None:
        out.update({"tasks": None, "retries": None, "latency_ms": None})
        return out
    with getattr(recorder, "_lock", None) or nullcontext():
        c = recorder.counts
        out["tasks"] = {"submitted": c["submitted"], "succeeded": c["succeeded"], "failed": c["failed"],
                        "revoked": c["revoked"], "rejected": c["rejected"], "in_flight": recorder.outstanding,
                        "children": c["children"]}
        out["retries"] = {"retried": c["retried"], "tasks_retried": recorder.tasks_retried,
                          "exhausted": recorder.exhausted}
        out["latency_ms"] = {phase: histogram_stats_ms(recorder.histograms[phase]) for phase in REPORT_PHASES}
        # per task name and per worker: the report's latency_ms_by_task, and the attempts each worker finished
        out["by_task"] = {name: {"states": dict(sorted(recorder.per_task_states.get(name, {}).items())),
                                 "end_to_end_ms": histogram_stats_ms(hist)}
                          for name, hist in sorted(recorder.per_task.items())}
        out["by_worker"] = {host: dict(sorted(states.items()))
                            for host, states in sorted(recorder.per_worker_states.items())}
        # tasks that tasks published (chain, group, chord): the report's workflows section, live
        out["workflows"] = recorder.workflow_summary()
        series = recorder.series
        out["series"] = {"start": series.start, "rows": series.rows()[-CHART_POINTS:]} if series else None
    if monitor is not None:
        out["queue_history"] = [[at, depth, unacked] for at, depth, unacked in list(monitor.queue_history)
                                if at >= since]
    return out


def table_rows(stats: dict) -> list[dict]:
    rows: list[dict] = []

    # no "name" key: the UI sorts rows by "name" unless a column header is clicked, and this order is meant
    def row(metric, value="", p50="", p95="", p99="", maximum=""):
        rows.append({"metric": metric, "value": value, "p50": p50, "p95": p95, "p99": p99, "max": maximum})

    workers = stats.get("workers")
    if workers is not None:
        up = workers["up"]
        value = up if workers["expected"] is None or up is None else f"{up} / {workers['expected']}"
        row("Workers up", _or_error(value, workers["error"]))
    queue = stats.get("queue")
    if queue is not None:
        row(f"Queue depth ({queue['name']})", _or_error(queue["depth"], queue["error"]))
        if queue.get("unacked") is not None:
            row("Unacked (delivered, not acknowledged)", queue["unacked"])
    tasks = stats.get("tasks")
    if tasks is not None:
        for key in ("submitted", "succeeded", "failed", "in_flight", "revoked", "rejected"):
            row(f"Tasks {key.replace('_', ' ')}", tasks[key])
        if tasks.get("children"):
            row("Tasks published by tasks", tasks["children"])
        r = stats["retries"]
        row("Retries (attempts retried)", r["retried"])
        row("Tasks that retried", r["tasks_retried"])
        row("Retries exhausted", r["exhausted"])
        for phase, lat in stats["latency_ms"].items():
            label = f"Latency {PHASE_LABELS.get(phase, phase)} (samples)"
            if lat["count"]:
                row(label, lat["count"], *(round(lat[k], 1) for k in ("p50", "p95", "p99", "max")))
            else:
                row(label, 0)
    workflows = stats.get("workflows")
    if workflows is not None:
        # over all roots, then per root task name when there are several
        by_root = list(workflows["by_root"].items()) if len(workflows["by_root"]) > 1 else []
        for name, figures in [(None, workflows), *by_root]:
            lat = figures["end_to_end_ms"]
            label = "Workflows finished, first publish to last result" + (f" ({name})" if name else "")
            percentiles = [round(lat[k], 1) for k in ("p50", "p95", "p99", "max")] if lat["count"] else []
            row(label, figures["count"], *percentiles)
        if workflows["unfinished"]:
            row("Workflows unfinished", workflows["unfinished"])
    window = stats.get("window")
    if window is not None:
        row("Swarm", window["swarm"] if window["swarm"] is not None else "none running")
    if stats.get("since"):
        # like Locust's own tables: counts restart with every new swarm and with "Reset stats"
        since = time.strftime("%H:%M:%S", time.gmtime(stats["since"]))
        if window is not None:
            since += {"test_start": " (swarm start)", "reset_stats": " (Reset stats)", "ui_start": " (UI start)"}.get(
                window["counted_from"], "")
        row("Counted since (UTC)", since)
    if window is not None and window.get("report_status"):
        row("Report", window["report_status"])
    for earlier in (window or {}).get("earlier_swarms_draining") or ():
        row(f"Swarm {earlier['swarm']} (stopped)", f"draining: {earlier['in_flight']} in flight, then its report")
    return rows


def _or_error(value, error):
    if error:
        return f"unavailable ({error})"
    return "…" if value is None else value
