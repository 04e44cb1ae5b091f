"""Every Prometheus metric loadlab exports, named once (DESIGN.md's list plus the load generator's two).

Labels are bounded: ``task`` (registered task names), ``queue``, ``state``, ``serializer``, ``direction``; no task ids,
no hostnames (a worker's identity is the scrape target). The exporter service imports its names from here too.

Instruments (``counter``/``histogram``/``gauge``) write into one ``MetricStore`` per process (see
``loadlab.exporters.metric_store``): an in-place add under a lock, into a shared-memory file in worker processes. That is
several times cheaper per observation than prometheus_client's own classes, and the hot path runs a few times for
every task.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Literal

from prometheus_client.utils import floatToGoString

from loadlab.exporters.metric_store import COUNTER, GAUGE, HISTOGRAM, MetricStore, sample_key

Kind = Literal["counter", "histogram", "gauge"]

# Task latency (runtime, queue wait, end to end): 1 ms .. 2 min.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# One encode or decode: 5 us .. 1 s (a no-op task's body takes ~10 us in json).
SERIALIZATION_BUCKETS = (5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.1, 0.25, 1.0)
# Serialized body sizes: 64 B .. 16 MiB.
BYTES_BUCKETS = tuple(float(64 * 4 ** i) for i in range(10))


@dataclass(frozen=True)
class MetricSpec:
    name: str                       # exposition name; counters end in _total
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def family(self) -> str:
        """The metric family name (prometheus_client strips ``_total`` from counters)."""
        return self.name.removesuffix("_total") if self.kind == "counter" else self.name


TASK_LABELS = ("task", "queue")

# --- task lifecycle, from Celery signals (producer and worker processes) -------------------------------------------
TASK_SENT = MetricSpec("celery_task_sent_total", "counter",
                       "Tasks published by instrumented producers (first publish only; retries count as retried).", TASK_LABELS)
TASK_RECEIVED = MetricSpec("celery_task_received_total", "counter", "Task messages a worker received.", TASK_LABELS)
TASK_STARTED = MetricSpec("celery_task_started_total", "counter", "Task attempts that started running.", TASK_LABELS)
TASK_SUCCEEDED = MetricSpec("celery_task_succeeded_total", "counter", "Task attempts that succeeded.", TASK_LABELS)
TASK_FAILED = MetricSpec("celery_task_failed_total", "counter", "Task attempts that failed for good (no retry left).", TASK_LABELS)
TASK_RETRIED = MetricSpec("celery_task_retried_total", "counter", "Task attempts that ended in a retry.", TASK_LABELS)
TASK_REJECTED = MetricSpec("celery_task_rejected_total", "counter", "Task messages a worker rejected.", TASK_LABELS)
TASK_REVOKED = MetricSpec("celery_task_revoked_total", "counter", "Tasks revoked before or while running.", TASK_LABELS)
TASK_RUNTIME = MetricSpec("celery_task_runtime_seconds", "histogram",
                          "Task attempt run time in the worker (prerun to postrun, result store included).",
                          TASK_LABELS, LATENCY_BUCKETS)
TASK_QUEUE_WAIT = MetricSpec("celery_task_queue_wait_seconds", "histogram",
                             "Publish (or ETA) to start of a task attempt; needs an instrumented producer.",
                             TASK_LABELS, LATENCY_BUCKETS)
SERIALIZATION = MetricSpec("celery_task_serialization_seconds", "histogram",
                           "Time of one kombu encode or decode (task messages and results).",
                           ("direction", "serializer"), SERIALIZATION_BUCKETS)
MESSAGE_BYTES = MetricSpec("celery_task_message_bytes", "histogram",
                           "Serialized size of one message body before compression.",
                           ("direction", "serializer"), BYTES_BUCKETS)

# --- the load generator ---------------------------------------------------------------------------------------------
END_TO_END = MetricSpec("loadlab_task_end_to_end_seconds", "histogram",
                        "Submit (HTTP or apply_async) to result stored, per finished task.", ("task", "state"),
                        LATENCY_BUCKETS)
TASKS_IN_FLIGHT = MetricSpec("loadlab_tasks_in_flight", "gauge", "Tasks submitted and not yet finished.")

# --- the exporter service (loadlab.exporters.exporter_service defines and fills these) ---------------------------------------
QUEUE_LENGTH = celery_queue_length = "celery_queue_length"
QUEUE_UNACKED = celery_queue_unacked = "celery_queue_unacked"
WORKER_UP = celery_worker_up = "celery_worker_up"
WORKER_TASKS_ACTIVE = celery_worker_tasks_active = "celery_worker_tasks_active"

TASK_STATE_COUNTERS = (TASK_SENT, TASK_RECEIVED, TASK_STARTED, TASK_SUCCEEDED, TASK_FAILED, TASK_RETRIED,
                       TASK_REJECTED, TASK_REVOKED)
IN_PROCESS_SPECS = (*TASK_STATE_COUNTERS, TASK_RUNTIME, TASK_QUEUE_WAIT, SERIALIZATION, MESSAGE_BYTES)
LOADGEN_SPECS = (END_TO_END, TASKS_IN_FLIGHT)
ALL_NAMES = tuple(s.name for s in (*IN_PROCESS_SPECS, *LOADGEN_SPECS)) + (QUEUE_LENGTH, QUEUE_UNACKED, WORKER_UP,
                                                                          WORKER_TASKS_ACTIVE)
# Every name also as a module attribute of the same spelling (``metrics.celery_task_sent_total``), for code that
# only needs the string.
for _spec in (*IN_PROCESS_SPECS, *LOADGEN_SPECS):
    globals()[_spec.name] = _spec.name
del _spec


# --- instruments -----------------------------------------------------------------------------------------------------
class _Bound:
    __slots__ = ()


class BoundCounter(_Bound):
    __slots__ = ("_add", "key")

    def __init__(self, store: MetricStore, key: str):
        self._add = store.add
        self.key = key  # an attribute, not a property: read on per-task paths

    def inc(self, amount: float = 1.0) -> None:
        self._add(COUNTER, self.key, amount)


class BoundGauge(_Bound):
    __slots__ = ("_store", "_key")

    def __init__(self, store: MetricStore, key: str):
        self._store = store
        self._key = key

    def set(self, value: float) -> None:
        self._store.set(GAUGE, self._key, value)

    def inc(self, amount: float = 1.0) -> None:
        self._store.add(GAUGE, self._key, amount)


class BoundHistogram(_Bound):
    __slots__ = ("_observe", "bounds", "bucket_keys", "sum_key", "keys")

    def __init__(self, store: MetricStore, spec: MetricSpec, labelvalues: tuple[str, ...]):
        self._observe = store.observe
        self.bounds = spec.buckets
        names = (*spec.labels, "le")
        # one key per bucket (+Inf last), values non-cumulative as prometheus_client's multiprocess files keep them
        self.bucket_keys = tuple(
            sample_key(spec.family, spec.name + "_bucket", names, (*labelvalues, floatToGoString(bound)), spec.help)
            for bound in (*spec.buckets, float("inf")))
        self.sum_key = sample_key(spec.family, spec.name + "_sum", spec.labels, labelvalues, spec.help)
        self.keys = (self.bounds, self.bucket_keys, self.sum_key)  # what the store's recorders take

    def observe(self, value: float) -> None:
        self._observe(self.bucket_keys[bisect.bisect_left(self.bounds, value)], self.sum_key, value)

    def bucket_key(self, value: float) -> str:
        # le semantics: the first bucket whose bound is >= value
        return self.bucket_keys[bisect.bisect_left(self.bounds, value)]


class Instrument:
    """A metric of one store: ``labels(*values)`` returns a cached bound child (one dict lookup on the hot path)."""

    def __init__(self, spec: MetricSpec, store: MetricStore):
        self.spec = spec
        self.store = store
        self._children: dict[tuple, _Bound] = {}
        if spec.kind == HISTOGRAM:
            store.declare_histogram(spec.family, spec.help)

    def labels(self, *values: str) -> _Bound:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._bind(tuple(str(v) for v in values))
        return child

    def _bind(self, values: tuple[str, ...]) -> _Bound:
        spec = self.spec
        if len(values) != len(spec.labels):
            raise ValueError(f"{spec.name} takes labels {spec.labels}, got {values}")
        # every sample of a new child starts at 0, as prometheus_client does: a series exists from its first use
        # and a histogram always has all its buckets (histogram_quantile needs them)
        if spec.kind == HISTOGRAM:
            child = BoundHistogram(self.store, spec, values)
            for key in (*child.bucket_keys, child.sum_key):
                self.store.declare(HISTOGRAM, key)
            return child
        key = sample_key(spec.family, spec.name, spec.labels, values, spec.help)
        self.store.declare(spec.kind, key)
        return BoundCounter(self.store, key) if spec.kind == COUNTER else BoundGauge(self.store, key)


class Instruments:
    """The task-lifecycle and serialization instruments of one store."""

    def __init__(self, store: MetricStore):
        self.store = store
        self.sent = Instrument(TASK_SENT, store)
        self.received = Instrument(TASK_RECEIVED, store)
        self.started = Instrument(TASK_STARTED, store)
        self.succeeded = Instrument(TASK_SUCCEEDED, store)
        self.failed = Instrument(TASK_FAILED, store)
        self.retried = Instrument(TASK_RETRIED, store)
        self.rejected = Instrument(TASK_REJECTED, store)
        self.revoked = Instrument(TASK_REVOKED, store)
        self.runtime = Instrument(TASK_RUNTIME, store)
        self.queue_wait = Instrument(TASK_QUEUE_WAIT, store)
        self.serialization = Instrument(SERIALIZATION, store)
        self.message_bytes = Instrument(MESSAGE_BYTES, store)
        self.end_to_end = Instrument(END_TO_END, store)
        self.in_flight = Instrument(TASKS_IN_FLIGHT, store)


# The one store of this process and its instruments. Worker processes attach it to a shared-memory file
# (loadlab.exporters.worker_metrics); everywhere else it stays in memory and is exposed through ``store.collector()``.
STORE = MetricStore()
INSTRUMENTS = Instruments(STORE)
