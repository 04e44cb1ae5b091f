"""Builds ``report.json`` (the record of a run) and writes the run directory. Field names live here and in
``reports/schema/report.schema.json``; ``tests/test_report_schema.py`` keeps the two in step."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from reports.recorder import REPORT_PHASES

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).parent / "schema" / "report.schema.json"
SETTINGS_IN_REPORT = ("broker", "backend", "serializer", "compression", "pool", "concurrency", "workers",
                      "prefetch_multiplier", "acks_late", "tracing", "metrics")


def iso_utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def build_report(*, scenario: str, settings_masked: dict, started_at: float, load_stopped_at: float,
                 recorded: dict, locust: dict, retry_policy: dict, drained: bool, extra: dict | None = None) -> dict:
    duration_s = max(1e-9, load_stopped_at - started_at)
    tasks = recorded["tasks"]
    report = {
        "schema_version": SCHEMA_VERSION,
        "scenario": scenario,
        "started_at": iso_utc(started_at),
        "duration_s": round(duration_s, 3),
        "settings": {key: settings_masked.get(key) for key in SETTINGS_IN_REPORT},
        "tasks": tasks,
        "throughput": {
            "submitted_per_s": round(tasks["submitted"] / duration_s, 3),
            "completed_per_s": recorded["completed_per_s"],
        },
        "latency_ms": {phase: recorded["latency_ms"][phase] for phase in REPORT_PHASES},
        "latency_ms_extra": {"result_store": recorded["latency_ms"]["result_store"],
                             "end_to_end_by_task": recorded["latency_ms_by_task"]},
        "retries": {**{k: v for k, v in recorded["retries"].items()}, "policy": retry_policy},
        "serialization": [],
        "locust": locust,
        "drain": {"completed": drained, "lost_ids": recorded["lost_ids"]},
        "timeseries": recorded["timeseries"],
        "histograms_hdr": recorded["histograms"],
        "verdict": verdict(tasks, drained),
    }
    if extra:
        report.update(extra)
    return report


def verdict(tasks: dict, drained: bool) -> dict:
    problems = []
    if tasks["lost"]:
        problems.append(f"{tasks['lost']} task(s) lost (not finished by the drain deadline)")
    if tasks["failed"]:
        problems.append(f"{tasks['failed']} task(s) failed for good")
    if tasks["submitted"] == 0:
        problems.append("no task was submitted")
    status = "fail" if tasks["lost"] or tasks["submitted"] == 0 else ("warn" if problems else "pass")
    return {"status": status, "problems": problems}


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def load_report(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "report.json").read_text())
