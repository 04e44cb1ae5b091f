"""Each reference task through real worker processes on every supported broker/backend pair."""
import pytest

from loadlab.config.settings import Settings
from loadlab.stack.payloads import make_body
from loadlab.stack.supervisor import Stack
from tests.conftest import MACHINE_REDIS, RABBITMQ, TEST_QUEUE_PREFIX, delete_queue, need_service, unique


def _combos():
    return [
        pytest.param(None, None, id="embedded-redis"),
        pytest.param(f"{MACHINE_REDIS}/0", f"{MACHINE_REDIS}/1", id="machine-redis"),
        pytest.param(RABBITMQ, f"{MACHINE_REDIS}/1", id="rabbitmq+redis"),
        pytest.param(RABBITMQ, "sqlite", id="rabbitmq+sqlite"),
        pytest.param(RABBITMQ, "postgres", id="rabbitmq+postgresql"),
    ]


@pytest.mark.parametrize("broker, backend", _combos())
def test_reference_tasks_run_on_real_workers(broker, backend, run_dir, request):
    if broker and broker.startswith("amqp"):
        need_service("RabbitMQ", "127.0.0.1", 5672)
    if (broker or "").startswith("redis") or (backend or "").startswith("redis"):
        need_service("Redis", "127.0.0.1", 6379)
    if backend == "sqlite":
        backend = f"db+sqlite:///{run_dir / 'results.sqlite'}"
    elif backend == "postgres":
        backend = request.getfixturevalue("postgres_db")
    queue = unique(TEST_QUEUE_PREFIX)
    # Retries 1 s then 2 s apart, not at once: Celery publishes a retry before it stores RETRY, so with a zero
    # delay the last attempt's FAILURE can land first and the earlier attempt's RETRY overwrite it.
    settings = Settings.build(broker=broker, backend=backend, queue=queue, run_id=unique(), concurrency="2",
                              retry_backoff_s="1", retry_jitter="false", retry_max_retries="2")
    with Stack(settings, run_dir, api=False) as stack:
        app = stack.app
        try:
            body = make_body("nested_dicts", 2000)
            results = {
                "noop": app.send_task("loadlab.noop"),
                "cpu": app.send_task("loadlab.cpu", kwargs={"ms": 3}),
                "io": app.send_task("loadlab.io", kwargs={"ms": 5}),
                "flaky-ok": app.send_task("loadlab.flaky", kwargs={"p": 0.0}),
                "flaky-fail": app.send_task("loadlab.flaky", kwargs={"p": 1.0}),
                "payload": app.send_task("loadlab.payload", kwargs={"body": body}),
            }
            assert results["noop"].get(timeout=30) is None
            assert results["cpu"].get(timeout=30) > 0
            assert results["io"].get(timeout=30) == 5
            assert results["flaky-ok"].get(timeout=30) == 0
            assert results["payload"].get(timeout=30) == body
            with pytest.raises(Exception) as info:
                results["flaky-fail"].get(timeout=30)
            assert type(info.value).__name__ == "FlakyError"
            # exhausted after max_retries=2: three attempts in all
            assert results["flaky-fail"].retries == 2
        finally:
            delete_queue(app, queue)
