"""Every PromQL expression of the dashboards and alert rules, evaluated by Debian's Prometheus on the data it scraped
from a short real run (issue 6, item 3).

The run is ``loadlab run smoke --prometheus`` (tests/prometheus_runs.py): Prometheus scrapes every /metrics endpoint
of the run — the exporter, the worker, the producer API and the load generator — each second and evaluates
dashboards/alerts/celery.rules.yml, waiting (with deadlines) until every endpoint was scraped before the load starts
and once more after the drain. The test then serves that TSDB again (loadlab.stack.prometheus.open_run) and, for
every expression of ``loadlab.dashboards.queries.all_queries()``:

* it parses and evaluates over the run's window (``/api/v1/query_range``, 1 s steps), no error;
* every metric it names is one the run's targets exported (``/api/v1/label/__name__/values`` of the scraped series),
  or one Prometheus writes itself per target (``up``, ``scrape_*``);
* it returns data: at least one series with a finite value somewhere in the window. Dashboard queries as they are.
  Alert expressions are conditions that are false (empty) in a healthy run, so each is proven through its probes
  (``loadlab.dashboards.promql.probes``): the operands of its comparisons and ``and``/``or``/``unless``, without the numeric
  thresholds, and the argument of ``absent()`` — e.g. ``CeleryWorkerDown: celery_worker_up == 0`` is proven by
  ``celery_worker_up`` returning data, ``CeleryWorkerMetricsAbsent: absent(celery_worker_up)`` likewise (``absent`` of
  a misspelt metric would return 1, i.e. data, and prove nothing). The full alert expression still has to evaluate.

A metric renamed in exporters/ leaves a dashboard or rule naming a metric no target exports: the name check and the
data check both fail (test_a_renamed_metric_is_caught shows the checks do catch it).

Without ``prometheus`` installed the tests skip, or fail under ``LOADLAB_REQUIRE_SERVICES=1`` (CI).
"""
from __future__ import annotations

import json
import math

import pytest

from loadlab.dashboards.promql import metric_names, probes
from loadlab.dashboards.queries import RULES_UID, Query, all_queries
from loadlab.stack.prometheus import SCRAPE_SERIES, Prometheus, PrometheusError, open_run
from tests.prometheus_runs import recorded_run

# Series Prometheus' rule evaluation writes (alert states): not exported by anything.
RULE_SERIES = frozenset({"ALERTS", "ALERTS_FOR_STATE"})
JOBS = {"exporter", "worker", "api", "loadgen"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return recorded_run(tmp_path_factory)


@pytest.fixture(scope="module")
def tsdb(run_dir):
    with open_run(run_dir) as (prometheus, stored):
        yield prometheus, (stored.start, stored.end)


@pytest.fixture(scope="module")
def exported(tsdb) -> set[str]:
    """Names of the series the run's targets exported (every scraped series carries the ``endpoint`` label)."""
    prometheus, _window = tsdb
    return prometheus.metric_names('{endpoint=~".+"}') - SCRAPE_SERIES - RULE_SERIES


# --- the checks ------------------------------------------------------------------------------------------------------
def evaluate(prometheus: Prometheus, expr: str, window: tuple[float, float]) -> list[dict]:
    start, end = window
    return prometheus.query_range(expr, start, end, 1)["result"]


def has_data(result: list[dict]) -> bool:
    return any(math.isfinite(float(value)) for series in result for _t, value in series["values"])


def name_problems(query: Query, exported: set[str]) -> list[str]:
    names = metric_names(query.expr)
    if not names:
        return [f"{query.uid}: {query.title!r}: names no metric: {query.expr!r}"]
    unknown = sorted(names - exported - SCRAPE_SERIES)
    return [f"{query.uid}: {query.title!r}: {name} is exported by no target of the run" for name in unknown]


def data_problems(prometheus: Prometheus, query: Query, window: tuple[float, float]) -> list[str]:
    """The expression evaluates; it (a dashboard query) or each of its probes (an alert rule) returns data."""
    where = f"{query.uid}: {query.title!r}"
    try:
        result = evaluate(prometheus, query.expr, window)
    except PrometheusError as exc:
        return [f"{where}: {query.expr!r} does not evaluate: {exc}"]
    if query.uid != RULES_UID:
        return [] if has_data(result) else [f"{where}: {query.expr!r} returned no data"]
    problems = []
    for probe in probes(query.expr):
        try:
            if not has_data(evaluate(prometheus, probe, window)):
                problems.append(f"{where}: probe {' '.join(probe.split())!r} returned no data")
        except PrometheusError as exc:
            problems.append(f"{where}: probe {probe!r} does not evaluate: {exc}")
    return problems


# --- the run was recorded --------------------------------------------------------------------------------------------
def test_prometheus_scraped_every_endpoint_through_the_run(run_dir, tsdb):
    prometheus, window = tsdb
    meta = json.loads((run_dir / "prometheus" / "meta.json").read_text())
    assert {t["job"] for t in meta["targets"].values()} >= JOBS
    seconds = window[1] - window[0]
    for job in sorted(JOBS):
        samples = prometheus.query(f'count_over_time(up{{job="{job}"}}[{math.ceil(seconds) + 1}s])', at=window[1])
        counts = [float(s["value"][1]) for s in samples["result"]]
        assert counts and min(counts) >= 8, f"{job}: only {counts} scrapes in {seconds:.0f}s"
        ups = prometheus.query(f'min_over_time(up{{job="{job}"}}[{math.ceil(seconds) + 1}s])', at=window[1])
        assert all(s["value"][1] == "1" for s in ups["result"]), f"{job} was down at some scrape: {ups}"


def final_scrape_total(run_dir, metric: str) -> float:
    """Sum of ``metric`` over the run's final scrape (``metrics/*.prom``, taken after the drain)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for path in (run_dir / "metrics").glob("*.prom"):
        for family in text_string_to_metric_families(path.read_text()):
            total += sum(s.value for s in family.samples if s.name == metric)
    return total


def test_the_last_scrape_came_after_the_drain(run_dir, tsdb):
    """Prometheus' last values equal the run's final scrape and its ledger: the data covers the whole run."""
    prometheus, window = tsdb
    report = json.loads((run_dir / "report.json").read_text())
    assert report["tasks"]["succeeded"] > 0
    for metric in ("celery_task_sent_total", "celery_task_succeeded_total", "celery_task_received_total"):
        last = prometheus.query(f"sum({metric})", at=window[1])["result"]
        assert float(last[0]["value"][1]) == final_scrape_total(run_dir, metric), metric
    last_succeeded = prometheus.query("sum(celery_task_succeeded_total)", at=window[1])["result"]
    assert float(last_succeeded[0]["value"][1]) == report["tasks"]["succeeded"]


def test_alert_rules_evaluated_without_errors_during_the_run(run_dir):
    # Prometheus logs (at warn) every rule evaluation that fails, e.g. a many-to-many match on the live series.
    log = (run_dir / "logs" / "prometheus.log").read_text(errors="replace")
    assert "Evaluating rule failed" not in log, log[-2000:]


# --- every query -----------------------------------------------------------------------------------------------------
QUERIES = all_queries()


def test_all_queries_covers_dashboards_and_rules():
    assert {q.uid for q in QUERIES} >= {"celery-overview", "celery-task-drilldown", "loadlab-load-test", RULES_UID}


def test_every_query_names_only_exported_metrics(exported):
    assert exported >= {"celery_worker_up", "celery_task_succeeded_total", "loadlab_task_end_to_end_seconds_bucket",
                        "loadlab_tasks_in_flight", "process_cpu_seconds_total"}, sorted(exported)
    problems = [p for q in QUERIES for p in name_problems(q, exported)]
    assert not problems, "\n".join(problems)


def test_every_query_evaluates_and_returns_data(tsdb):
    prometheus, window = tsdb
    problems = [p for q in QUERIES for p in data_problems(prometheus, q, window)]
    assert not problems, "\n".join(problems)


def test_every_alert_has_probes():
    for q in QUERIES:
        if q.uid == RULES_UID:
            assert probes(q.expr), q


def test_a_renamed_metric_is_caught(tsdb, exported):
    prometheus, window = tsdb
    panel = Query("celery-overview", "Throughput by state", "sum(rate(celery_task_succeeded_total[1m]))")
    alert = Query(RULES_UID, "CeleryWorkerMetricsAbsent", "absent(celery_worker_up)")
    for query, old, new in ((panel, "celery_task_succeeded_total", "celery_task_success_total"),
                            (alert, "celery_worker_up", "celery_workers_up")):
        assert not name_problems(query, exported) and not data_problems(prometheus, query, window)
        renamed = query._replace(expr=query.expr.replace(old, new))
        assert name_problems(renamed, exported), renamed
        assert data_problems(prometheus, renamed, window), renamed


# --- the lexer behind the checks (no Prometheus needed) --------------------------------------------------------------
@pytest.mark.parametrize("expr, names", [
    ("sum by (le, task) (rate(celery_task_runtime_seconds_bucket{task=~\"a|b\"}[5m]))",
     {"celery_task_runtime_seconds_bucket"}),
    ("histogram_quantile(0.95, sum(rate(x_bucket[1m])) by (le)) / ignoring(queue) group_left(task) y offset 5m",
     {"x_bucket", "y"}),
    ('count({__name__="celery_worker_up", job="exporter"}) + on (job) vector(1)', {"celery_worker_up"}),
    ("max_over_time(deriv(celery_queue_length[10m])[30m:1m]) > bool 0 and absent(up)", {"celery_queue_length", "up"}),
    ("sum without (instance) (rate(process_cpu_seconds_total[$__rate_interval]))".replace("$__rate_interval", "1m"),
     {"process_cpu_seconds_total"}),
])
def test_metric_names(expr, names):
    assert metric_names(expr) == names


@pytest.mark.parametrize("expr, expected", [
    ("sum(rate(a[1m]))", ["sum(rate(a[1m]))"]),
    ("a == 0", ["a"]),
    ("absent(celery_worker_up)", ["celery_worker_up"]),
    ("absent_over_time(x{job=\"j\"}[5m])", ['x{job="j"}']),
    ("a / (b + (c or d * 0)) > 0.05", ["a / (b + (c or d * 0))"]),
    ("sum(a) > 100\nand\nsum(deriv(a[10m])) > 0", ["sum(a)", "sum(deriv(a[10m]))"]),
    ("x > bool on (job) group_left (task) 0.5 * y", ["x", "0.5 * y"]),
    ("(a > 1) or b < -2", ["a", "b"]),
    ("(sum(a) + 1) * 2", ["(sum(a) + 1) * 2"]),
    ("(sum(a) + 1)", ["sum(a) + 1"]),
])
def test_probes(expr, expected):
    assert probes(expr) == expected
