"""The exporter's view of the event stream (:class:`EventState`): worker liveness and task counts from events, kept
as plain dicts updated in place; read by the exporter service's collector."""
from __future__ import annotations

import time
from bisect import bisect_left
from itertools import islice

from loadlab.exporters import metrics as names

HEARTBEAT_TIMEOUT_FACTOR = 2.5     # × the worker's announced heartbeat interval
DEFAULT_HEARTBEAT_FREQ_S = 2.0
FORGET_WORKER_AFTER_S = 600.0
MAX_TRACKED_TASKS = 100_000        # id -> name entries kept for tasks in flight
MAX_TASK_NAMES = 500               # distinct task label values; the rest count as "other"
UNKNOWN_TASK = "unknown"
OTHER_TASK = "other"
RUNTIME_BUCKETS = names.TASK_RUNTIME.buckets

# event type -> counter name (names are defined once, in loadlab.exporters.metrics)
TASK_COUNTERS = {
    "task-sent": names.TASK_SENT.name,
    "task-received": names.TASK_RECEIVED.name,
    "task-started": names.TASK_STARTED.name,
    "task-succeeded": names.TASK_SUCCEEDED.name,
    "task-failed": names.TASK_FAILED.name,
    "task-retried": names.TASK_RETRIED.name,
    "task-rejected": names.TASK_REJECTED.name,
    "task-revoked": names.TASK_REVOKED.name,
}
RUNTIME_METRIC = names.TASK_RUNTIME.name


# --- event handling --------------------------------------------------------------------------------------------------
class EventState:
    """The exporter's view of the event stream, kept as plain dicts updated in place.

    ``handle(event)`` is the whole per-event cost: one dict lookup picks a small closure that bumps a counter and
    touches at most two dicts. Workers: ``hostname -> [last_seen (monotonic, local), freq, active, processed, online]``.
    Tasks: counts per event type and task name; the name comes with ``task-sent``/``task-received`` and is looked up by
    id for later events, so the id map holds only tasks in flight (terminal events remove them; it is halved, oldest
    first, if it ever exceeds ``max_tasks``, e.g. when terminal events were missed).
    """

    def __init__(self, *, task_events: bool = True, max_tasks: int = MAX_TRACKED_TASKS, clock=time.monotonic,
                 buckets: tuple[float, ...] = RUNTIME_BUCKETS):
        self.task_events = task_events
        self.max_tasks = max_tasks
        self.clock = clock
        self.buckets = tuple(buckets)
        self.workers: dict[str, list] = {}
        self.counts: dict[str, dict[str, int]] = {etype: {} for etype in TASK_COUNTERS}
        self.names: dict[str, str] = {}
        # task name -> [count per bucket (+Inf last)..., sum]
        self.runtime: dict[str, list] = {}
        self.events = 0
        self._handlers = self._build_handlers()

    def handle(self, event: dict) -> None:
        self.events += 1
        handler = self._handlers.get(event.get("type"))
        if handler is not None:
            handler(event)

    # -- handlers ---------------------------------------------------------------------------------------------------
    def _build_handlers(self) -> dict:
        handlers = {"worker-heartbeat": self._worker_alive, "worker-online": self._worker_alive,
                    "worker-offline": self._worker_offline}
        if not self.task_events:
            return handlers
        names_map, counts = self.names, self.counts
        max_tasks = self.max_tasks

        def bump(table: dict, name: str) -> None:
            n = table.get(name)
            if n is None:
                if len(table) >= MAX_TASK_NAMES:
                    name = OTHER_TASK
                n = table.get(name, 0)
            table[name] = n + 1

        def named(etype):
            table = counts[etype]

            def on_named(event):
                name = event.get("name") or UNKNOWN_TASK
                uuid = event.get("uuid")
                if uuid is not None:
                    names_map[uuid] = name
                    if len(names_map) > max_tasks:
                        self._trim_names()
                bump(table, name)
            return on_named

        def running(etype):
            table = counts[etype]

            def on_running(event):
                bump(table, names_map.get(event.get("uuid"), UNKNOWN_TASK))
            return on_running

        def terminal(etype):
            table = counts[etype]

            def on_terminal(event):
                bump(table, names_map.pop(event.get("uuid"), UNKNOWN_TASK))
            return on_terminal

        succeeded_table = counts["task-succeeded"]
        runtime, bounds, nbounds = self.runtime, self.buckets, len(self.buckets)

        def on_succeeded(event):
            name = names_map.pop(event.get("uuid"), UNKNOWN_TASK)
            bump(succeeded_table, name)
            seconds = event.get("runtime")
            if seconds is not None:
                hist = runtime.get(name)
                if hist is None:
                    if len(runtime) >= MAX_TASK_NAMES:
                        name = OTHER_TASK
                    hist = runtime.setdefault(name, [0] * (nbounds + 2))
                hist[bisect_left(bounds, seconds)] += 1
                hist[-1] += seconds

        handlers.update({
            "task-sent": named("task-sent"),
            "task-received": named("task-received"),
            "task-started": running("task-started"),
            "task-retried": running("task-retried"),
            "task-succeeded": on_succeeded,
            "task-failed": terminal("task-failed"),
            "task-rejected": terminal("task-rejected"),
            "task-revoked": terminal("task-revoked"),
        })
        return handlers

    def _worker_key(self, node: str | None) -> str | None:
        """The ``hostname`` label of a worker's node name (the detailed mode shortens it)."""
        return node

    def _worker_alive(self, event: dict) -> None:
        host = self._worker_key(event.get("hostname"))
        if host is None:
            return
        slot = self.workers.get(host)
        if slot is None:
            slot = self.workers[host] = [0.0, DEFAULT_HEARTBEAT_FREQ_S, 0, 0, True]
        slot[0] = self.clock()
        slot[1] = event.get("freq") or DEFAULT_HEARTBEAT_FREQ_S
        # a heartbeat answering the exporter's wake-up broadcast carries no counts: keep the last ones
        active = event.get("active")
        if active is not None:
            slot[2] = active
            slot[3] = event.get("processed") or slot[3]
        slot[4] = True

    def _worker_offline(self, event: dict) -> None:
        slot = self.workers.get(self._worker_key(event.get("hostname")))
        if slot is not None:
            slot[0] = self.clock()
            slot[2] = 0
            slot[4] = False

    def _trim_names(self) -> None:
        names_map = self.names
        for uuid in list(islice(names_map, len(names_map) // 2)):
            del names_map[uuid]

    # -- reading (from the HTTP thread) -------------------------------------------------------------------------------
    def worker_status(self, now: float, timeout: float | None = None) -> dict[str, tuple[int, int]]:
        """hostname -> (up, active) as of ``now``; forgets workers silent for FORGET_WORKER_AFTER_S."""
        status = {}
        for host, slot in list(self.workers.items()):
            last_seen, freq, active, _processed, online = slot
            silent = now - last_seen
            if silent > FORGET_WORKER_AFTER_S:
                self.workers.pop(host, None)
                continue
            limit = timeout if timeout is not None else HEARTBEAT_TIMEOUT_FACTOR * float(freq)
            up = 1 if online and silent <= limit else 0
            status[host] = (up, int(active) if up else 0)
        return status

    def task_snapshot(self) -> tuple[dict[str, dict[str, int]], dict[str, list]]:
        counts = {etype: table.copy() for etype, table in self.counts.items()}
        runtime = {name: list(hist) for name, hist in self.runtime.copy().items()}
        return counts, runtime


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))
