"""CI gates: rules parsing, evaluation, noise allowance, and the run-directory side effects (junit.xml, report.json)."""
from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from loadlab.reports.gates import GateConfigError, GateResult, evaluate, format_markdown, gate_run_dir, load_rules


def _latency(p95: float) -> dict[str, float]:
    return {"count": 1000, "mean": p95 / 2, "p50": p95 / 2, "p90": p95 * 0.9, "p95": p95, "p99": p95 * 1.2,
            "max": p95 * 2}


def make_report(
    *, p95: float = 120.0, lost: int = 0, completed_per_s: float = 50.0, failures: int = 0
) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "scenario": "smoke",
        "started_at": "2025-01-01T00:00:00Z",
        "duration_s": 30.0,
        "tasks": {"submitted": 1500, "succeeded": 1500 - lost, "failed": 0, "retried": 3, "lost": lost,
                  "pending_at_end": 0},
        "throughput": {"submitted_per_s": 50.0, "completed_per_s": completed_per_s},
        "latency_ms": {name: _latency(p95) for name in ("publish", "queue_wait", "execution", "end_to_end")},
        "serialization": [{"serializer": "json", "compression": "none", "payload_bytes": 1024, "wire_bytes": 1400}],
        "locust": {"requests": 1500, "failures": failures, "rps": 50.0, "request_failures": failures},
    }


def write_run(directory: Path, report: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.json").write_text(json.dumps(report), encoding="utf-8")
    return directory


def write_rules(tmp_path: Path, text: str, name: str = "gates.yml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def quiet_console() -> Console:
    return Console(file=io.StringIO(), width=200, color_system=None)


def read_junit(run_dir: Path) -> ET.Element:
    root = ET.parse(run_dir / "junit.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None and suite.get("name") == "loadlab.gates"
    return suite


RULES_OK = """
gates:
  - metric: latency_ms.end_to_end.p95
    max: 250
  - metric: tasks.lost
    max: 0
  - metric: throughput.completed_per_s
    min: 5
  - metric: serialization.0.wire_bytes
    max: 2048
"""


# --------------------------------------------------------------------------------------------------- gate_run_dir


def test_passing_rules_exit_0_and_write_junit_and_report(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", make_report(p95=120.0))
    console = quiet_console()

    assert gate_run_dir(run, write_rules(tmp_path, RULES_OK), console=console) == 0

    suite = read_junit(run)
    cases = suite.findall("testcase")
    assert suite.get("tests") == "4" and len(cases) == 4
    assert suite.get("failures") == "0"
    assert all(case.find("failure") is None for case in cases)

    stored = json.loads((run / "report.json").read_text())["gates"]
    assert [entry["metric"] for entry in stored] == [
        "latency_ms.end_to_end.p95",
        "tasks.lost",
        "throughput.completed_per_s",
        "serialization.0.wire_bytes",
    ]
    assert [entry["value"] for entry in stored] == [120.0, 0.0, 50.0, 1400.0]
    assert all(entry["passed"] for entry in stored)
    assert {"rule", "metric", "value", "threshold", "passed", "baseline", "message"} <= set(stored[0])
    # The rest of report.json survives the rewrite.
    assert json.loads((run / "report.json").read_text())["tasks"]["submitted"] == 1500

    printed = console.file.getvalue()  # type: ignore[attr-defined]
    assert "PASS" in printed and "FAIL" not in printed and "4/4 gates passed" in printed


def test_failing_max_exits_1_and_failure_names_value_and_threshold(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", make_report(p95=412.3, lost=2))

    assert gate_run_dir(run, write_rules(tmp_path, RULES_OK), console=quiet_console()) == 1

    suite = read_junit(run)
    assert suite.get("tests") == "4" and suite.get("failures") == "2"
    failed = {case.get("name"): case.find("failure") for case in suite.findall("testcase")
              if case.find("failure") is not None}
    assert set(failed) == {"latency_ms.end_to_end.p95 <= 250", "tasks.lost <= 0"}
    p95_message = failed["latency_ms.end_to_end.p95 <= 250"].get("message", "")
    assert "412.3" in p95_message and "250" in p95_message
    lost_message = failed["tasks.lost <= 0"].get("message", "")
    assert "2" in lost_message and "max 0" in lost_message

    stored = {entry["rule"]: entry for entry in json.loads((run / "report.json").read_text())["gates"]}
    assert stored["latency_ms.end_to_end.p95 <= 250"]["passed"] is False
    assert stored["latency_ms.end_to_end.p95 <= 250"]["threshold"] == 250
    assert stored["throughput.completed_per_s >= 5"]["passed"] is True


def test_failing_min_on_throughput(tmp_path: Path) -> None:
    results = evaluate(make_report(completed_per_s=3.5), load_rules(write_rules(tmp_path, RULES_OK)))
    by_metric = {result.metric: result for result in results}
    throughput = by_metric["throughput.completed_per_s"]
    assert throughput.passed is False and throughput.value == 3.5 and throughput.threshold == 5
    assert "3.5" in throughput.message and "5" in throughput.message


def test_gates_run_twice_replace_previous_results(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", make_report())
    gate_run_dir(run, write_rules(tmp_path, RULES_OK), console=quiet_console())
    one_rule = write_rules(tmp_path, "gates:\n  - metric: tasks.lost\n    max: 0\n", name="one.yml")
    gate_run_dir(run, one_rule, console=quiet_console())
    assert len(json.loads((run / "report.json").read_text())["gates"]) == 1
    assert read_junit(run).get("tests") == "1"


def test_a_failed_gate_fails_the_verdict_and_passing_gates_restore_it(tmp_path: Path) -> None:
    """The header of report.html and summary.md must not say PASS above a failed gate."""
    from loadlab.reports.render import render_html, render_markdown
    from loadlab.reports.report import empty_report

    run = write_run(tmp_path / "run", {**empty_report("smoke", {}), **make_report(), "serialization": []})
    failing = write_rules(tmp_path, "gates:\n  - metric: tasks.lost\n    max: -1\n", name="failing.yml")
    assert gate_run_dir(run, failing, console=quiet_console()) == 1
    report = json.loads((run / "report.json").read_text())
    assert report["verdict"]["status"] == "fail"
    assert any("tasks.lost" in problem for problem in report["verdict"]["problems"]), report["verdict"]
    assert "FAIL" in render_markdown(report).splitlines()[0]
    assert "FAIL" in render_html(report).split("</h1>")[0]
    passing = write_rules(tmp_path, "gates:\n  - metric: tasks.lost\n    max: 0\n", name="passing.yml")
    assert gate_run_dir(run, passing, console=quiet_console()) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["verdict"]["status"] == "pass" and report["verdict"]["problems"] == []


def test_null_value_fails_the_gate_instead_of_erroring(tmp_path: Path) -> None:
    report = make_report()
    report["latency_ms"]["end_to_end"]["p95"] = None  # e.g. no task completed
    rules = load_rules(write_rules(tmp_path, "gates:\n  - metric: latency_ms.end_to_end.p95\n    max: 250\n"))
    [result] = evaluate(report, rules)
    assert result.passed is False and result.value is None


# --------------------------------------------------------------------------------------------------- regressions

REGRESSION_RULE = """
gates:
  - metric: latency_ms.end_to_end.p95
    max_regression: 10%
"""


@pytest.mark.parametrize(
    ("baseline_p95", "current_p95", "expected_exit"),
    [
        (250.0, 300.0, 1),  # +20 % > max(25 ms, 5 ms)
        (250.0, 270.0, 0),  # +8 % within 25 ms
        (250.0, 275.0, 0),  # exactly on the allowance still passes ("more than" fails)
        (2.0, 3.0, 0),  # +50 % but only 1 ms: under the 5 ms floor for *_ms metrics
        (2.0, 7.5, 1),  # 5.5 ms worse: over the floor
        (250.0, 100.0, 0),  # improvements never fail
    ],
)
def test_regression_rule_against_baseline(
    tmp_path: Path, baseline_p95: float, current_p95: float, expected_exit: int
) -> None:
    run = write_run(tmp_path / "run", make_report(p95=current_p95))
    baseline = write_run(tmp_path / "baseline", make_report(p95=baseline_p95))
    rules = write_rules(tmp_path, REGRESSION_RULE)

    assert gate_run_dir(run, rules, baseline_dir=baseline, console=quiet_console()) == expected_exit

    [entry] = json.loads((run / "report.json").read_text())["gates"]
    assert entry["baseline"] == baseline_p95 and entry["value"] == current_p95
    assert entry["passed"] is (expected_exit == 0)
    assert entry["threshold"] == pytest.approx(baseline_p95 + max(0.10 * baseline_p95, 5.0))


def test_baseline_may_be_given_as_report_json_file(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", make_report(p95=300.0))
    baseline = write_run(tmp_path / "baseline", make_report(p95=250.0)) / "report.json"
    rules = write_rules(tmp_path, REGRESSION_RULE)
    assert gate_run_dir(run, rules, baseline_dir=baseline, console=quiet_console()) == 1


def test_throughput_regression_direction_is_lower_is_worse(tmp_path: Path) -> None:
    rules = load_rules(
        write_rules(tmp_path, "gates:\n  - metric: throughput.completed_per_s\n    max_regression: 0.10\n")
    )
    baseline = make_report(completed_per_s=100.0)
    [dropped] = evaluate(make_report(completed_per_s=85.0), rules, baseline)
    [rose] = evaluate(make_report(completed_per_s=200.0), rules, baseline)
    [small] = evaluate(make_report(completed_per_s=91.0), rules, baseline)
    assert dropped.passed is False and dropped.threshold == pytest.approx(90.0)
    assert rose.passed is True
    assert small.passed is True


def test_rate_floor_absorbs_tiny_throughput_changes(tmp_path: Path) -> None:
    rules = load_rules(
        write_rules(tmp_path, "gates:\n  - metric: throughput.completed_per_s\n    max_regression: 10%\n")
    )
    # 4/s -> 3.2/s is -20 %, but only 0.8/s: inside the default 1.0/s floor.
    [result] = evaluate(make_report(completed_per_s=3.2), rules, make_report(completed_per_s=4.0))
    assert result.passed is True


def test_counts_have_no_floor_and_explicit_overrides_apply(tmp_path: Path) -> None:
    rules = load_rules(
        write_rules(
            tmp_path,
            """
gates:
  - metric: tasks.lost
    max_regression: 10%
  - metric: latency_ms.end_to_end.p95
    max_regression: 10%
    abs_floor: 0
  - metric: tasks.succeeded
    max_regression: 10%
    direction: higher_is_worse
""",
        )
    )
    baseline = make_report(p95=2.0, lost=0)
    lost, p95, succeeded = evaluate(make_report(p95=3.0, lost=1), rules, baseline)
    assert lost.passed is False  # 0 -> 1 lost task is a real regression
    assert p95.passed is False  # with the floor removed, 2 ms -> 3 ms is a 50 % regression
    assert succeeded.passed is True  # fewer succeeded, but the rule says higher is worse


def test_regression_without_baseline_is_a_config_error(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", make_report())
    rules = write_rules(tmp_path, "gates:\n  - metric: tasks.lost\n    max: 0\n" + REGRESSION_RULE.split("gates:\n")[1])
    with pytest.raises(GateConfigError, match=r"gate rule 2 \(metric 'latency_ms.end_to_end.p95'\).*baseline"):
        gate_run_dir(run, rules, console=quiet_console())
    assert not (run / "junit.xml").exists()


# --------------------------------------------------------------------------------------------------- config errors


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    rules = write_rules(tmp_path, "gates:\n  - metric: tasks.lost\n    max: [0\n")
    with pytest.raises(GateConfigError, match=r"not valid YAML at line \d+") as info:
        load_rules(rules)
    assert str(rules) in str(info.value)


def test_unknown_metric_path_names_rule_position_and_available_fields(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", make_report())
    original = (run / "report.json").read_text()
    rules = write_rules(
        tmp_path,
        "gates:\n  - metric: tasks.lost\n    max: 0\n  - metric: tasks.failed\n    max: 0\n"
        "  - metric: tasks.lsot\n    max: 0\n",
    )
    with pytest.raises(GateConfigError) as info:
        gate_run_dir(run, rules, console=quiet_console())
    message = str(info.value)
    assert message.startswith("gate rule 3 (metric 'tasks.lsot'): no such field in report.json")
    assert "did you mean 'tasks.lost'" in message and "pending_at_end" in message
    # A config error writes nothing.
    assert not (run / "junit.xml").exists()
    assert (run / "report.json").read_text() == original


def test_unknown_top_level_field_lists_top_level_fields(tmp_path: Path) -> None:
    rules = load_rules(write_rules(tmp_path, "gates:\n  - metric: latncy_ms.end_to_end.p95\n    max: 1\n"))
    with pytest.raises(GateConfigError, match="gate rule 1 .*available top-level fields are .*latency_ms"):
        evaluate(make_report(), rules)


def test_rule_without_any_check_names_rule_position(tmp_path: Path) -> None:
    rules = write_rules(
        tmp_path, "gates:\n  - metric: tasks.lost\n    max: 0\n  - metric: tasks.failed\n    name: oops\n"
    )
    with pytest.raises(GateConfigError, match=r"^gate rule 2 \(metric 'tasks.failed'\): has none of 'min', 'max'"):
        load_rules(rules)


@pytest.mark.parametrize(
    ("rules_text", "pattern"),
    [
        ("", "is empty"),
        ("- metric: tasks.lost\n  max: 0\n", "must be a mapping with a top-level 'gates:' list"),
        ("rules:\n  - metric: tasks.lost\n", "has no top-level 'gates:' list"),
        ("gates: {metric: tasks.lost}\n", "'gates' must be a list"),
        ("gates: []\n", "'gates' list is empty"),
        ("gates:\n  - tasks.lost\n", r"^gate rule 1: expected a mapping"),
        ("gates:\n  - max: 0\n", r"^gate rule 1: has no 'metric' key"),
        ("gates:\n  - metric: tasks.lost\n    mx: 0\n", r"gate rule 1 .*unknown key 'mx' \(did you mean 'max'\?\)"),
        ("gates:\n  - metric: tasks.lost\n    max: lots\n", r"gate rule 1 .*'max' must be a finite number"),
        ("gates:\n  - metric: tasks.lost\n    min: 5\n    max: 1\n", r"gate rule 1 .*min 5 is greater than max 1"),
        ("gates:\n  - metric: tasks.lost\n    max_regression: ten percent\n", r"gate rule 1 .*not a percentage"),
        ("gates:\n  - metric: tasks.lost\n    max_regression: 10\n", r"gate rule 1 .*ambiguous.*'10%'"),
        ("gates:\n  - metric: tasks.lost\n    max_regression: -5%\n", r"gate rule 1 .*not a percentage"),
        ("gates:\n  - metric: tasks.lost\n    max: 0\n    abs_floor: 3\n", r"'abs_floor' only applies to"),
        ("gates:\n  - metric: tasks.lost\n    max_regression: 5%\n    direction: up\n", r"direction must be"),
        ("gates:\n  - metric: tasks.lost\n    max: 0\n    max: 1\n", r"line 4.*duplicate key 'max'"),
        ("gates:\n  - metric: tasks..lost\n    max: 0\n", r"gate rule 1 .*empty"),
    ],
)
def test_rules_file_errors_are_one_sentence(tmp_path: Path, rules_text: str, pattern: str) -> None:
    with pytest.raises(GateConfigError, match=pattern) as info:
        load_rules(write_rules(tmp_path, rules_text))
    message = str(info.value)
    assert "\n" not in message and message.endswith((".", "?"))


def test_missing_rules_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(GateConfigError, match="does not exist"):
        load_rules(tmp_path / "nope.yml")


@pytest.mark.parametrize(
    ("metric", "pattern"),
    [
        ("latency_ms.end_to_end", r"is a mapping, not a number; pick one of its fields: count, max, mean"),
        ("scenario", r"is the text 'smoke', not a number"),
        ("serialization.5.wire_bytes", r"'serialization' has only 1 entry"),
        ("serialization.json", r"'serialization' in report.json is a list"),
        ("tasks.lost.value", r"'tasks.lost' is the number 0, which has no fields"),
    ],
)
def test_bad_metric_paths_and_non_numeric_values(tmp_path: Path, metric: str, pattern: str) -> None:
    rules = load_rules(write_rules(tmp_path, f"gates:\n  - metric: {metric}\n    max: 1\n"))
    with pytest.raises(GateConfigError, match=rf"^gate rule 1 \(metric '{metric}'\): .*{pattern}"):
        evaluate(make_report(), rules)


def test_missing_or_invalid_run_directory(tmp_path: Path) -> None:
    rules = write_rules(tmp_path, RULES_OK)
    with pytest.raises(GateConfigError, match="run directory .* does not exist"):
        gate_run_dir(tmp_path / "missing", rules, console=quiet_console())

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(GateConfigError, match="has no report.json"):
        gate_run_dir(empty, rules, console=quiet_console())

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "report.json").write_text('{"tasks": {"lost": 0,}\n')
    with pytest.raises(GateConfigError, match=r"not valid JSON at line 1"):
        gate_run_dir(broken, rules, console=quiet_console())

    not_object = tmp_path / "list"
    not_object.mkdir()
    (not_object / "report.json").write_text("[1, 2]")
    with pytest.raises(GateConfigError, match="must hold a JSON object"):
        gate_run_dir(not_object, rules, console=quiet_console())


def test_missing_baseline_directory(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", make_report())
    with pytest.raises(GateConfigError, match="baseline .* does not exist"):
        rules = write_rules(tmp_path, REGRESSION_RULE)
        gate_run_dir(run, rules, baseline_dir=tmp_path / "nope", console=quiet_console())


# --------------------------------------------------------------------------------------------------- rendering


def test_several_checks_in_one_rule_give_one_result_each(tmp_path: Path) -> None:
    rules = load_rules(
        write_rules(tmp_path, "gates:\n  - metric: latency_ms.end_to_end.p95\n    min: 1\n    max: 100\n")
    )
    low, high = evaluate(make_report(p95=120.0), rules)
    assert (low.rule, low.passed) == ("latency_ms.end_to_end.p95 >= 1", True)
    assert (high.rule, high.passed) == ("latency_ms.end_to_end.p95 <= 100", False)


def test_rule_name_appears_in_result_and_junit(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", make_report(lost=1))
    rules = write_rules(tmp_path, "gates:\n  - name: no <lost> tasks & co\n    metric: tasks.lost\n    max: 0\n")
    assert gate_run_dir(run, rules, console=quiet_console()) == 1
    [case] = read_junit(run).findall("testcase")
    assert case.get("name") == "no <lost> tasks & co: tasks.lost <= 0"  # escaped and parsed back intact
    assert case.find("failure") is not None


def test_format_markdown_table(tmp_path: Path) -> None:
    results = [
        GateResult(rule="a | b <= 1", metric="a", value=2.0, threshold=1.0, passed=False, message="a 2 > max 1"),
        GateResult(rule="c >= 5", metric="c", value=7.25, threshold=5.0, passed=True, message="c 7.25 >= min 5"),
    ]
    markdown = format_markdown(results)
    lines = markdown.splitlines()
    assert lines[0] == "## Gates"
    assert "1 of 2 gates failed" in markdown
    rows = [line for line in lines if line.startswith("| ") and ("pass" in line or "fail" in line)]
    assert len(rows) == 2
    # Escaped pipe keeps the row at five cells.
    assert rows[0].replace("\\|", "").count("|") == 6
    assert "7.25" in rows[1] and "✅" in rows[1]
    assert "a 2 &gt; max 1" in markdown  # escaped: outside code spans "<...>" would be read as HTML

    all_pass = format_markdown(results[1:])
    assert "All 1 gates passed" in all_pass and "Why they failed" not in all_pass
    assert "No gates were evaluated" in format_markdown([])


def test_as_report_entry_round_trips_through_json() -> None:
    result = GateResult(rule="x <= 1", metric="x", value=None, threshold=1.0, passed=False, baseline=None, message="m")
    entry = json.loads(json.dumps(result.as_report_entry()))
    assert entry == {"rule": "x <= 1", "metric": "x", "value": None, "threshold": 1.0, "passed": False,
                     "baseline": None, "message": "m"}


def test_ci_rules_file_is_valid_and_passes_a_healthy_smoke_run() -> None:
    ci_rules = Path(__file__).resolve().parents[1] / "loadtests" / "gates" / "ci.yml"
    rules = load_rules(ci_rules)
    assert {rule.metric for rule in rules} >= {"tasks.lost", "latency_ms.end_to_end.p95", "throughput.completed_per_s"}
    assert all(result.passed for result in evaluate(make_report(), rules))
    unhealthy = make_report(lost=3, failures=2)
    failed = {result.metric for result in evaluate(unhealthy, rules) if not result.passed}
    assert failed == {"tasks.lost", "locust.request_failures"}


def test_a_failed_gate_on_a_count_shows_the_count_in_the_verdict_not_a_float():
    from loadlab.reports.report import verdict_with_gates

    verdict = verdict_with_gates({"status": "pass", "problems": []}, [
        {"rule": "tasks.failed max 0", "value": 702.0, "threshold": 0.0, "passed": False},
        {"rule": "latency_ms.end_to_end.p95 max 250", "value": 412.345, "threshold": 250.0, "passed": False}])
    assert verdict["status"] == "fail"
    assert any("(value 702, threshold 0)" in p for p in verdict["problems"]), verdict["problems"]
    assert any("(value 412.3, threshold 250)" in p for p in verdict["problems"]), verdict["problems"]
