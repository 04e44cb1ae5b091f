""""Load test": end-to-end latency against the load the harness applies, and what the harness itself costs.

Every PromQL expression of the dashboard is in ``SPEC``. ``loadlab_task_end_to_end_seconds`` (histogram, submit to
result) and ``loadlab_tasks_in_flight`` (gauge, submitted and not yet finished) are exported by the load generator;
``process_cpu_seconds_total`` comes from prometheus_client's process collector in every scraped process and
``scrape_duration_seconds`` / ``scrape_samples_scraped`` are written by Prometheus itself for every target.
"""
from __future__ import annotations

from .spec import RATE, DashboardSpec, PanelSpec, Target, quantiles

UID = "loadlab-load-test"

E2E = "loadlab_task_end_to_end_seconds"
IN_FLIGHT = "sum(loadlab_tasks_in_flight)"
COMPLETED = (
    f"sum(rate(celery_task_succeeded_total[{RATE}])) + (sum(rate(celery_task_failed_total[{RATE}])) or vector(0))"
)

SPEC = DashboardSpec(
    uid=UID,
    title="Load test",
    description="End-to-end task latency against offered load, and the harness's own overhead.",
    tags=("loadlab", "celery", "load-test"),
    panels=(
        PanelSpec(
            "End-to-end latency p50 / p95 / p99",
            quantiles(E2E, (0.5, 0.95, 0.99)),
            description="From submit (HTTP or apply_async) to the result being available.",
            unit="s",
        ),
        PanelSpec(
            "End-to-end p95 against tasks in flight",
            (*quantiles(E2E, (0.95,)), Target(IN_FLIGHT, "tasks in flight")),
            description="Latency (left axis) rising with in-flight work (right axis) shows where the stack saturates.",
            unit="s", right_axis=("B",), right_unit="short",
        ),
        PanelSpec(
            "Offered and completed load",
            (
                Target(f"sum(rate(celery_task_sent_total[{RATE}]))", "submitted/s"),
                Target(COMPLETED, "completed/s"),
                Target(IN_FLIGHT, "in flight"),
            ),
            description="Submitted faster than completed means the backlog (and in-flight count) grows.",
            unit="ops", right_axis=("C",), right_unit="short",
        ),
        PanelSpec(
            "Tasks in flight",
            (Target(IN_FLIGHT, "in flight"),),
            kind="stat", width=12, height=8,
        ),
        PanelSpec(
            "Harness CPU by job",
            (Target(f"sum by (job) (rate(process_cpu_seconds_total[{RATE}]))", "{{job}}"),),
            description="CPU cores used by each scraped process group (1.0 = one core): the cost of the harness itself.",
            unit="short",
        ),
        PanelSpec(
            "Scrape duration by job",
            (
                Target("max by (job) (scrape_duration_seconds)", "{{job}} slowest target"),
                Target("sum by (job) (scrape_samples_scraped)", "{{job}} samples"),
            ),
            description="How long Prometheus waits on each job's /metrics (left), and how many samples it returns (right).",
            unit="s", right_axis=("B",), right_unit="short",
        ),
    ),
)
