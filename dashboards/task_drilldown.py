""""Task drill-down": the same signals as the overview, per task, for the tasks picked in the ``task`` variable.

Every PromQL expression of the dashboard is in ``SPEC``.
"""
from __future__ import annotations

from .celery_overview import STATES
from .spec import RATE, DashboardSpec, PanelSpec, Target, VariableSpec, quantiles

UID = "celery-task-drilldown"

TASK = '{task=~"$task"}'


def _rate(metric: str) -> str:
    return f"sum by (task) (rate({metric}{TASK}[{RATE}]))"


# Per-task ratio. `or ... * 0` supplies a 0 rate for a task that never succeeded (its succeeded series does not exist),
# so a task that only fails shows 100 % instead of disappearing from the panel.
FAILED = _rate("celery_task_failed_total")
SUCCEEDED = _rate("celery_task_succeeded_total")
FAILURE_RATIO = f"{FAILED} / ({FAILED} + ({SUCCEEDED} or {FAILED} * 0))"
RETRIES_PER_SUCCESS = f"{_rate('celery_task_retried_total')} / {SUCCEEDED}"

SPEC = DashboardSpec(
    uid=UID,
    title="Task drill-down",
    description="Throughput, failures, latency and retries of the selected Celery tasks.",
    variables=(
        VariableSpec(
            name="task",
            label="Task",
            query="label_values(celery_task_succeeded_total, task)",
            promql="group by (task) (celery_task_succeeded_total)",
        ),
    ),
    panels=(
        PanelSpec(
            "Succeeded per second by task",
            (Target(_rate("celery_task_succeeded_total"), "{{task}}"),),
            unit="ops",
        ),
        PanelSpec(
            "State transitions of the selected tasks",
            tuple(
                Target(f"sum(rate(celery_task_{state}_total{TASK}[{RATE}]))", state) for state in STATES
            ),
            description="All selected tasks together, one line per state.",
            unit="ops",
        ),
        PanelSpec(
            "Failure ratio by task",
            (Target(FAILURE_RATIO, "{{task}}"),),
            description="failed / (failed + succeeded) per task, from rates.",
            unit="percentunit", max=1,
        ),
        PanelSpec(
            "Retries per success by task",
            (Target(RETRIES_PER_SUCCESS, "{{task}}"),),
            description="Above 1 the task retries more often than it completes: a retry storm.",
        ),
        PanelSpec(
            "Runtime p50 / p95 / p99 by task",
            quantiles("celery_task_runtime_seconds", (0.5, 0.95, 0.99), by="task", selector=TASK),
            unit="s",
        ),
        PanelSpec(
            "Queue wait p95 by task",
            quantiles("celery_task_queue_wait_seconds", (0.95,), by="task", selector=TASK),
            unit="s",
        ),
    ),
)
