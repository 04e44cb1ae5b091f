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
from pathlib import Path

from celery import signals

from exporters.metrics import INSTRUMENTS, STORE
from reports.ledger import HEADER_ATTEMPT_SENT_AT
from stack import task_signals

log = logging.getLogger("loadlab.metrics")

MAIN_SLOT = "main"
DIRECTORY_PREFIX = "loadlab-metrics-"
UNKNOWN = "unknown"

_state = {"installed": False, "directory": None, "owns_directory": False, "server": None}
_started: dict[str, tuple] = {}   # task id -> (perf_counter at prerun, its instruments); threads pools run several
_per_task: dict[tuple[str, str], tuple] = {}  # (task, queue) -> bound instruments, one lookup per signal


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


def _instruments_for(task: str, queue: str) -> tuple:
    bound = _per_task.get((task, queue))
    if bound is None:
        i = INSTRUMENTS
        bound = _per_task[(task, queue)] = tuple(
            instrument.labels(task, queue) for instrument in
            (i.received, i.started, i.succeeded, i.failed, i.retried, i.rejected, i.revoked, i.runtime, i.queue_wait))
    return bound


RECEIVED, STARTED, SUCCEEDED, FAILED, RETRIED, REJECTED, REVOKED, RUNTIME, QUEUE_WAIT = range(9)
_STATE_COUNTER = {"SUCCESS": SUCCEEDED, "FAILURE": FAILED, "RETRY": RETRIED, "REJECTED": REJECTED, "REVOKED": REVOKED}


def _queue_of(delivery_info) -> str:
    if not delivery_info:
        return UNKNOWN
    return delivery_info.get("routing_key") or UNKNOWN


# --- producer side ---------------------------------------------------------------------------------------------------
def _before_publish(arguments):
    headers = arguments.get("headers")
    if headers is not None:
        headers[HEADER_ATTEMPT_SENT_AT] = time.time()


def _after_publish(arguments):
    headers = arguments.get("headers")
    if headers and headers.get("retries"):
        return  # a retry is counted once, as retried, by the worker that retried it
    INSTRUMENTS.sent.labels(arguments.get("sender") or UNKNOWN, arguments.get("routing_key") or UNKNOWN).inc()


# --- worker MainProcess ----------------------------------------------------------------------------------------------
def _received(arguments):
    request = arguments.get("request")
    if request is not None:
        _instruments_for(request.name or UNKNOWN, _queue_of(request.delivery_info))[RECEIVED].inc()


def _rejected(arguments):
    message = arguments.get("message")
    headers = getattr(message, "headers", None) or {}
    _instruments_for(headers.get("task") or UNKNOWN, _queue_of(getattr(message, "delivery_info", None)))[REJECTED].inc()


def _revoked(arguments):
    request = arguments.get("request")
    if request is None:
        return
    _instruments_for(getattr(request, "name", None) or UNKNOWN,
                     _queue_of(getattr(request, "delivery_info", None)))[REVOKED].inc()


# --- task execution (pool child, or the MainProcess of threads/solo/gevent pools) -----------------------------------
def _header(request, name):
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return value


def _prerun(arguments):
    now = time.time()
    task = arguments["task"]
    request = task_signals.request_of(arguments)
    bound = _instruments_for(task.name, _queue_of(request.delivery_info))
    sent_at = _header(request, HEADER_ATTEMPT_SENT_AT)
    if sent_at is None:
        bound[STARTED].inc()
    else:
        if request.eta is not None:
            sent_at = max(sent_at, _timestamp(request.eta) or 0.0)
        queue_wait = max(0.0, now - sent_at)
        wait = bound[QUEUE_WAIT]
        STORE.count_and_observe(bound[STARTED].key, wait.bucket_key(queue_wait), wait.sum_key, queue_wait)
    # postrun finds the instruments here instead of looking the request up again
    _started[arguments["task_id"]] = (time.perf_counter(), bound)


def _postrun(arguments):
    started, bound = _started.pop(arguments["task_id"], (None, None))
    if bound is None:
        task = arguments["task"]
        bound = _instruments_for(task.name, _queue_of(task.request.delivery_info))
    index = _STATE_COUNTER.get(arguments.get("state"))
    if started is None:
        if index is not None:
            bound[index].inc()
        return
    runtime_s = time.perf_counter() - started
    runtime = bound[RUNTIME]
    if index is None:
        runtime.observe(runtime_s)
    else:
        STORE.count_and_observe(bound[index].key, runtime.bucket_key(runtime_s), runtime.sum_key, runtime_s)


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
    """``<run_dir>/ports/<name>.json``: where a process of the stack serves /metrics (exporters.scrape reads these)."""
    ports = run_dir / "ports"
    ports.mkdir(parents=True, exist_ok=True)
    local = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
    path = ports / f"{name}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"name": name, "kind": kind, "url": f"http://{local}:{port}/metrics",
                               "pid": os.getpid(), **extra}))
    tmp.replace(path)  # readers never see half a file
    return path
