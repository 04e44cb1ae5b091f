"""A short real `loadlab run`: the report's counts match the ledger and the run directory is complete."""
import json
import re
from pathlib import Path

import jsonschema
import pytest

from loadlab.reports.report import SCHEMA_PATH
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    result = run_cli("run", "smoke", "--duration", "8s", "--out", str(out), "--drain-timeout-s", "30", timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, json.loads((out / "report.json").read_text()), result.stdout


def test_counts_add_up(smoke_run):
    _, report, _ = smoke_run
    t = report["tasks"]
    assert t["submitted"] > 0
    assert t["submitted"] == t["succeeded"] + t["failed"] + t["revoked"] + t["lost"]
    assert t["lost"] == 0
    assert report["latency_ms"]["end_to_end"]["p95"] > 0
    assert report["latency_ms"]["end_to_end"]["count"] == t["succeeded"] + t["failed"] - t["reconciled"]
    assert report["locust"]["requests"] > 0


def test_locust_csv_counts_every_finished_task_including_the_drain(smoke_run):
    out, report, _ = smoke_run
    rows = _locust_rows(out / "locust" / "locust_stats.csv")
    finished = sum(int(row["Request Count"]) for row in rows if row["Name"].startswith("end_to_end "))
    t = report["tasks"]
    assert finished == t["succeeded"] + t["failed"] - t["reconciled"]
    assert report["duration_s"] < 8 + 2  # the load's duration, not stretched by users finishing their last task


def test_flaky_tasks_show_retries(smoke_run):
    _, report, _ = smoke_run
    retries = report["retries"]
    assert report["tasks"]["retried"] > 0 and retries["tasks_retried"] > 0
    # every finished task appears once in the attempts distribution
    assert sum(retries["attempts"].values()) == report["tasks"]["succeeded"] + report["tasks"]["failed"]
    # retried attempts add up: (attempts - 1) summed over tasks is the number of retries
    assert sum((int(k) - 1) * n for k, n in retries["attempts"].items()) <= report["tasks"]["retried"]
    assert retries["backoff_observed_s"]["max"] > 0
    # in the smoke mix only the flaky task can fail, and only by exhausting its retries
    assert retries["exhausted"] == report["tasks"]["failed"]


def test_run_directory_is_complete(smoke_run):
    out, report, stdout = smoke_run
    for name in ("report.json", "report.html", "summary.md", "settings.json", "locust/locust_stats.csv",
                 "locust/locust_stats_history.csv", "logs/worker1.log", "logs/api.log"):
        assert (out / name).is_file(), name
    jsonschema.validate(report, json.loads(SCHEMA_PATH.read_text()))
    html = (out / "report.html").read_text()
    assert "<svg" in html
    # self-contained: nothing is fetched at view time (namespace identifiers are not fetched)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?https?:|@import""", html)
    assert not re.findall(r"https?://(?!www\.w3\.org/)", html)
    assert str(out / "report.html") in stdout.replace("\n", "")
    locust_csv = (out / "locust" / "locust_stats.csv").read_text()
    assert "publish noop" in locust_csv and "end_to_end noop" in locust_csv and "/tasks/[id]" in locust_csv
    # every entry the run left in its directory is a row of the README's run directory table
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    described = {row.split("/")[0] for row in re.findall(r"^\| `([^`]+)` \|", readme, re.M)}
    left = {path.name for path in out.iterdir()}
    assert {"ports", "redis", "ledger-redis"} <= left
    assert left <= described, left - described


def test_phase_latencies_are_consistent(smoke_run):
    _, report, _ = smoke_run
    lat = report["latency_ms"]
    # the parts cannot exceed the whole: median queue wait and execution each stay below end-to-end p99
    assert lat["queue_wait"]["p50"] <= lat["end_to_end"]["p99"]
    assert lat["execution"]["p50"] <= lat["end_to_end"]["p99"]
    # cpu tasks burn 5 ms: the execution p95 over the mix is at least that
    assert report["latency_ms_extra"]["end_to_end_by_task"]["cpu"]["p50"] >= 5


def test_littles_law_the_arrivals_and_the_backend_audit(smoke_run):
    out, report, _ = smoke_run
    little = report["littles_law"]
    # L from the ledger's time integral against λW, within the tolerance the report states
    assert little["within_tolerance"] and abs(little["ratio"] - 1) <= little["tolerance"], little
    arrivals, t = report["arrivals"], report["tasks"]
    assert 0.9 * t["submitted"] <= arrivals["sends"] <= t["submitted"] and arrivals["interarrival_cv"] > 0, arrivals
    audit = report["backend_audit"]
    assert audit["audited"] == t["succeeded"] + t["failed"] and audit["error"] is None, audit
    assert audit["matching"] + audit["mismatches"] == audit["audited"]
    # a mismatch is the user's to hear about, with the ids in the audit: Celery's RETRY-after-SUCCESS race as a note
    # of the verdict (a healthy stack has it), any other kind as a problem
    race = audit["by_kind"].get("retry_after_success", 0)
    verdict = report["verdict"]
    assert (race > 0) == any("stored as RETRY" in n for n in verdict["notes"])
    assert (audit["mismatches"] - race > 0) == any("result backend" in p for p in verdict["problems"])
    # designed failures of the reference mix are accounted, not problems
    designed = [f for f in report["failed_tasks"] if f["task"].endswith("flaky") and f["exception"] == "FlakyError"]
    assert (len(designed) > 0) == any("as the reference mix is designed to" in n for n in verdict["notes"])
    assert not any("failed for good" in p for p in verdict["problems"]) or t["failed"] > len(designed)
    assert len(audit["tasks"]) == min(audit["mismatches"], 100)
    summary = (out / "summary.md").read_text()
    assert "Little's law" in summary and "inter-arrival CV" in summary and "Result backend audit" in summary


def _locust_rows(path):
    import csv

    with open(path) as handle:
        return [row for row in csv.DictReader(handle) if row["Name"] != "Aggregated"]


def test_distributed_run_counts_equal_the_ledger(run_dir):
    out = run_dir / "dist"
    result = run_cli("run", "smoke", "--duration", "6s", "--locust-workers", "2", "--out", str(out), timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    t = report["tasks"]
    assert t["submitted"] > 0 and t["lost"] == 0
    assert t["submitted"] == t["succeeded"] + t["failed"] + t["revoked"] + t["lost"]
    rows = _locust_rows(out / "locust" / "locust_stats.csv")
    publishes = sum(int(r["Request Count"]) - int(r["Failure Count"]) for r in rows if r["Name"].startswith("publish"))
    api_submits = sum(int(r["Request Count"]) - int(r["Failure Count"]) for r in rows
                      if r["Type"] == "POST" and r["Name"].startswith("/tasks/"))
    # every publish of both Locust worker processes reached the one ledger. Locust may miss the last few: a user
    # stopped between the broker accepting a message and Locust logging it is in the ledger only
    assert 0.97 * t["submitted"] <= publishes + api_submits <= t["submitted"]
    finished = sum(int(r["Request Count"]) for r in rows if r["Name"].startswith("end_to_end"))
    assert finished == t["succeeded"] + t["failed"]  # fired by the master's recorder from the ledger itself
    assert (out / "logs" / "locust-worker2.log").exists()
