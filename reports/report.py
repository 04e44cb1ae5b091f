"""Builds ``report.json`` (the record of a run) and writes the run directory. What a report may hold is the model
in ``loadlab.reports.model`` (``reports/schema/report.schema.json`` is generated from it)."""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

from loadlab.reports.backend_audit import problem as audit_problem
from loadlab.reports.numbers import short_number
from loadlab.reports.recorder import REPORT_PHASES
from loadlab.stack.tasks import FlakyError, full_name

SCHEMA_VERSION = 1
REPORT_FILE = "report.json"  # in every run directory (and each swarm-NNN/ of the web UI)
SCHEMA_PATH = Path(__file__).parent / "schema" / "report.schema.json"
SETTINGS_IN_REPORT = ("broker", "backend", "serializer", "compression", "pool", "concurrency", "workers",
                      "prefetch_multiplier", "acks_late", "tracing", "metrics")


def serialization_totals(text: str) -> dict:
    """Totals of the serialization histograms in one Prometheus exposition (a ``metrics/*.prom`` file):
    ``{serializer: {direction: {"count", "seconds", "bytes"}}}`` from ``celery_task_serialization_seconds``'s
    ``_count``/``_sum`` and ``celery_task_message_bytes``'s ``_sum`` (names from ``loadlab.exporters.metrics``)."""
    from prometheus_client.parser import text_string_to_metric_families

    from loadlab.exporters.metrics import MESSAGE_BYTES, SERIALIZATION

    fields = {SERIALIZATION.name + "_count": "count", SERIALIZATION.name + "_sum": "seconds",
              MESSAGE_BYTES.name + "_sum": "bytes"}
    totals: dict = {}
    for family in text_string_to_metric_families(text):
        if family.name not in (SERIALIZATION.name, MESSAGE_BYTES.name):
            continue
        for sample in family.samples:
            field_name = fields.get(sample.name)
            if field_name is None:
                continue
            slot = totals.setdefault(sample.labels.get("serializer", "?"), {}).setdefault(
                sample.labels.get("direction", "?"), {"count": 0, "seconds": 0.0, "bytes": 0.0})
            slot[field_name] += sample.value
    return totals


def measured_serialization(scrapes: dict[str, Path], baselines: dict[str, dict] | None = None) -> dict:
    """The serialization a run measured: every process's final scrape (name -> ``.prom`` file) summed, minus the
    counts a process already had before the run (``baselines``: the load generator, which outlives the runs of a
    campaign; the stack's processes are new for each run). Only serializers and directions that counted anything."""
    baselines = baselines or {}
    by_process: dict = {}
    for name, path in scrapes.items():
        try:
            totals = serialization_totals(Path(path).read_text())
        except (OSError, ValueError):
            continue
        before = baselines.get(name, {})
        entry = {}
        for serializer, directions in totals.items():
            for direction, slot in directions.items():
                base = before.get(serializer, {}).get(direction, {})
                count = max(0, int(round(slot["count"] - base.get("count", 0))))
                if count:
                    entry.setdefault(serializer, {})[direction] = {
                        "count": count, "seconds": round(max(0.0, slot["seconds"] - base.get("seconds", 0.0)), 6),
                        "bytes": int(round(max(0.0, slot["bytes"] - base.get("bytes", 0.0))))}
        if entry:
            by_process[name] = entry
    by_serializer: dict = {}
    for entry in by_process.values():
        for serializer, directions in entry.items():
            for direction, slot in directions.items():
                total = by_serializer.setdefault(serializer, {}).setdefault(
                    direction, {"count": 0, "seconds": 0.0, "bytes": 0})
                total["count"] += slot["count"]
                total["seconds"] = round(total["seconds"] + slot["seconds"], 6)
                total["bytes"] += slot["bytes"]
    return {"by_serializer": by_serializer, "by_process": by_process}


def iso_utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def build_report(*, scenario: str, settings_masked: dict, started_at: float, load_stopped_at: float,
                 recorded: dict, locust: dict, retry_policy: dict, drained: bool, extra: dict | None = None,
                 retry_policies: dict | None = None) -> dict:
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
        "retries": {**{k: v for k, v in recorded["retries"].items()}, "policy": retry_policy,
                    **({"policies": retry_policies} if retry_policies is not None else {})},
        "serialization": [],
        "locust": locust,
        "drain": {"completed": drained, "lost_ids": recorded["lost_ids"]},
        "workflows": recorded.get("workflows"),
        "failed_tasks": recorded.get("failed", []),
        "steady": recorded.get("steady"),
        "timeseries": recorded["timeseries"],
        "timeseries_load_stopped_s": recorded.get("load_stopped_s"),
        "histograms_hdr": recorded["histograms"],
        "verdict": verdict(tasks, drained, recorded.get("failed", [])),
    }
    report["littles_law"] = recorded.get("littles_law")
    report["arrivals"] = recorded.get("arrivals")
    if extra:
        report.update(extra)
    mismatch, race = audit_problem(report.get("backend_audit"))
    if race:  # Celery's own race, on a healthy stack too: said, not a problem of the run
        report["verdict"]["notes"].append(race)
    if mismatch:
        report["verdict"]["problems"].append(mismatch)
        if report["verdict"]["status"] == "pass":
            report["verdict"]["status"] = "warn"
    interrupted = report.get("interrupted")
    if interrupted:
        report["verdict"]["problems"].insert(0, (
            f"interrupted by {interrupted['signal']} during the {interrupted['during']}, "
            f"{interrupted['at_s']:g}s into {interrupted['load_duration_s']:g}s of load"
            + (", the drain skipped" if interrupted.get("drain_skipped") else "")
            + ": the figures cover what ran"))
        if report["verdict"]["status"] == "pass":
            report["verdict"]["status"] = "warn"
    return report


def designed_failure(failed_task: dict) -> bool:
    """A failure the reference mix is built to have: the ``flaky`` task using up its retries with its own error."""
    return failed_task.get("task") == FLAKY_TASK and failed_task.get("exception") == FlakyError.__name__


def verdict(tasks: dict, drained: bool, failed_tasks: list[dict] = ()) -> dict:
    """The ledger's verdict. Failures the reference mix is designed to have (``designed_failure``) are accounted as
    such in ``notes``, not problems: a healthy stack runs them in about one smoke run in three. Only the failures
    listed one by one can be told apart; any beyond the list count as problems."""
    problems, notes = [], []
    if tasks["lost"]:
        problems.append(f"{tasks['lost']} task(s) lost (not finished by the drain deadline)")
    designed = sum(1 for task in failed_tasks if designed_failure(task))
    if tasks["failed"] - designed:
        problems.append(f"{tasks['failed'] - designed} task(s) failed for good")
    if designed:
        notes.append(f"{designed} flaky task(s) used up their retries with {FlakyError.__name__}, as the reference "
                     f"mix is designed to (each attempt fails with its p)")
    if tasks["submitted"] == 0:
        problems.append("no task was submitted")
    status = "fail" if tasks["lost"] or tasks["submitted"] == 0 else ("warn" if problems else "pass")
    return {"status": status, "problems": problems, "notes": notes}


GATE_PROBLEM = "gate failed: "
FLAKY_TASK = full_name("flaky")


def verdict_with_gates(current: dict, gates: list[dict]) -> dict:
    """The run's verdict once its gates are known: a failed gate fails the run (the header of report.html and
    summary.md must not say PASS above a failed gate). Problems of earlier gate evaluations are replaced, so gating
    a run again with other rules recomputes the verdict from the ledger's part of it."""
    problems = [p for p in current.get("problems", []) if not p.startswith(GATE_PROBLEM)]
    status = current.get("ledger_status", current.get("status", "pass"))
    failed = [g for g in gates if not g.get("passed")]
    problems += [f"{GATE_PROBLEM}{g['rule']} (value {short_number(g.get('value'))}, threshold "
                 f"{short_number(g.get('threshold'))})" for g in failed]
    return {"status": "fail" if failed else status, "problems": problems, "notes": current.get("notes", []),
            "ledger_status": status}


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


class ReportVersionError(ValueError):
    """A report.json this loadlab does not read: one sentence saying which version it is and what to do."""


def version_problem(data: dict, path: Path) -> str | None:
    """The sentence for a report of a version this loadlab does not read, else None."""
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version == SCHEMA_VERSION:
        return None
    if isinstance(version, int) and version > SCHEMA_VERSION:
        return (f"{path} is a report of schema version {version}, newer than this loadlab reads "
                f"({SCHEMA_VERSION}); read it with the loadlab that wrote it, or upgrade loadlab.")
    return (f"{path} has schema_version {version!r}, not a report version this loadlab reads ({SCHEMA_VERSION}); "
            "run the scenario again to get a report of this version.")


def load_report(run_dir: Path) -> dict:
    path = Path(run_dir) / REPORT_FILE
    data = json.loads(path.read_text())
    problem = version_problem(data, path)
    if problem:
        raise ReportVersionError(problem)
    return data


def merge_reports(reports: list[dict], *, scenario: str, settings_masked: dict) -> dict:
    """One report for several runs (a sweep, in-band serialization runs): ledgers summed, latency histograms merged
    from their HDR encodings, so percentiles are those of all tasks and not averages of percentiles."""
    from hdrh.histogram import HdrHistogram

    from loadlab.reports.recorder import histogram_stats_ms, merge_workflow_summaries, new_histogram

    first = reports[0]
    tasks = {k: sum(r["tasks"].get(k, 0) for r in reports) for k in first["tasks"]}
    latency = {}
    for phase in REPORT_PHASES:
        merged = new_histogram()
        for r in reports:
            encoded = r.get("histograms_hdr", {}).get(phase)
            if encoded:
                merged.add(HdrHistogram.decode(encoded))
        latency[phase] = histogram_stats_ms(merged)
    duration = sum(r["duration_s"] for r in reports)
    attempts: dict[str, int] = {}
    for r in reports:
        for k, n in r["retries"]["attempts"].items():
            attempts[k] = attempts.get(k, 0) + n
    return {
        "schema_version": SCHEMA_VERSION,
        "scenario": scenario,
        "started_at": first["started_at"],
        "duration_s": round(duration, 3),
        "settings": {key: settings_masked.get(key) for key in SETTINGS_IN_REPORT},
        "tasks": tasks,
        "throughput": {"submitted_per_s": round(tasks["submitted"] / duration, 3) if duration else 0.0,
                       "completed_per_s": round((tasks["succeeded"] + tasks["failed"]) / duration, 3) if duration else 0.0},
        "latency_ms": latency,
        "retries": {"tasks_retried": sum(r["retries"]["tasks_retried"] for r in reports), "attempts": attempts,
                    "exhausted": sum(r["retries"]["exhausted"] for r in reports),
                    "backoff_observed_s": first["retries"]["backoff_observed_s"], "policy": first["retries"]["policy"]},
        "serialization": [],
        "locust": {k: sum(r["locust"][k] for r in reports) for k in ("requests", "failures", "rps")},
        "verdict": verdict(tasks, all(r.get("drain", {}).get("completed", True) for r in reports)),
        "workflows": merge_workflow_summaries([r["workflows"] for r in reports if r.get("workflows")]),
    }


def empty_report(scenario: str, settings_masked: dict) -> dict:
    """A report with no load (an offline-only analysis): every ledger count zero."""
    from loadlab.reports.recorder import histogram_stats_ms, new_histogram

    zero = histogram_stats_ms(new_histogram())
    return {
        "schema_version": SCHEMA_VERSION, "scenario": scenario, "started_at": iso_utc(time.time()), "duration_s": 0.0,
        "settings": {key: settings_masked.get(key) for key in SETTINGS_IN_REPORT},
        "tasks": {k: 0 for k in ("submitted", "succeeded", "failed", "revoked", "retried", "lost", "pending_at_end")},
        "throughput": {"submitted_per_s": 0.0, "completed_per_s": 0.0},
        "latency_ms": {phase: dict(zero) for phase in REPORT_PHASES},
        "retries": {"tasks_retried": 0, "attempts": {}, "exhausted": 0,
                    "backoff_observed_s": {"p50": 0.0, "p95": 0.0, "max": 0.0}, "policy": {}},
        "serialization": [], "locust": {"requests": 0, "failures": 0, "rps": 0.0},
        "verdict": {"status": "pass", "problems": []},
    }
