"""Multi-run campaigns: a real two-point sweep and a small serialization comparison, end to end through the CLI."""
import json
import re

import jsonschema

from reports.report import SCHEMA_PATH
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
    assert "Serialization cost" in (out / "report.html").read_text()


def test_serialization_refuses_pickle_without_consent(tmp_path):
    result = run_cli("serialization", "--serializers", "json,pickle", "--out", str(tmp_path / "p"), timeout=60)
    assert result.returncode == 2 and "--allow-pickle" in result.stderr
