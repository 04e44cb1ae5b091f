"""The result backend audit on the machine's Redis: results stored the way a race or an expiry leaves them, the
audit's count against a direct scan of the ``celery-task-meta-*`` keys (own key prefix, removed afterwards)."""
import json
import time

import pytest
import redis
from celery import Celery

from loadlab.reports.backend_audit import audit_backend
from tests.conftest import MACHINE_REDIS, need_service, unique


@pytest.fixture
def backend_app():
    need_service("Redis", "127.0.0.1", 6379)
    prefix = unique("loadlab-test-audit-") + ":"
    app = Celery("audit", broker=f"{MACHINE_REDIS}/1", backend=f"{MACHINE_REDIS}/1", set_as_current=False)
    app.conf.result_backend_transport_options = {"global_keyprefix": prefix}
    app.conf.result_expires = 3600
    client = redis.Redis.from_url(f"{MACHINE_REDIS}/1")
    yield app, client, prefix
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def direct_scan(client, prefix: str, ledger: dict[str, str]) -> dict[str, str | None]:
    """Tasks whose stored state differs from the ledger's, read straight from Redis: id -> stored state."""
    stored = {}
    for key in client.scan_iter(match=f"{prefix}celery-task-meta-*", count=1000):
        meta = json.loads(client.get(key))
        stored[meta["task_id"]] = meta["status"]
    return {task_id: stored.get(task_id) for task_id, state in ledger.items() if stored.get(task_id) != state}


def test_audit_counts_what_a_direct_scan_of_the_backend_finds(backend_app):
    app, client, prefix = backend_app
    backend = app.backend
    now = time.time()
    finished = []  # (id, task, ledger state, finished at)
    for i in range(50):  # stored as the ledger has them
        task_id = f"ok-{i}"
        backend.store_result(task_id, i, "SUCCESS")
        finished.append((task_id, "loadlab.noop", "SUCCESS", now))
    backend.store_result("raced", None, "SUCCESS")
    # the retrying process read the task's state before the retry stored SUCCESS and writes RETRY after it (Celery's
    # guard against overwriting a SUCCESS reads then writes): its write, as it lands
    meta = backend._get_result_meta(None, "RETRY", None, None)
    meta["task_id"] = "raced"
    backend.set(backend.get_key_for_task("raced"), backend.encode(meta))
    finished.append(("raced", "loadlab.flaky", "SUCCESS", now))
    finished.append(("never-stored", "loadlab.noop", "SUCCESS", now))
    finished.append(("long-ago", "loadlab.noop", "SUCCESS", now - 7200))  # older than result_expires
    backend.store_result("other", None, "FAILURE")
    finished.append(("other", "loadlab.noop", "SUCCESS", now))

    audit = audit_backend(app, finished)
    expected = direct_scan(client, prefix, {task_id: state for task_id, _, state, _ in finished})
    assert audit["mismatches"] == len(expected) == 4
    assert {t["id"]: t["stored_state"] for t in audit["tasks"]} == expected
    assert audit["by_kind"] == {"retry_after_success": 1, "missing": 1, "expired": 1, "state_differs": 1}
    assert audit["audited"] == len(finished) and audit["matching"] == 50 and audit["error"] is None
