"""Task metrics from Celery signals, in producers (sent) and in every worker process (received ... revoked, runtime,
queue wait), correct under the prefork pool and cheap with ``max_tasks_per_child`` recycling.

Design: every process counts into its own ``MetricStore`` (one in-place add per sample, under a lock). In a worker,
the store keeps its values in a shared-memory file named after the **pool slot**, not the pid: ``counter_main.db`` for
the MainProcess, ``counter_slot<i>.db`` for pool child *i* (billiard's process index, reused when a child is
recycled). The MainProcess serves ``/metrics`` (its only HTTP server) with prometheus_client's stock
``MultiProcessCollector`` over that directory.

Why slots: prometheus_client's multiprocess mode names files by pid, so every recycled child leaves its files behind
and a scrape reads them all (seconds at a few thousand). A replacement child opens its slot's files and continues the
cumulative totals its predecessor left there, so the directory holds at most ``concurrency + 1`` files per metric
kind, whatever the recycling, and nothing is lost when a child exits: each update is already in the shared mapping
(no delta to ship at exit, nothing to compact, ``mark_process_dead`` not needed — there are no live gauges). Billiard
starts a slot's replacement only after the previous child has exited, so one slot never has two writers. The
directory is a fresh ``mkdtemp`` per worker start (wiped by construction; the directories of killed workers are
removed at the next start), or ``PROMETHEUS_MULTIPROC_DIR`` emptied at start when that is set.

Queue wait needs the publish time: instrumented producers stamp ``loadlab_attempt_sent_at`` (the ledger's header)
on every publish, retries included (the ledger's hook when a ledger is configured, else this module's).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from celery import signals

from loadlab.exporters import task_signals
from loadlab.exporters.ledger import HEADER_ATTEMPT_SENT_AT
from loadlab.exporters.metrics import INSTRUMENTS, STORE

log = logging.getLogger("loadlab.metrics")

MAIN_SLOT = "main"
DIRECTORY_PREFIX = "loadlab-metrics-"
UNKNOWN = "unknown"

_state = {"installed": False, "directory": None, "owns_directory": False, "server": None}
_started: dict[str, tuple] = {}   # task id -> (perf_counter at prerun, its series); threads pools run several
_series: dict[tuple, "_Series"] = {}  # (task, routing key) as the message has them -> their series
_sent: dict[tuple, Callable[[], None]] = {}  # (task, routing key) as published -> the sent counter's recorder


def install(settings) -> None:
    """Connect the handlers once per process (producers count ``sent``; the rest only fires inside a worker)."""
    if _state["installed"]:
        return
    _state["installed"] = True
    _state["settings"] = settings
    if not settings.ledger_url:  # with a ledger its hook stamps the same header: one hook less per publish
        task_signals.connect(signals.before_task_publish, _before_publish)
    task_signals.connect_each({signals.after_task_publish: _after_publish, signals.task_received: _received,
                               signals.task_prerun: _prerun, signals.task_postrun: _postrun,
                               signals.task_rejected: _rejected, signals.task_revoked: _revoked})
    signals.worker_init.connect(_worker_init, weak=False, dispatch_uid="loadlab-metrics-worker-init")
    signals.worker_process_init.connect(_worker_process_init, weak=False, dispatch_uid="loadlab-metrics-process-init")
    signals.worker_shutdown.connect(_worker_shutdown, weak=False, dispatch_uid="loadlab-metrics-worker-shutdown")


class _Series:
    """The recorders of one (task, queue)'s samples: each hook makes one call into the store (see its recorders)."""

    __slots__ = ("received", "started", "started_after_wait", "ended_after", "count", "observe_runtime")

    def __init__(self, task: str, queue: str):
        i = INSTRUMENTS
        started, wait, runtime = (instrument.labels(task, queue) for instrument in (i.started, i.queue_wait, i.runtime))
        # a task's last state -> its counter (the states Celery reports in task_postrun, and the worker's own)
        counters = {state: instrument.labels(task, queue) for state, instrument in
                    (("SUCCESS", i.succeeded), ("FAILURE", i.failed), ("RETRY", i.retried),
                     ("REJECTED", i.rejected), ("REVOKED", i.revoked))}
        self.received = STORE.counter_recorder(i.received.labels(task, queue).key)
        self.started = STORE.counter_recorder(started.key)
        self.started_after_wait = STORE.counter_and_histogram_recorder(started.key, wait.keys)
        self.ended_after = {state: STORE.counter_and_histogram_recorder(counter.key, runtime.keys)
                            for state, counter in counters.items()}
        self.count = {state: counter.inc for state, counter in counters.items()}
        self.observe_runtime = runtime.observe


def _series_of(task: str | None, delivery_info) -> _Series:
    """The series of a task name and a message's delivery info (the queue label is its routing key)."""
    queue = delivery_info.get("routing_key") if delivery_info else None
    series = _series.get((task, queue))
    if series is None:
        series = _series[(task, queue)] = _Series(task or UNKNOWN, queue or UNKNOWN)
    return series


# --- producer side ---------------------------------------------------------------------------------------------------
def _before_publish(arguments):
    headers = arguments.get("headers")
    if headers is not None:
        headers[HEADER_ATTEMPT_SENT_AT] = time.time()


def _after_publish(arguments):
    headers = arguments.get("headers")
    if headers and headers.get("retries"):
        return  # a retry is counted once, as retried, by the worker that retried it
    task, queue = arguments.get("sender"), arguments.get("routing_key")
    record = _sent.get((task, queue))
    if record is None:
        record = _sent[(task, queue)] = STORE.counter_recorder(
            INSTRUMENTS.sent.labels(task or UNKNOWN, queue or UNKNOWN).key)
    record()


# --- worker MainProcess ----------------------------------------------------------------------------------------------
def _received(arguments):
    request = arguments.get("request")
    if request is not None:
        _series_of(request.name, request.delivery_info).received()


def _rejected(arguments):
    message = arguments.get("message")
    headers = getattr(message, "headers", None) or {}
    _series_of(headers.get("task"), getattr(message, "delivery_info", None)).count["REJECTED"]()


def _revoked(arguments):
    request = arguments.get("request")
    if request is None:
        return
    _series_of(getattr(request, "name", None), getattr(request, "delivery_info", None)).count["REVOKED"]()


# --- task execution (pool child, or the MainProcess of threads/solo/gevent pools) -----------------------------------
def _prerun(arguments):
    now = time.time()
    request = task_signals.request_of(arguments)
    series = _series_of(arguments["task"].name, request.delivery_info)
    sent_at = getattr(request, HEADER_ATTEMPT_SENT_AT, None)  # Celery's request has the message's headers
    if sent_at is None:
        sent_at = (getattr(request, "headers", None) or {}).get(HEADER_ATTEMPT_SENT_AT)
    if sent_at is None:
        series.started()
    else:
        if request.eta is not None:
            sent_at = max(sent_at, _timestamp(request.eta) or 0.0)
        series.started_after_wait(now - sent_at if now > sent_at else 0.0)
    # postrun finds the series here instead of looking the request up again
    _started[arguments["task_id"]] = (time.perf_counter(), series)


_NOT_STARTED = (None, None)


def _postrun(arguments):
    started, series = _started.pop(arguments["task_id"], _NOT_STARTED)
    if series is None:
        series = _series_of(arguments["task"].name, task_signals.request_of(arguments).delivery_info)
    state = arguments.get("state")
    if started is None:
        count = series.count.get(state)
        if count is not None:
            count()
        return
    runtime_s = time.perf_counter() - started
    record = series.ended_after.get(state)
    if record is None:
        series.observe_runtime(runtime_s)
    else:
        record(runtime_s)


def _timestamp(eta) -> float | None:
    if isinstance(eta, (int, float)):
        return float(eta)
    try:
        from datetime import datetime

        return datetime.fromisoformat(str(eta)).timestamp()
    except ValueError:
        return None


# --- worker lifecycle ------------------------------------------------------------------------------------------------
def _worker_init(sender=None, **_):
    """MainProcess, before the pool starts: a fresh directory, this process on the ``main`` slot, the HTTP server."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory, exist_ok=True)
    else:
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
        _remove_orphaned_directories(base)
        directory = tempfile.mkdtemp(prefix=f"{DIRECTORY_PREFIX}{os.getpid()}-", dir=base)
        _state["owns_directory"] = True
    _state["directory"] = directory
    STORE.attach(directory, MAIN_SLOT)
    hostname = getattr(sender, "hostname", None) or f"worker-{os.getpid()}"
    _state["server"] = serve(directory, _state["settings"], hostname)


def _remove_orphaned_directories(base: str) -> None:
    """Directories of workers that were killed (no warm shutdown to remove them): their pid is in the name."""
    for entry in os.scandir(base):
        if not entry.name.startswith(DIRECTORY_PREFIX):
            continue
        pid = entry.name[len(DIRECTORY_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(entry.path, ignore_errors=True)


def _worker_process_init(**_):
    """A pool child (fresh or a recycled slot's replacement) writes to its slot's files."""
    if _state["directory"] is None:
        return
    from billiard.process import current_process

    index = getattr(current_process(), "index", None)
    STORE.attach(_state["directory"], f"slot{index}" if index is not None else f"pid{os.getpid()}")


def _worker_shutdown(**_):
    server = _state.pop("server", None)
    if server is not None:
        server.shutdown()
    STORE.detach()
    if _state.get("owns_directory") and _state.get("directory"):
        shutil.rmtree(_state["directory"], ignore_errors=True)
    _state["directory"] = None


def serve(directory: str, settings, name: str):
    """The worker's /metrics (every slot file merged) on ``metrics_host``; the address goes to
    ``<run_dir>/ports/<name>.json`` so the stack can find it."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector
    from prometheus_client.process_collector import ProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    ProcessCollector(registry=registry)
    host = settings.metrics_host
    try:
        server, _thread = start_http_server(settings.metrics_port, addr=host, registry=registry)
    except OSError as exc:
        if not settings.metrics_port:
            raise
        # another process of this machine has the port (several workers of one stack): take a free one
        log.warning("metrics port %s is taken (%s); serving /metrics on a free port", settings.metrics_port, exc)
        server, _thread = start_http_server(0, addr=host, registry=registry)
    port = server.server_port
    log.info("serving /metrics on %s:%s", host, port)
    if settings.run_dir:
        write_port_file(Path(settings.run_dir), name, "worker", port, host, multiprocess_dir=directory)
    return server


def write_port_file(run_dir: Path, name: str, kind: str, port: int, host: str, **extra) -> Path:
    """``<run_dir>/ports/<name>.json``: where a process of the stack serves /metrics (loadlab.exporters.scrape reads these)."""
    ports = run_dir / "ports"
    ports.mkdir(parents=True, exist_ok=True)
    local = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
    path = ports / f"{name}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"name": name, "kind": kind, "url": f"http://{local}:{port}/metrics",
                               "pid": os.getpid(), **extra}))
    tmp.replace(path)  # readers never see half a file
    return path
