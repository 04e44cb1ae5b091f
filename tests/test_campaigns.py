"""Multi-run campaigns: a real two-point sweep and a small serialization comparison, end to end through the CLI."""
import json
import re

import jsonschema
import pytest

from loadlab.reports.report import SCHEMA_PATH
from tests.conftest import run_cli


def _self_contained(html: str) -> bool:
    return not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?https?:|@import""", html) and \
        not re.findall(r"https?://(?!www\.w3\.org/)", html)


def test_two_point_sweep_produces_a_scaling_section(tmp_path):
    out = tmp_path / "sweep"
    result = run_cli("sweep", "--workers", "1,2", "--duration", "4s", "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, json.loads(SCHEMA_PATH.read_text()))
    points = report["scaling"]["points"]
    assert [p["workers"] for p in points] == [1, 2]
    assert all(p["completed_per_s"] > 0 for p in points)
    # two points cannot carry a three-parameter fit: the report says so instead of inventing one
    assert report["scaling"]["usl"] is None and "4" in report["scaling"]["usl_note"]
    # the merged ledger is the sum of the points' ledgers
    point_reports = [json.loads((out / p["run_dir"] / "report.json").read_text()) for p in points]
    assert report["tasks"]["submitted"] == sum(r["tasks"]["submitted"] for r in point_reports)
    html = (out / "report.html").read_text()
    assert "Scaling" in html and "<svg" in html and _self_contained(html)


def test_serialization_command_writes_matrix_and_inband_rows(tmp_path):
    out = tmp_path / "ser"
    result = run_cli("serialization", "--serializers", "json,msgpack", "--sizes", "100,1000", "--shapes",
                     "flat_strings", "--compressions", "none,zlib", "--budget-s", "2", "--inband-sizes", "1000",
                     "--duration", "3s", "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    combos = {(r["serializer"], r["compression"], r["payload_bytes"]) for r in report["serialization"]}
    assert combos == {(s, c, n) for s in ("json", "msgpack") for c in ("none", "zlib") for n in (100, 1000)}
    assert {r["serializer"] for r in report["serialization_inband"]} == {"json", "msgpack"}
    assert all(r["completed_per_s"] > 0 for r in report["serialization_inband"])
    jsonschema.validate(report, json.loads(SCHEMA_PATH.read_text()))
    for row in report["serialization_inband"]:
        _assert_share_is_measured(out, row)
    html = (out / "report.html").read_text()
    assert "Serialization cost" in html and "Serialization in band" in html
    # the matrix is drawn, not only tabled: serializer cost, wire size and cost by compression
    assert "<svg" in html and "serializer cost (no compression)" in html and _self_contained(html)
    # the table says, row by row, where its share came from
    assert html.count("measured (this run&#x27;s histograms)</td>") == 2
    assert "offline estimate (metrics off)" not in html


def _prom_totals(path, serializer: str) -> tuple[float, float]:
    """(encode + decode seconds, encode + decode count) of ``serializer`` in one final scrape, read independently."""
    from prometheus_client.parser import text_string_to_metric_families

    from loadlab.exporters.metrics import SERIALIZATION

    seconds = count = 0.0
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            if sample.labels.get("serializer") != serializer:
                continue
            if sample.name == SERIALIZATION.name + "_sum":
                seconds += sample.value
            elif sample.name == SERIALIZATION.name + "_count":
                count += sample.value
    return seconds, count


def _assert_share_is_measured(out, row: dict) -> None:
    """The in-band share comes from the run's own serialization histograms: the .prom files of its run directory."""
    assert row["serialization_share_source"] == "measured" and row["metrics"] == "on", row
    run = json.loads((out / row["run_dir"] / "report.json").read_text())
    tasks = run["tasks"]["submitted"]
    assert tasks > 0 and row["end_to_end_mean_ms"] == run["latency_ms"]["end_to_end"]["mean"]
    proms = {p.stem: p for p in (out / row["run_dir"] / "metrics").glob("*.prom")}
    workers = [name for name in proms if name.startswith("w1.")]
    assert workers and "loadgen" in proms, sorted(proms)
    # the stack's processes are new for each run: their files are this run's counts. The load generator (the CLI
    # process) outlives the runs: its file holds everything it counted since it started, this run's part included
    stack_seconds = sum(_prom_totals(p, row["serializer"])[0] for name, p in proms.items() if name != "loadgen")
    own_seconds, own_count = _prom_totals(proms["loadgen"], row["serializer"])
    measured_ms = row["serialization_ms_per_task"]
    assert stack_seconds / tasks * 1000 - 1e-6 <= measured_ms <= (stack_seconds + own_seconds) / tasks * 1000 + 1e-6
    assert own_count >= tasks  # the producer encoded every task message it sent
    # every task: its message encoded in the producer, decoded in the worker, its result encoded in the worker
    assert row["encodes_per_task"] >= 2 and row["decodes_per_task"] >= 1
    assert row["serialization_share"] == pytest.approx(measured_ms / row["end_to_end_mean_ms"], abs=1e-4)
    assert 0 < row["serialization_share"] < 1
    by_process = run["serialization_measured"]["by_process"]
    assert by_process[workers[0]][row["serializer"]]["decode"]["count"] >= tasks
    assert by_process["loadgen"][row["serializer"]]["encode"]["count"] >= tasks


def test_serialization_share_falls_back_to_the_offline_matrix_without_metrics(tmp_path):
    out = tmp_path / "ser-off"
    result = run_cli("serialization", "--serializers", "json", "--sizes", "1000", "--shapes", "flat_strings",
                     "--compressions", "none", "--budget-s", "1", "--inband-sizes", "1000", "--duration", "2s",
                     "--metrics", "off", "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, json.loads(SCHEMA_PATH.read_text()))
    [row] = report["serialization_inband"]
    assert row["metrics"] == "off" and row["serialization_share_source"] == "offline_estimate"
    [offline] = report["serialization"]
    expected_ms = 2 * (offline["encode_us"]["p50"] + offline["decode_us"]["p50"]) / 1000
    assert row["serialization_ms_per_task"] == pytest.approx(expected_ms, abs=1e-6)
    assert row["serialization_share"] == pytest.approx(expected_ms / row["end_to_end_mean_ms"], abs=1e-4)
    assert row["encodes_per_task"] is None and row["decodes_per_task"] is None
    run = json.loads((out / row["run_dir"] / "report.json").read_text())
    assert run["serialization_measured"] is None
    assert "offline estimate (metrics off)" in (out / "report.html").read_text()


def test_offline_only_serialization_report_validates(tmp_path):
    out = tmp_path / "offline"
    result = run_cli("serialization", "--serializers", "json", "--sizes", "100", "--shapes", "flat_strings",
                     "--compressions", "none", "--budget-s", "1", "--inband-sizes", "", "--out", str(out), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, json.loads(SCHEMA_PATH.read_text()))  # the empty report of an offline-only run
    assert report["tasks"]["submitted"] == 0 and report["serialization_inband"] == []


def test_serialization_refuses_pickle_without_consent(tmp_path):
    result = run_cli("serialization", "--serializers", "json,pickle", "--out", str(tmp_path / "p"), timeout=60)
    assert result.returncode == 2 and "--allow-pickle" in result.stderr
