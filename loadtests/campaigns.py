"""Campaigns of several real runs: a scaling sweep (one run per point, USL fit) and in-band serialization runs
(one run per serializer and payload size). Each point is a complete ``loadlab run`` in a subdirectory."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

from rich.console import Console

from loadlab.config.settings import Settings
from loadlab.loadtests.headless import execute_run
from loadlab.reports.report import REPORT_FILE
from loadlab.reports.scaling import usl_section

EXIT_OK, EXIT_FAILED = 0, 1


def run_sweep(base: Settings, out: Path, console: Console, *, workers: list[int], concurrency: list[int],
              prefetch: list[int], pools: list[str], scenario=None) -> dict:
    """One real run per point; warm-up excluded, the steady window measured; USL fit over N = workers × concurrency.
    ``scenario``: a Scenario to run instead of the settings' named one."""
    points = []
    for index, (n_workers, conc, pf, pool) in enumerate(itertools.product(workers, concurrency, prefetch, pools)):
        settings = base.model_copy(update={"workers": n_workers, "concurrency": conc, "prefetch_multiplier": pf,
                                           "pool": pool})
        label = f"{index + 1:02d}-w{n_workers}-c{conc}-p{pf}-{pool}"
        console.rule(f"sweep point {label}")
        report = _point_run_scenario(settings, out / "points" / label, console, scenario)
        if report is None:
            raise RuntimeError(f"sweep point {label} did not run; see {out / 'points' / label}")
        points.append(sweep_point(report, n_workers, conc, pf, pool, f"points/{label}"))
    swept = {"workers": workers, "concurrency": concurrency, "prefetch_multiplier": prefetch, "pool": pools}
    return {"swept": swept, "points": points, **usl_section(points)}


def sweep_point(report: dict, workers: int, concurrency: int, prefetch: int, pool: str, run_dir: str) -> dict:
    """A point of a sweep from its run's report: the steady window's completion rate (every task that finished in
    it, whatever its send time) with the backlog's growth beside it."""
    steady = report.get("steady") or {}
    return {
        "workers": workers, "concurrency": concurrency, "pool": pool, "prefetch_multiplier": prefetch,
        "n": workers * concurrency,
        "completed_per_s": steady.get("completed_per_s", report["throughput"]["completed_per_s"]),
        "backlog_growth_per_s": steady.get("backlog_growth_per_s"), "saturated": steady.get("saturated"),
        "p95_ms": (steady.get("end_to_end_ms") or report["latency_ms"]["end_to_end"])["p95"],
        "lost": report["tasks"]["lost"], "run_dir": run_dir,
    }


def sweep_settings(base_masked: dict, scaling: dict) -> dict:
    """settings.json of a sweep: what was swept, the settings every point shared, and each point's run."""
    swept = scaling["swept"]
    shared = {k: v for k, v in base_masked.items() if k not in swept}
    for key in ("broker", "backend"):
        if shared.get(key) is None:
            shared[key] = "embedded Redis (a new one for each point)"
    return {"sweep": swept, "shared": shared,
            "points": [{"n": p["n"], "workers": p["workers"], "concurrency": p["concurrency"], "pool": p["pool"],
                        "prefetch_multiplier": p["prefetch_multiplier"],
                        "settings": f"{p['run_dir']}/settings.json"} for p in scaling["points"]]}


SHARE_MEASURED, SHARE_OFFLINE = "measured", "offline_estimate"


def run_serialization_inband(base: Settings, out: Path, console: Console, *, serializers: list[str],
                             sizes: list[int], shape: str, offline_rows: list[dict]) -> list[dict]:
    """One real run per serializer and payload size (payload task echoing its body): throughput, end-to-end latency,
    and the share of it spent serializing (see :func:`inband_row`)."""
    from loadlab.loadtests.scenarios import Scenario, TaskChoice

    rows = []
    for serializer, size in itertools.product(serializers, sizes):
        scenario = Scenario(f"payload-{serializer}-{size}", f"payload task, {size} B {shape}, {serializer}",
                            users=4, spawn_rate=4, duration_s=base.duration or 10, rate_per_user=10,
                            mix=(TaskChoice("payload", 1, {"size_bytes": size, "shape": shape}),))
        settings = base.model_copy(update={"serializer": serializer})
        label = f"{serializer}-{size}"
        console.rule(f"in-band run {label}")
        report = _point_run_scenario(settings, out / "inband" / label, console, scenario)
        if report is None:
            raise RuntimeError(f"in-band run {label} did not run; see {out / 'inband' / label}")
        rows.append({**inband_row(report, serializer, size, shape, offline_rows), "run_dir": f"inband/{label}"})
    return rows


def inband_row(report: dict, serializer: str, size: int, shape: str, offline_rows: list[dict]) -> dict:
    """One in-band run's row. The share of end-to-end time spent serializing is
    ``serialization_ms_per_task / end_to_end_mean_ms`` — against the **mean** end-to-end latency, for both sources,
    so that it is the share of all tasks' end-to-end time (sum of serializing time / sum of end-to-end time).

    ``serialization_share_source`` says where the numerator comes from:

    * ``measured`` (metrics on): the run's own ``celery_task_serialization_seconds`` histograms of ``serializer``
      (encode in the producer; decode in the worker, where Celery decodes a task message in the main process and
      again in the pool child; the result's encode; result decodes wherever results are read), summed over every
      process's final scrape: their ``_sum`` (encode + decode seconds) / tasks submitted. A fresh worker's first
      decodes carry one-off costs (lazy imports), which weigh on short runs;
    * ``offline_estimate`` (the run had metrics off, or its histograms counted nothing): the offline matrix's
      uncompressed p50s for this serializer, shape and size, the request and the result each encoded and decoded
      once: 2 × (encode p50 + decode p50).
    """
    e2e = report["latency_ms"]["end_to_end"]
    tasks = report["tasks"]["submitted"]
    measured = ((report.get("serialization_measured") or {}).get("by_serializer") or {}).get(serializer) or {}
    encode, decode = measured.get("encode") or {}, measured.get("decode") or {}
    per_task_ms = source = None
    per_task = {"encodes_per_task": None, "decodes_per_task": None, "message_bytes_per_task": None}
    if tasks and (encode.get("count") or decode.get("count")):
        per_task_ms = round((encode.get("seconds", 0.0) + decode.get("seconds", 0.0)) / tasks * 1000, 6)
        source = SHARE_MEASURED
        per_task = {"encodes_per_task": round(encode.get("count", 0) / tasks, 3),
                    "decodes_per_task": round(decode.get("count", 0) / tasks, 3),
                    "message_bytes_per_task": round((encode.get("bytes", 0) + decode.get("bytes", 0)) / tasks, 1)}
    else:
        offline = next((r for r in offline_rows if r["serializer"] == serializer and r["compression"] == "none"
                        and r.get("shape") == shape and r["payload_bytes"] == size), None)
        if offline:
            per_task_ms = round(2 * (offline["encode_us"]["p50"] + offline["decode_us"]["p50"]) / 1000, 6)
            source = SHARE_OFFLINE
    share = round(per_task_ms / e2e["mean"], 4) if per_task_ms is not None and e2e["mean"] else None
    return {"serializer": serializer, "payload_bytes": size, "shape": shape,
            "completed_per_s": report["throughput"]["completed_per_s"],
            "end_to_end_p50_ms": e2e["p50"], "end_to_end_p95_ms": e2e["p95"], "end_to_end_mean_ms": e2e["mean"],
            "serialization_ms_per_task": per_task_ms, **per_task,
            "serialization_share": share, "serialization_share_source": source,
            "metrics": report.get("settings", {}).get("metrics")}


def _point_run_scenario(settings: Settings, run_dir: Path, console: Console, scenario) -> dict | None:
    # a saturated point may end with tasks lost at the drain deadline (a FAIL verdict, exit 1): its report still
    # measures the point; only a point that wrote none did not run
    execute_run(settings, run_dir, console=console, scenario=scenario)
    report = run_dir / REPORT_FILE
    return json.loads(report.read_text()) if report.is_file() else None
