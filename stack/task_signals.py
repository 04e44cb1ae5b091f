"""One Celery receiver per task signal for all of loadlab's own per-task hooks (the ledger's and the metrics').

Celery calls every receiver of a signal with the signal's arguments as keywords, unpacked into a fresh dict for each
receiver: ~10 k instructions per receiver per call (callgrind), on signals that fire several times for every task.
Hooks connected here share one receiver, so a signal costs that once however many of loadlab's hooks listen, and
each hook is called with the sender and that one dict of arguments. The tracing's receivers are the OpenTelemetry
instrumentation's own and stay as they are; signals that fire once per process (``worker_init``…) are connected
directly.

A hook that raises is logged and the others still run, as Celery does for its receivers.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from celery.utils.dispatch import Signal

log = logging.getLogger("loadlab.signals")

Hook = Callable[[object, dict], None]

_hooks: dict[str, list[Hook]] = {}


def connect(signal: Signal, hook: Hook) -> None:
    """Call ``hook(sender, arguments)`` on every ``signal`` (once per hook, in the order connected)."""
    hooks = _hooks.get(signal.name)
    if hooks is None:
        hooks = _hooks[signal.name] = []

        def receive(sender=None, **arguments):
            for each in hooks:
                try:
                    each(sender, arguments)
                except Exception:  # noqa: BLE001 - one hook's bug must not cost the others their record
                    log.exception("loadlab's %s hook %s raised", signal.name, getattr(each, "__qualname__", each))

        signal.connect(receive, weak=False, dispatch_uid=f"loadlab-{signal.name}")
    if hook not in hooks:
        hooks.append(hook)
