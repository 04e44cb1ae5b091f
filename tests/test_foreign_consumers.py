"""A queue of the run that something else already consumes is refused before the stack starts (its tasks would be
taken by that consumer and counted lost), on RabbitMQ and on Redis; and a run whose verdict is FAIL exits 1."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from kombu import Connection, Queue

from loadlab.config.settings import Settings
from loadlab.stack.preflight import PreflightError, foreign_consumers
from tests.conftest import (
    MACHINE_REDIS,
    RABBITMQ,
    TEST_QUEUE_PREFIX,
    need_service,
    processes_mentioning,
    run_cli,
    unique,
    wait_until,
)


def _assert_refused(result, queue: str, out) -> None:
    message = result.stderr.strip()
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in result.stdout + result.stderr
    assert f"queue {queue!r}" in message and "--allow-foreign-consumers" in message, message
    assert not out.exists()
    assert not processes_mentioning(str(out))


def test_a_rabbitmq_queue_with_a_consumer_is_refused(tmp_path):
    need_service("RabbitMQ", "127.0.0.1", 5672)
    queue = unique(TEST_QUEUE_PREFIX)
    with Connection(RABBITMQ) as connection:
        channel = connection.channel()
        consumer = connection.Consumer(Queue(queue, auto_delete=True), channel=channel, callbacks=[lambda *_: None])
        consumer.consume()  # a consumer that is not the run's: the queue's consumer count is 1
        try:
            out = tmp_path / "run"
            result = run_cli("run", "--broker", RABBITMQ, "--backend", f"{MACHINE_REDIS}/1", "--queue", queue,
                             "--duration", "2s", "--out", str(out), timeout=60)
            _assert_refused(result, queue, out)
            assert "1 consumer(s)" in result.stderr
        finally:
            consumer.cancel()
            channel.queue_delete(queue)


FOREIGN_APP = """
from celery import Celery

app = Celery("foreign", broker={broker!r})
app.conf.worker_hijack_root_logger = False


@app.task(name="foreign.job")
def job():
    return 1
"""


def test_a_redis_queue_a_foreign_worker_consumes_is_refused(tmp_path):
    need_service("Redis", "127.0.0.1", 6379)
    broker = f"{MACHINE_REDIS}/0"
    queue, other = unique(TEST_QUEUE_PREFIX), unique(TEST_QUEUE_PREFIX)
    (tmp_path / "foreign_app.py").write_text(textwrap.dedent(FOREIGN_APP.format(broker=broker)))
    name = f"{unique('foreign')}@127.0.0.1"
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "foreign_app:app", "worker", "--pool", "solo",
                               "--queues", queue, "--hostname", name, "--without-mingle", "--without-gossip",
                               "--loglevel", "WARNING"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        sys.path.insert(0, str(tmp_path))
        from foreign_app import app

        wait_until(lambda: worker.poll() is None and app.control.ping(destination=[name], timeout=0.5), 60,
                   what="the foreign worker to answer")
        out = tmp_path / "run"
        result = run_cli("run", "--broker", broker, "--backend", f"{MACHINE_REDIS}/1", "--queue", queue,
                         "--duration", "2s", "--out", str(out), timeout=60)
        _assert_refused(result, queue, out)
        assert name in result.stderr
        # the check itself: a queue the foreign worker does not consume passes, its own queue is named
        foreign_consumers(Settings(broker=broker, queue=other))
        with pytest.raises(PreflightError, match=name):
            foreign_consumers(Settings(broker=broker, queues=f"{other},{queue}"))
    finally:
        sys.path.remove(str(tmp_path))
        worker.terminate()
        worker.wait(timeout=30)


def test_a_run_whose_verdict_is_fail_exits_1_without_gates(tmp_path, run_dir):
    # tasks that outlast a zero drain: still running when the deadline passes, so lost, and the verdict FAIL
    mix = tmp_path / "slow.yml"
    mix.write_text("tasks:\n  - name: loadlab.io\n    kwargs: {ms: 2500}\n")
    result = run_cli("run", "--tasks", str(mix), "--duration", "2s", "--users", "2", "--drain-timeout-s", "0",
                     "--concurrency", "1", "--out", str(run_dir), timeout=180)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["verdict"]["status"] == "fail" and report["tasks"]["lost"] > 0, report["verdict"]
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    wait_until(lambda: not processes_mentioning(str(run_dir)), 30, what="every child to exit")
