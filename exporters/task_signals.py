"""One Celery receiver per task signal for all of loadlab's own per-task hooks: the ledger's, the metrics' and the
tracing's.

Celery calls every receiver of a signal with the signal's arguments as keywords, unpacked into a fresh dict for each
receiver, on signals that fire several times for every task (the cost: docs/performance.md).
Hooks connected here share one receiver, so a signal costs that once however many of loadlab's hooks listen: each hook
is called with that one dict, the keywords Celery passed (``sender`` and ``signal`` among them). Signals that fire once
per process (``worker_init``…) are connected directly.

A hook that raises is logged and the others still run, as Celery does for its receivers.

``request_of``: the running task's request, looked up once per signal for all hooks. ``task.request`` reads Celery's
thread-local stack, whose lookup raises and catches an ``AttributeError`` every time.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from celery.utils.dispatch import Signal

log = logging.getLogger("loadlab.signals")

Hook = Callable[[dict], None]

_hooks: dict[str, list[Hook]] = {}


def connect(signal: Signal, hook: Hook) -> None:
    """Call ``hook(arguments)`` on every ``signal`` (once per hook, in the order connected)."""
    hooks = _hooks.get(signal.name)
    if hooks is None:
        hooks = _hooks[signal.name] = []

        def receive(**arguments):
            for each in hooks:
                try:
                    each(arguments)
                except Exception:  # noqa: BLE001 - one hook's bug must not cost the others their record
                    log.exception("loadlab's %s hook %s raised", signal.name, getattr(each, "__qualname__", each))

        signal.connect(receive, weak=False, dispatch_uid=f"loadlab-{signal.name}")
    if hook not in hooks:
        hooks.append(hook)


def connect_each(hooks: dict[Signal, Hook]) -> None:
    """``connect`` for every signal -> hook of ``hooks``."""
    for signal, hook in hooks.items():
        connect(signal, hook)


def request_of(arguments: dict):
    """The request of ``arguments["task"]`` (``task_prerun``, ``task_postrun``), kept in ``arguments`` for the next
    hook of the same signal."""
    request = arguments.get("request")
    if request is None:
        request = arguments["request"] = arguments["task"].request
    return request


def disconnect(signal: Signal, hook: Hook) -> None:
    hooks = _hooks.get(signal.name)
    if hooks is not None and hook in hooks:
        hooks.remove(hook)


def hooks_of(signal: Signal) -> list[Hook]:
    """The hooks connected to ``signal``."""
    return list(_hooks.get(signal.name, ()))
