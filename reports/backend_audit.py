"""The result backend audit: after the drain, each finished task's state as the result backend stores it, against the
ledger's. The ledger follows every attempt; the backend keeps one row per task id that any process may overwrite (a
zero-countdown retry can run and store SUCCESS before the process that retried it stores RETRY), and its rows
expire. A user reading results gets the backend's word: the report lists where it differs, by kind, with the ids."""
from __future__ import annotations

import time
from datetime import timedelta

from celery import states

KINDS = ("retry_after_success", "missing", "expired", "state_differs")
LISTED = 100  # mismatching tasks listed one by one (the counts cover them all)
BATCH = 1000  # keys per MGET


def _expires_s(app) -> float | None:
    expires = app.conf.result_expires
    if isinstance(expires, timedelta):
        return expires.total_seconds()
    return float(expires) if expires else None


def _ignores_result(app, name: str | None) -> bool:
    # the registry as it is: app.tasks would finalize an app that only sent tasks (and run its decorators again)
    task = app._tasks.get(name) if name else None
    if task is not None:
        return bool(task.ignore_result)
    return bool(app.conf.task_ignore_result)


def stored_states(backend, task_ids: list[str]) -> dict[str, str | None]:
    """Each task's stored state (None: the backend has no row for it). Key-value backends (Redis, …) in batches of
    MGET; others one task at a time through the backend's own lookup."""
    found: dict[str, str | None] = {}
    if hasattr(backend, "mget") and hasattr(backend, "get_key_for_task"):
        for start in range(0, len(task_ids), BATCH):
            batch = task_ids[start:start + BATCH]
            values = backend.mget([backend.get_key_for_task(task_id) for task_id in batch])
            for task_id, value in zip(batch, values):
                found[task_id] = backend.decode_result(value)["status"] if value else None
        return found
    for task_id in task_ids:
        meta = backend._get_task_meta_for(task_id)  # the backend's read, without the AsyncResult cache
        status = meta.get("status") if meta else None
        found[task_id] = None if status in (None, states.PENDING) else status
    return found


def classify(ledger_state: str, stored: str | None, finished_at: float, now: float,
             expires_s: float | None) -> str | None:
    """The kind of mismatch between the ledger's final state and the stored one, None when they agree."""
    if stored == ledger_state:
        return None
    if stored is None:
        return "expired" if expires_s is not None and finished_at + expires_s <= now else "missing"
    if stored == states.RETRY and ledger_state == states.SUCCESS:
        return "retry_after_success"
    return "state_differs"


def audit_backend(app, finished: list[tuple[str, str, str, float]], *, truncated: bool = False) -> dict | None:
    """``finished``: (task id, task name, ledger state, finished at) of each task the ledger saw finish. None when
    the app has no result backend."""
    from celery.backends.base import DisabledBackend

    backend = app.backend
    if isinstance(backend, DisabledBackend):
        return None
    expires_s = _expires_s(app)
    audited = [entry for entry in finished if not _ignores_result(app, entry[1])]
    try:
        stored = stored_states(backend, [entry[0] for entry in audited])
    except Exception as exc:  # noqa: BLE001 - the report says why there is no audit instead of failing the run
        return {"audited": 0, "skipped_ignore_result": len(finished) - len(audited), "matching": 0, "mismatches": 0,
                "by_kind": {kind: 0 for kind in KINDS}, "tasks": [], "truncated": truncated,
                "error": f"{type(exc).__name__}: {exc}"}
    now = time.time()
    by_kind = {kind: 0 for kind in KINDS}
    listed = []
    for task_id, name, ledger_state, finished_at in audited:
        kind = classify(ledger_state, stored.get(task_id), finished_at, now, expires_s)
        if kind is None:
            continue
        by_kind[kind] += 1
        if len(listed) < LISTED:
            listed.append({"id": task_id, "task": name, "ledger_state": ledger_state,
                           "stored_state": stored.get(task_id), "kind": kind})
    mismatches = sum(by_kind.values())
    return {"audited": len(audited), "skipped_ignore_result": len(finished) - len(audited),
            "matching": len(audited) - mismatches, "mismatches": mismatches, "by_kind": by_kind, "tasks": listed,
            "truncated": truncated, "error": None}


def problem(audit: dict | None) -> tuple[str | None, str | None]:
    """The verdict's sentences for an audit: (a problem: tasks stored missing, expired or in another state; a note:
    RETRY stored over a SUCCESS, Celery's own race on a zero-countdown retry, which a healthy stack has too)."""
    if not audit or not audit["mismatches"]:
        return None, None
    kinds = audit["by_kind"]
    race = kinds.get("retry_after_success", 0)
    others = audit["mismatches"] - race
    note = (f"{race} of {audit['audited']} task(s) stored as RETRY in the result backend although they succeeded "
            f"(Celery's race: a zero-countdown retry runs and stores SUCCESS before the retrying attempt stores "
            f"RETRY); the ledger has them right, a client reading the backend does not") if race else None
    if not others:
        return None, note
    listed = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in kinds.items() if n and kind != "retry_after_success")
    return (f"{others} of {audit['audited']} task(s) stored in the result backend in another state than the "
            f"ledger's ({listed}): what a client reads from the backend is wrong for them"), note
