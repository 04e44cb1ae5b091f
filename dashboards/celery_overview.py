""""Celery overview": the whole deployment at a glance. Every PromQL expression of the dashboard is in ``SPEC``.

Overview queries aggregate away every label except the one a panel is about, so they keep working whatever optional
labels (hostname, queue) the exporters add.
"""
from __future__ import annotations

from .spec import RATE, DashboardSpec, PanelSpec, Target, quantiles

UID = "celery-overview"

# The task-state counters of DESIGN.md, in lifecycle order.
STATES: tuple[str, ...] = ("sent", "received", "started", "succeeded", "failed", "retried", "rejected", "revoked")


def _rate(metric: str, by: str = "") -> str:
    grouping = f" by ({by}) " if by else ""
    return f"sum{grouping}(rate({metric}[{RATE}]))"


# failed / (failed + succeeded) from rates over the panel's window, never from the cumulative counters (those would
# show the ratio since the workers started). `or vector(0)`: a labelled counter has no series until its first
# failure, and a missing numerator must read as 0 %, not as "no data".
FAILED_RATE = f"({_rate('celery_task_failed_total')} or vector(0))"
FAILURE_RATIO = f"{FAILED_RATE} / ({_rate('celery_task_succeeded_total')} + {FAILED_RATE})"

SPEC = DashboardSpec(
    uid=UID,
    title="Celery overview",
    description="Throughput, failures, backlog, workers, latency, retries and serialization cost of a Celery deployment.",
    panels=(
        PanelSpec(
            "Workers up",
            (Target("sum(celery_worker_up)", "workers up"),),
            description="Workers whose heartbeats the exporter saw within its timeout.",
            kind="stat", width=6, height=5,
            thresholds=((None, "red"), (1, "green")),
        ),
        PanelSpec(
            "Active tasks",
            (Target("sum(celery_worker_tasks_active)", "active"),),
            description="Tasks executing right now, over all workers.",
            kind="stat", width=6, height=5,
        ),
        PanelSpec(
            "Queue depth (now)",
            (Target("sum(celery_queue_length)", "ready"),),
            description="Messages waiting in all queues (Redis priority sub-queues included).",
            kind="stat", width=6, height=5,
            thresholds=((None, "green"), (100, "orange"), (1000, "red")),
        ),
        PanelSpec(
            "Failure ratio (now)",
            (Target(FAILURE_RATIO, "failure ratio"),),
            description="failed / (failed + succeeded), from rates over the dashboard's rate window.",
            kind="stat", unit="percentunit", width=6, height=5,
            thresholds=((None, "green"), (0.01, "orange"), (0.05, "red")),
        ),
        PanelSpec(
            "Throughput by state",
            tuple(Target(_rate(f"celery_task_{state}_total"), state) for state in STATES),
            description="Task state transitions per second.",
            unit="ops", width=24,
        ),
        PanelSpec(
            "Failure ratio",
            (Target(FAILURE_RATIO, "failure ratio"),),
            description="failed / (failed + succeeded), from rates, not cumulative counters.",
            unit="percentunit", max=1,
        ),
        PanelSpec(
            "Queue depth",
            (
                Target("sum by (queue) (celery_queue_length)", "{{queue}} ready"),
                Target("sum by (queue) (celery_queue_unacked)", "{{queue}} unacked"),
            ),
            description="Ready messages per queue, and messages delivered to workers but not yet acknowledged.",
        ),
        PanelSpec(
            "Workers up and active tasks",
            (
                Target("sum(celery_worker_up)", "workers up"),
                Target("sum(celery_worker_tasks_active)", "active tasks"),
            ),
            description="A drop in workers up with active tasks flat at the pool size means the pool is saturated.",
        ),
        PanelSpec(
            "Queue wait p95",
            quantiles("celery_task_queue_wait_seconds", (0.95,)),
            description="Time from publish to the start of execution, 95th percentile.",
            unit="s",
        ),
        PanelSpec(
            "Task runtime p50 / p95 / p99",
            quantiles("celery_task_runtime_seconds", (0.5, 0.95, 0.99)),
            description="Execution time inside the worker.",
            unit="s",
        ),
        PanelSpec(
            "Retries",
            (Target(_rate("celery_task_retried_total", "task"), "{{task}}"),),
            description="Retries per second by task.",
            unit="ops",
        ),
        PanelSpec(
            "Serialization time p95",
            quantiles("celery_task_serialization_seconds", (0.95,), by="serializer, direction"),
            description="Encode and decode time per message, by serializer and direction.",
            unit="s",
        ),
        PanelSpec(
            "Message size",
            (
                *quantiles("celery_task_message_bytes", (0.5, 0.95), by="serializer"),
                Target(_rate("celery_task_message_bytes_sum", "serializer"), "{{serializer}} bytes/s"),
            ),
            description="Encoded message size percentiles, and bytes serialized per second, by serializer.",
            unit="bytes", right_axis=("C",), right_unit="Bps",
        ),
    ),
)
