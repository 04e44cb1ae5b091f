"""Dashboards as code and alert rules: committed JSON up to date, every panel queried, every query parses, every alert
unit-tested with promtool.

promtool comes from Debian's ``prometheus`` package. Without it these tests skip, unless ``LOADLAB_REQUIRE_SERVICES=1``
(CI), where a missing promtool is a failure.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loadlab.dashboards import build
from loadlab.dashboards.queries import (
    DASHBOARDS,
    RULES_FILE,
    RULES_TEST_FILE,
    RULES_UID,
    Query,
    alert_rules,
    all_queries,
    dashboard_queries,
    expand,
)


def require_promtool() -> str:
    path = shutil.which("promtool")
    if path:
        return path
    if os.environ.get("LOADLAB_REQUIRE_SERVICES") == "1":
        pytest.fail("promtool is required (LOADLAB_REQUIRE_SERVICES=1); apt-get install prometheus")
    pytest.skip("promtool not installed (apt-get install prometheus)")


def committed() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(build.JSON_DIR.glob("*.json"))}


# --- dashboards ------------------------------------------------------------------------------------------------------

def test_committed_json_is_up_to_date():
    assert build.json_problems() == []


def test_check_passes():
    require_promtool()
    assert build.check() == []


def test_every_panel_has_a_query():
    boards = committed()
    assert set(boards) == {spec.uid for spec in DASHBOARDS}
    for uid, board in boards.items():
        assert board["uid"] == uid
        assert board["panels"], f"{uid} has no panels"
        for panel in board["panels"]:
            exprs = [t.get("expr", "").strip() for t in panel.get("targets") or []]
            assert any(exprs), f"{uid}: panel {panel.get('title')!r} has no target with a query"
            assert all(exprs), f"{uid}: panel {panel.get('title')!r} has an empty target"


def test_panel_titles_are_unique_per_dashboard():
    # all_queries() identifies a query by (uid, panel title): duplicates would make reports ambiguous.
    for spec in DASHBOARDS:
        titles = [p.title for p in spec.panels]
        assert len(titles) == len(set(titles)), spec.uid


def test_all_queries_enumerates_exactly_the_dashboard_queries():
    in_json = sorted(
        (uid, panel["title"], target["expr"])
        for uid, board in committed().items()
        for panel in board["panels"]
        for target in panel["targets"]
    )
    listed = sorted(tuple(q) for q in dashboard_queries(raw=True) if not q.title.startswith("variable "))
    assert in_json == listed


def test_all_queries_covers_alerts_and_is_plain_promql():
    queries = all_queries()
    alerts = {q.title for q in queries if q.uid == RULES_UID}
    assert alerts == {r["alert"] for r in alert_rules()}
    for q in queries:
        assert isinstance(q, Query) and q.expr
        assert "$" not in q.expr, f"Grafana variable left in {q}"


def test_required_panels_exist():
    titles = {spec.uid: " | ".join(p.title for p in spec.panels).lower() for spec in DASHBOARDS}
    overview = titles["celery-overview"]
    for word in ("throughput", "failure ratio", "queue depth", "workers up", "active tasks", "queue wait p95",
                 "runtime p50 / p95 / p99", "retries", "serialization", "message size"):
        assert word in overview, word
    exprs = {q.expr for q in dashboard_queries(raw=True)}
    for metric in ("celery_task_succeeded_total", "celery_queue_length", "celery_worker_up", "celery_worker_tasks_active",
                   "celery_task_queue_wait_seconds_bucket", "celery_task_runtime_seconds_bucket",
                   "celery_task_retried_total", "celery_task_serialization_seconds_bucket",
                   "celery_task_message_bytes_bucket", "loadlab_task_end_to_end_seconds_bucket",
                   "loadlab_tasks_in_flight", "process_cpu_seconds_total", "scrape_duration_seconds"):
        assert any(metric in e for e in exprs), metric
    drilldown = next(s for s in DASHBOARDS if s.uid == "celery-task-drilldown")
    assert [v.name for v in drilldown.variables] == ["task"]
    assert drilldown.variables[0].query == "label_values(celery_task_succeeded_total, task)"
    assert all('task=~"$task"' in t.expr for p in drilldown.panels for t in p.targets)


# A counter read without a range selector is a cumulative total since process start: meaningless on a dashboard and
# wrong in an alert ("failure ratio from rates, not cumulative counters").
_COUNTER = re.compile(r"\b(\w+_total)\b(\{[^}]*\})?(\s*\[)?")


@pytest.mark.parametrize("query", [q for q in all_queries() if not q.title.startswith("variable ")], ids=str)
def test_counters_are_only_used_through_range_functions(query: Query):
    for match in _COUNTER.finditer(query.expr):
        assert match.group(3), f"{query.uid} / {query.title}: counter {match.group(1)} used without rate()/increase()"


def test_expand_rejects_unknown_variables():
    assert expand('rate(x{task=~"$task"}[$__rate_interval])') == 'rate(x{task=~".+"}[1m])'
    assert expand("rate(x[${__rate_interval}])", rate_interval="30s") == "rate(x[30s])"
    with pytest.raises(ValueError, match="nosuchvar"):
        expand("sum(x{a=~\"$nosuchvar\"})")


def test_build_writes_every_dashboard(tmp_path: Path):
    paths = build.build(tmp_path)
    assert sorted(p.name for p in paths) == sorted(f"{s.uid}.json" for s in DASHBOARDS)
    rendered = build.render()
    for path in paths:
        assert path.read_text(encoding="utf-8") == rendered[path.stem]
    # Rendering is deterministic: a second build is byte-identical (no ids or timestamps that churn diffs).
    assert build.render() == rendered


def test_check_reports_stale_missing_and_orphaned_json(tmp_path: Path):
    build.build(tmp_path)
    first = tmp_path / f"{DASHBOARDS[0].uid}.json"
    first.write_text(first.read_text(encoding="utf-8").replace("Celery overview", "Renamed"), encoding="utf-8")
    (tmp_path / f"{DASHBOARDS[1].uid}.json").unlink()
    (tmp_path / "old-dashboard.json").write_text("{}", encoding="utf-8")
    problems = " ".join(build.json_problems(tmp_path))
    assert "stale" in problems and DASHBOARDS[0].uid in problems
    assert "missing" in problems and DASHBOARDS[1].uid in problems
    assert "old-dashboard.json" in problems


def test_check_reports_unparsable_query():
    require_promtool()
    good = Query("d", "good", "sum(rate(celery_task_succeeded_total[1m]))")
    bad = Query("d", "broken panel", "sum(rate(celery_task_succeeded_total[1m])")
    problems = build.parse_problems([good, bad])
    assert len(problems) == 1 and "broken panel" in problems[0] and "parse" in problems[0]


def test_module_cli_exit_codes():
    require_promtool()
    root = Path(__file__).resolve().parents[1]
    ok = subprocess.run([sys.executable, "-m", "loadlab.dashboards.build", "check"], cwd=root, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    usage = subprocess.run([sys.executable, "-m", "loadlab.dashboards.build", "bogus"], cwd=root, capture_output=True, text=True)
    assert usage.returncode == 2


# --- alert rules -----------------------------------------------------------------------------------------------------

def test_rule_file_is_valid():
    promtool = require_promtool()
    proc = subprocess.run([promtool, "check", "rules", str(RULES_FILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_rule_unit_tests_pass():
    promtool = require_promtool()
    proc = subprocess.run([promtool, "test", "rules", str(RULES_TEST_FILE)], capture_output=True, text=True,
                          cwd=RULES_TEST_FILE.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_firing_and_silent_test_cases():
    doc = yaml.safe_load(RULES_TEST_FILE.read_text(encoding="utf-8"))
    assert doc["rule_files"] == [RULES_FILE.name]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - firing == set(), "alerts without a firing test case"
    assert names - silent == set(), "alerts without a not-firing test case"


def test_alerts_have_severity_and_annotations():
    rules = alert_rules()
    required = {"CeleryTaskFailureRatioHigh", "CeleryQueueBacklogGrowing", "CeleryWorkerDown",
                "CeleryWorkerMetricsAbsent", "CeleryRetryStorm", "LoadlabEndToEndLatencyHigh"}
    assert required <= {r["alert"] for r in rules}
    for rule in rules:
        assert rule.get("labels", {}).get("severity") in {"warning", "critical"}, rule["alert"]
        annotations = rule.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), rule["alert"]
    by_name = {r["alert"]: r["expr"] for r in rules}
    assert "rate(celery_task_failed_total" in by_name["CeleryTaskFailureRatioHigh"]
    assert "deriv(celery_queue_length" in by_name["CeleryQueueBacklogGrowing"]
    assert "absent(celery_worker_up)" in by_name["CeleryWorkerMetricsAbsent"]
    assert "histogram_quantile(0.95" in by_name["LoadlabEndToEndLatencyHigh"]
