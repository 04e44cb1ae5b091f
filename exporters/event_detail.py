"""The exporter's detailed event mode (``loadlab exporter --task-events --task-detail``): what celery-exporter exports
from events, with its label sets, for users who want those series from loadlab (and for an equal-work comparison in
``loadlab bench exporter``).

Per task it keeps what the series need (name, queue, receive time) while the task is in flight; per event it adds
to a counter labelled by task name, the worker's host and queue (``task-failed`` also by exception class), and to a
runtime (``task-succeeded``) or queue-wait (``task-received`` -> ``task-started``) histogram with the same labels.
Like celery-exporter: the host is the part of the event's node name after ``@`` (``celery@worker-1`` -> ``worker-1``,
also for ``celery_worker_up``/``celery_worker_tasks_active``), the queue is the one ``task-sent`` names (else
``celery``), and a label set first seen in a worker's event gets every counter at 0 (so rates of never-failed tasks
exist), ``task-failed``'s with ``exception=""``.
"""
from __future__ import annotations

import re
from bisect import bisect_left

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from loadlab.exporters import metrics as names
from loadlab.exporters.event_state import MAX_TRACKED_TASKS, TASK_COUNTERS, UNKNOWN_TASK, EventState, _le

DETAIL_LABELS = ("task", "hostname", "queue")
DEFAULT_QUEUE = "celery"
UNKNOWN_EXCEPTION = "UnknownException"
_EXCEPTION_CLASS = re.compile(r"^(\w+)\(")


def short_hostname(node: str | None) -> str:
    """``name@host`` -> ``host`` (Celery's ``nodesplit``; a name without ``@`` is the host)."""
    if not node:
        return ""
    return node.rpartition("@")[2]


def exception_class(text: str | None) -> str:
    match = _EXCEPTION_CLASS.match(text or "")
    return match.group(1) if match else UNKNOWN_EXCEPTION


class DetailedEventState(EventState):
    """:class:`EventState` plus per-task state, counters and histograms by task name, host and queue."""

    def __init__(self, *, max_tasks: int = MAX_TRACKED_TASKS, buckets: tuple[float, ...] = names.TASK_RUNTIME.buckets,
                 **kwargs):
        # uuid -> [name, queue, received timestamp or None]
        self.tasks: dict[str, list] = {}
        # event type -> {(task, hostname, queue[, exception]): n}
        self.detail_counts: dict[str, dict[tuple, int]] = {etype: {} for etype in TASK_COUNTERS}
        # (task, hostname, queue) -> [count per bucket (+Inf last)..., sum]
        self.runtime_detail: dict[tuple, list] = {}
        self.queue_wait_detail: dict[tuple, list] = {}
        self._seen_labels: set[tuple] = set()
        super().__init__(task_events=False, max_tasks=max_tasks, buckets=buckets, **kwargs)
        self.task_events = True
        self._handlers.update(self._detail_handlers())

    def _worker_key(self, node: str | None) -> str | None:
        return short_hostname(node) if node else None

    def _detail_handlers(self) -> dict:
        tasks, counts, seen = self.tasks, self.detail_counts, self._seen_labels
        bounds, width = self.buckets, len(self.buckets) + 2
        runtime, queue_wait = self.runtime_detail, self.queue_wait_detail
        max_tasks = self.max_tasks
        zero_rows = [(table, etype == "task-failed") for etype, table in counts.items()]

        def labels_of(event, task):
            key = (task[0], short_hostname(event.get("hostname")), task[1])
            if key not in seen:
                seen.add(key)
                for table, failed in zero_rows:
                    zero_key = (*key, "") if failed else key
                    table.setdefault(zero_key, 0)
            return key

        def observe(hists, key, seconds):
            hist = hists.get(key)
            if hist is None:
                hist = hists[key] = [0] * width
            hist[bisect_left(bounds, seconds)] += 1
            hist[-1] += seconds

        def task_of(event, name=None):
            uuid = event.get("uuid")
            task = tasks.get(uuid)
            if task is None:
                task = tasks[uuid] = [name or UNKNOWN_TASK, DEFAULT_QUEUE, None]
                if len(tasks) > max_tasks:
                    self._trim_tasks()
            elif name:
                task[0] = name
            return task

        def on_sent(event):
            task = task_of(event, event.get("name"))
            task[1] = event.get("queue") or DEFAULT_QUEUE
            # task-sent comes from the producer's host: celery-exporter neither zero-fills for it
            key = (task[0], short_hostname(event.get("hostname")), task[1])
            table = counts["task-sent"]
            table[key] = table.get(key, 0) + 1

        def counted(etype, terminal=False):
            table = counts[etype]

            def on_event(event):
                task = tasks.pop(event.get("uuid"), None) if terminal else task_of(event, event.get("name"))
                if task is None:
                    task = [UNKNOWN_TASK, DEFAULT_QUEUE, None]
                key = labels_of(event, task)
                table[key] = table.get(key, 0) + 1
                if etype == "task-received":
                    task[2] = event.get("timestamp")
                elif etype == "task-started" and task[2] is not None and event.get("timestamp") is not None:
                    observe(queue_wait, key, max(0.0, event["timestamp"] - task[2]))
                elif etype == "task-retried":
                    task[2] = None
            return on_event

        failed_table = counts["task-failed"]

        def on_failed(event):
            task = tasks.pop(event.get("uuid"), None) or [UNKNOWN_TASK, DEFAULT_QUEUE, None]
            key = (*labels_of(event, task), exception_class(event.get("exception")))
            failed_table[key] = failed_table.get(key, 0) + 1

        def on_succeeded(event):
            task = tasks.pop(event.get("uuid"), None) or [UNKNOWN_TASK, DEFAULT_QUEUE, None]
            key = labels_of(event, task)
            table = counts["task-succeeded"]
            table[key] = table.get(key, 0) + 1
            seconds = event.get("runtime")
            if seconds is not None:
                observe(runtime, key, seconds)

        return {"task-sent": on_sent, "task-received": counted("task-received"),
                "task-started": counted("task-started"), "task-retried": counted("task-retried"),
                "task-succeeded": on_succeeded, "task-failed": on_failed,
                "task-rejected": counted("task-rejected", terminal=True),
                "task-revoked": counted("task-revoked", terminal=True)}

    def _trim_tasks(self) -> None:
        from itertools import islice

        for uuid in list(islice(self.tasks, len(self.tasks) // 2)):
            del self.tasks[uuid]

    def families(self):
        """The task series, as Prometheus metric families (read from the HTTP thread: copies first)."""
        for etype, metric in TASK_COUNTERS.items():
            labels = [*DETAIL_LABELS, "exception"] if etype == "task-failed" else list(DETAIL_LABELS)
            family = CounterMetricFamily(metric, f"Tasks seen in {etype} events.", labels=labels)
            for key, n in self.detail_counts[etype].copy().items():
                family.add_metric(list(key), n)
            yield family
        for spec, table in ((names.TASK_RUNTIME, self.runtime_detail), (names.TASK_QUEUE_WAIT, self.queue_wait_detail)):
            family = HistogramMetricFamily(spec.name, spec.help, labels=list(DETAIL_LABELS))
            for key, row in table.copy().items():
                cumulative, buckets = 0, []
                for bound, n in zip((*self.buckets, float("inf")), row[:-1]):
                    cumulative += n
                    buckets.append((_le(bound), cumulative))
                family.add_metric(list(key), buckets, row[-1])
            yield family
