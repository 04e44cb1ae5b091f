"""report.json's typed model: the committed schema is the one the model generates, every figure carries a unit the
gates read, no section takes an undeclared field, and reports of another version are refused with a sentence."""
from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest
from pydantic import ValidationError

from loadlab.reports import gates
from loadlab.reports.model import Report, schema_text, unit_of
from loadlab.reports.recorder import Recorder
from loadlab.reports.report import SCHEMA_PATH, ReportVersionError, build_report, load_report, write_json
from tests.conftest import LOADLAB


def _report() -> dict:
    """A report built by the real builder from a recorder fed one task that retried once and published a child."""
    recorder = Recorder("redis://127.0.0.1:1/0", "model-test", max_retries=3)
    from loadlab.exporters import ledger

    t0 = 1_800_000_000.0
    recorder.handle([ledger.SENT, "a" * 32, "loadlab.flaky", t0, 0.001, None])
    recorder.handle([ledger.ATTEMPT, "a" * 32, "loadlab.flaky", "RETRY", t0, t0, None, t0 + 0.01, t0 + 0.02,
                     t0 + 0.021, 0, "FlakyError", None, "w1"])
    recorder.handle([ledger.SENT, "b" * 32, "loadlab.noop", t0 + 1.015, 0.001, None, "a" * 32, "a" * 32])
    recorder.handle([ledger.ATTEMPT, "b" * 32, "loadlab.noop", "SUCCESS", t0 + 1.015, t0 + 1.015, None, t0 + 1.02,
                     t0 + 1.03, t0 + 1.031, 0, None, None, "w1", "a" * 32, "a" * 32])
    recorder.handle([ledger.ATTEMPT, "a" * 32, "loadlab.flaky", "SUCCESS", t0, t0 + 1.0, None, t0 + 1.01,
                     t0 + 1.02, t0 + 1.021, 1, None, None, "w1"])
    recorder.mark_load_stopped(t0 + 2)
    settings = {k: None for k in Report.model_fields["settings"].annotation.model_fields}
    return build_report(scenario="unit", settings_masked=settings, started_at=t0, load_stopped_at=t0 + 2,
                        recorded=recorder.summary(), locust={"requests": 1, "failures": 0, "rps": 0.5},
                        retry_policy={"max_retries": 3, "backoff_factor_s": 1, "backoff_max_s": 4, "jitter": True},
                        drained=True)


def test_the_committed_schema_is_the_models():
    assert SCHEMA_PATH.read_text() == schema_text(), "stale: run `python -m loadlab.reports.model write`"
    stale = subprocess.run([sys.executable, "-m", "loadlab.reports.model", "check"], capture_output=True, text=True)
    assert stale.returncode == 0, stale.stderr


def test_a_built_report_validates_against_model_and_schema():
    report = _report()
    Report.model_validate(report)
    jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text())).validate(report)
    assert report["tasks"]["retried"] == 1 and report["retries"]["chains"][0]["attempts"] == 2
    assert report["tasks"]["children"] == 1
    assert report["workflows"]["by_root"]["flaky"]["tasks_per_workflow"] == {"2": 1}


@pytest.mark.parametrize("where", [(), ("tasks",), ("latency_ms", "end_to_end"), ("verdict",), ("drain",)])
def test_an_undeclared_field_is_refused_in_every_section(where):
    report = _report()
    section = report
    for key in where:
        section = section[key]
    section["not_a_field"] = 1
    with pytest.raises(ValidationError):
        Report.model_validate(report)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(report, json.loads(SCHEMA_PATH.read_text()))


def test_every_numeric_figure_of_a_report_has_a_unit():
    not_figures = {"schema_version", "settings", "policy", "chains"}  # settings and identities, not measurements
    missing = []

    def walk(value, path):
        if path and path[-1] in not_figures:
            return
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, path + (key,))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, path + (str(index),))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if unit_of(path) is None:
                missing.append(".".join(path))

    walk(_report(), ())
    assert not missing, f"figures without a unit in the model: {missing}"


def test_gates_take_units_and_direction_from_the_model():
    assert gates._infer_unit(("latency_ms", "end_to_end", "p95")) == "ms"
    assert gates._infer_unit(("latency_ms", "end_to_end", "count")) == "count"
    assert gates._infer_unit(("scaling", "usl", "lambda")) == "/s"  # no suffix names the unit: the model does
    assert gates._infer_unit(("littles_law", "observed_in_system")) == "count"
    assert gates._infer_direction(("locust", "rps")) == "lower_is_worse"
    assert gates._infer_direction(("scaling", "usl", "lambda")) == "lower_is_worse"
    assert gates._infer_direction(("tasks", "lost")) == "higher_is_worse"


def test_a_report_of_another_version_is_refused_with_a_sentence(tmp_path):
    report = _report()
    report["schema_version"] = 7
    write_json(tmp_path / "report.json", report)
    with pytest.raises(ReportVersionError, match="schema version 7, newer than this loadlab reads"):
        load_report(tmp_path)
    result = subprocess.run([LOADLAB, "report", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "schema version 7" in result.stderr
    rules = tmp_path / "rules.yml"
    rules.write_text("gates:\n  - metric: tasks.lost\n    max: 0\n")
    gated = subprocess.run([LOADLAB, "gate", str(tmp_path), "--rules", str(rules)], capture_output=True, text=True)
    assert gated.returncode == 2 and "schema version 7" in gated.stderr


def test_the_gate_command_passes_and_fails_a_finished_run(tmp_path):
    """`loadlab gate` end to end on a run directory: exit 0 when every rule holds, 1 when one fails, with the
    verdict and the pages rewritten."""
    write_json(tmp_path / "report.json", _report())
    rules = tmp_path / "rules.yml"
    rules.write_text("gates:\n  - metric: tasks.lost\n    max: 0\n  - metric: latency_ms.end_to_end.p95\n    max: 60000\n")
    passed = subprocess.run([LOADLAB, "gate", str(tmp_path), "--rules", str(rules)], capture_output=True, text=True)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert json.loads((tmp_path / "report.json").read_text())["verdict"]["status"] == "pass"
    rules.write_text("gates:\n  - metric: latency_ms.end_to_end.p95\n    max: 1\n")
    failed = subprocess.run([LOADLAB, "gate", str(tmp_path), "--rules", str(rules)], capture_output=True, text=True)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["verdict"]["status"] == "fail" and (tmp_path / "report.html").is_file()
    Report.model_validate(report)  # the gates' entries are part of the model too
