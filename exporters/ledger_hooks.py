"""Celery signal handlers that feed the ledger: phase timestamps travel in message headers from the first publish
through every retry, and the worker side reports each attempt once it has stored its result.

Phases (all wall-clock seconds, one machine): publish = before -> after publishing; queue_wait = attempt sent (or
its ETA) -> started; execution = started -> task body returned; end_to_end = first sent -> result stored.
"""
from __future__ import annotations

import socket
import threading
import time

from celery import signals

from loadlab.exporters import ledger, task_signals

_sink: ledger.LedgerSink | None = None
_local = threading.local()
_inflight: dict[str, list] = {}  # task_id -> [started_at, exception_type]; one entry per running task
_hostname = socket.gethostname()


def body_finished() -> None:
    """Called by a task body as it returns, so that execution excludes storing the result."""
    _local.body_done_at = time.time()


def install(ledger_url: str | None, run_id: str) -> None:
    """Connect the handlers once per process; without a ledger URL nothing is recorded."""
    global _sink
    if not ledger_url:
        return
    _sink = ledger.LedgerSink(ledger_url, run_id)
    task_signals.connect_each({signals.before_task_publish: _before_publish, signals.after_task_publish: _after_publish,
                               signals.task_prerun: _prerun, signals.task_retry: _retry, signals.task_failure: _failure,
                               signals.task_postrun: _postrun, signals.task_revoked: _revoked})


def _before_publish(arguments):
    headers = arguments.get("headers")
    if headers is None:
        return
    now = time.time()
    headers.setdefault(ledger.HEADER_SENT_AT, now)  # kept by Task.retry: the first publish of the task
    headers[ledger.HEADER_ATTEMPT_SENT_AT] = now


def _after_publish(arguments):
    headers = arguments.get("headers")
    if not headers or headers.get("retries"):
        return  # retries are reported by the worker side, not as new submissions
    attempt_sent_at = headers.get(ledger.HEADER_ATTEMPT_SENT_AT)
    if attempt_sent_at is None:
        return
    task_id = headers["id"]
    root_id = headers.get("root_id")
    _sink.push([ledger.SENT, task_id, arguments.get("sender"), headers.get(ledger.HEADER_SENT_AT, attempt_sent_at),
                time.time() - attempt_sent_at, headers.get(ledger.HEADER_INTENDED_AT), headers.get("parent_id"),
                root_id if root_id != task_id else None])


def _prerun(arguments):
    _local.body_done_at = None
    _inflight[arguments.get("task_id")] = [time.time(), None]


def _retry(arguments):
    request, reason = arguments.get("request"), arguments.get("reason")
    entry = _inflight.get(getattr(request, "id", None))
    if entry is not None:
        entry[1] = type(getattr(reason, "exc", None) or reason).__name__


def _failure(arguments):
    sender, task_id, exception = arguments.get("sender"), arguments.get("task_id"), arguments.get("exception")
    entry = _inflight.get(task_id)
    if entry is not None:
        entry[1] = type(exception).__name__
        return
    # Not run in this process: the worker's main process reports a task whose pool process died (WorkerLostError)
    # or that was rejected; no postrun will follow, so this is the task's final record.
    request = getattr(sender, "request", None)
    now = time.time()
    _sink.push([ledger.ATTEMPT, task_id, getattr(sender, "name", None), "FAILURE",
                _header(request, ledger.HEADER_SENT_AT), _header(request, ledger.HEADER_ATTEMPT_SENT_AT), None,
                None, now, now, getattr(request, "retries", 0) or 0, type(exception).__name__,
                _header(request, ledger.HEADER_INTENDED_AT), _hostname, *_lineage(request, task_id)])


def _lineage(request, task_id) -> tuple:
    """(parent_id, root_id) of the task a request runs, as the ledger records carry them (see ``ledger.SENT``)."""
    parent_id, root_id = getattr(request, "parent_id", None), getattr(request, "root_id", None)
    return parent_id, (root_id if root_id != task_id else None)


def _header(request, name):
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return value


def _postrun(arguments):
    task_id, task, state = arguments.get("task_id"), arguments.get("task"), arguments.get("state")
    finished_at = time.time()
    started_at, exc_type = _inflight.pop(task_id, (None, None))
    request = task_signals.request_of(arguments)
    body_done_at = getattr(_local, "body_done_at", None) or finished_at
    eta, root_id = request.eta, request.root_id
    if eta is not None and not isinstance(eta, (int, float)):
        try:
            from datetime import datetime

            eta = datetime.fromisoformat(str(eta)).timestamp()
        except ValueError:
            eta = None
    _sink.push([ledger.ATTEMPT, task_id, task.name, state, _header(request, ledger.HEADER_SENT_AT),
                _header(request, ledger.HEADER_ATTEMPT_SENT_AT), eta, started_at, body_done_at, finished_at,
                request.retries or 0, exc_type, _header(request, ledger.HEADER_INTENDED_AT),
                request.hostname or _hostname, request.parent_id, root_id if root_id != task_id else None])


def _revoked(arguments):
    request = arguments.get("request")
    if request is None:
        return
    now = time.time()
    _sink.push([ledger.ATTEMPT, request.id, getattr(request, "name", None),
                "REVOKED", None, None, None, None, now, now, 0, "Revoked", None, _hostname,
                *_lineage(request, request.id)])
