"""The exporter service against real brokers and workers, Flower with the stack, and the event bench."""
from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadlab.config.settings import Settings
from loadlab.exporters.exporter_service import EventState
from loadlab.exporters.scrape import scrape_all
from loadlab.reports.recorder import Recorder
from loadlab.stack import embedded
from loadlab.stack.processes import Child
from loadlab.stack.supervisor import Stack
from tests.conftest import LOADLAB, RABBITMQ, need_service, run_cli, unique, wait_until


def scrape(url: str, timeout: float = 5.0) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def total(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, lbls), v in samples.items()
               if n == name and all(dict(lbls).get(k) == want for k, want in labels.items()))


def exporter_child(run_dir: Path, broker: str, port: int, *extra: str) -> Child:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOADLAB_")}
    return Child("exporter", [LOADLAB, "exporter", "--broker", broker, "--metrics-port", str(port), *extra],
                 run_dir / "logs" / "exporter.log", env=env).start()


def _settings(**overrides) -> Settings:
    return Settings.build(run_id=unique(), queue=unique("loadlab-exp-"), **overrides)


# --- queue depth ------------------------------------------------------------------------------------------------------
def test_queue_length_rises_while_workers_are_paused_and_falls_after(run_dir):
    with Stack(_settings(workers="1", concurrency="2"), run_dir, api=False) as stack:
        url, app, queue = stack.endpoints["exporter"], stack.app, stack.settings.queue
        worker = stack.worker_name(1)
        replies = app.control.cancel_consumer(queue, destination=[worker], reply=True, timeout=5)
        assert replies, "the worker did not confirm it stopped consuming"
        results = [app.send_task("loadlab.noop", queue=queue) for _ in range(12)]
        # priority messages go to kombu's sub-lists (queue\x06\x16<step>): the exporter must sum them
        results += [app.send_task("loadlab.noop", queue=queue, priority=9) for _ in range(8)]
        import redis

        client = redis.Redis.from_url(stack.settings.broker)
        assert len([k for k in client.keys(f"{queue}*") if client.type(k) == b"list"]) >= 2
        wait_until(lambda: value(scrape(url), "celery_queue_length", queue=queue) == 20, 20,
                   what="celery_queue_length to read 20 while the worker is paused")
        app.control.add_consumer(queue, destination=[worker], reply=True, timeout=5)
        for result in results:
            result.get(timeout=30)
        wait_until(lambda: value(scrape(url), "celery_queue_length", queue=queue) == 0, 20,
                   what="celery_queue_length to fall to 0 after the worker resumed")
        samples = scrape(url)
        assert value(samples, "celery_queue_unacked", queue="*") is not None
        assert value(samples, "loadlab_exporter_last_collection_age_seconds", source="broker") < 3


# --- worker liveness ------------------------------------------------------------------------------------------------
def test_worker_up_drops_to_zero_after_sigkill(run_dir):
    with Stack(_settings(workers="2", concurrency="1"), run_dir, api=False) as stack:
        url = stack.endpoints["exporter"]
        w1, w2 = stack.worker_name(1), stack.worker_name(2)
        samples = scrape(url)
        assert value(samples, "celery_worker_up", hostname=w1) == 1
        assert value(samples, "celery_worker_up", hostname=w2) == 1
        stack.workers[1].kill()  # SIGKILL to the worker's whole process group: no worker-offline event
        killed_at = time.monotonic()
        wait_until(lambda: value(scrape(url), "celery_worker_up", hostname=w2) == 0, 20,
                   what="celery_worker_up of the killed worker to read 0")
        elapsed = time.monotonic() - killed_at
        # timeout = 2.5 x the 2 s heartbeat interval, after the last heartbeat (up to 2 s before the kill), plus slack
        # for a loaded machine: with two test files running at a time on 2 cores it once took 12.1 s (the exporter
        # reads a heartbeat late, and counts the timeout from when it read it, as Celery's State does)
        assert elapsed < 5.0 + 2.0 + 6.0, f"took {elapsed:.1f}s"
        samples = scrape(url)
        assert value(samples, "celery_worker_up", hostname=w1) == 1
        assert value(samples, "celery_worker_tasks_active", hostname=w2) == 0


# --- a hung, then dead broker ------------------------------------------------------------------------------------------
def test_exporter_keeps_serving_while_the_broker_is_down(run_dir):
    redis_port, metrics_port = embedded.free_port(), embedded.free_port()
    data = run_dir / "redis"
    data.mkdir()
    redis_child = Child("redis", embedded.redis_command(redis_port, data), run_dir / "logs" / "redis.log").start()
    broker = embedded.redis_url(redis_port, 0)
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    exporter = None
    try:
        import redis

        client = redis.Redis.from_url(broker, socket_connect_timeout=1)
        wait_until(lambda: _pings(client), 10, what="redis")
        client.lpush("celery", b"{}", b"{}", b"{}")
        exporter = exporter_child(run_dir, broker, metrics_port)
        wait_until(lambda: (s := _try_scrape(url)) and value(s, "celery_queue_length", queue="celery") == 3,
                   30, what="the exporter to report the queue")
        # hung: the broker accepts nothing and answers nothing, so a poll blocks until its socket timeout (10 s);
        # every scrape still answers at once with the last values, and the age of the last collection grows
        os.kill(redis_child.pid, signal.SIGSTOP)
        try:
            ages = []
            deadline = time.monotonic() + 20
            while not ages or ages[-1] < 3.5:
                assert time.monotonic() < deadline, f"broker age did not grow past 3.5s: {ages}"
                started = time.monotonic()
                samples = scrape(url, timeout=5)
                assert time.monotonic() - started < 1.5, "a scrape waited on the hung broker"
                assert value(samples, "celery_queue_length", queue="celery") == 3
                ages.append(value(samples, "loadlab_exporter_last_collection_age_seconds", source="broker"))
                time.sleep(0.25)
            assert ages == sorted(ages)
        finally:
            os.kill(redis_child.pid, signal.SIGCONT)
        wait_until(lambda: value(scrape(url), "loadlab_exporter_last_collection_age_seconds", source="broker") < 2,
                   20, what="collection to resume after the broker answered again")
        # dead: polls fail (and are counted), the exporter serves the last values
        redis_child.kill()
        wait_until(lambda: value(scrape(url), "loadlab_exporter_collection_errors_total", source="broker") > 0, 10,
                   what="the failed polls to be counted")
        samples = scrape(url)
        assert value(samples, "celery_queue_length", queue="celery") == 3
        assert exporter.running()
    finally:
        if exporter is not None:
            exporter.stop(timeout=5)
        redis_child.stop(timeout=5)


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001
        return False


def _try_scrape(url: str):
    try:
        return scrape(url, timeout=1)
    except OSError:
        return None


# --- task events, for apps not instrumented in-process ------------------------------------------------------------------
def test_task_events_are_counted_for_an_uninstrumented_app(run_dir):
    # metrics off: the workers count nothing themselves and were started without -E
    with Stack(_settings(workers="1", metrics="off", retry_max_retries="0"), run_dir, api=False) as stack:
        app, queue = stack.app, stack.settings.queue
        port = embedded.free_port()
        url = f"http://127.0.0.1:{port}/metrics"
        exporter = exporter_child(run_dir, stack.settings.broker, port, "--queue", queue, "--task-events")
        try:
            def settled():
                samples = _try_scrape(url)
                if not samples:
                    return None
                received = total(samples, "celery_task_received_total")
                succeeded = total(samples, "celery_task_succeeded_total", task="loadlab.noop")
                return (received, succeeded) if received and received == succeeded else None

            def warm():  # the exporter asks the workers to send task events; until then there are none
                app.send_task("loadlab.noop", queue=queue).get(timeout=10)
                return settled()

            _received, before = wait_until(warm, 30, interval=0.2, what="task events to reach the exporter")
            for result in [app.send_task("loadlab.noop", queue=queue) for _ in range(10)]:
                result.get(timeout=20)
            with pytest.raises(Exception):
                app.send_task("loadlab.flaky", kwargs={"p": 1.0}, queue=queue).get(timeout=20)
            wait_until(lambda: (s := _try_scrape(url)) and total(s, "celery_task_succeeded_total",
                                                                 task="loadlab.noop") == before + 10
                       and total(s, "celery_task_failed_total", task="loadlab.flaky") == 1, 20,
                       what="the exporter's task counters to match what ran")
            samples = scrape(url)
            assert total(samples, "celery_task_runtime_seconds_count", task="loadlab.noop") == before + 10
        finally:
            exporter.stop(timeout=5)


# --- RabbitMQ ---------------------------------------------------------------------------------------------------------
def test_exporter_reports_rabbitmq_queue_length(run_dir):
    need_service("RabbitMQ", "127.0.0.1", 5672)
    from kombu import Connection, Exchange, Producer, Queue

    queue, missing = unique("loadlab-exp-"), unique("loadlab-missing-")
    port = embedded.free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    exporter = None
    with Connection(RABBITMQ, connect_timeout=5) as conn:
        try:
            declared = Queue(queue, Exchange("", type="direct"), routing_key=queue, durable=False)
            producer = Producer(conn.default_channel)
            for i in range(5):
                producer.publish({"n": i}, routing_key=queue, declare=[declared], serializer="json")
            exporter = exporter_child(run_dir, RABBITMQ, port, "--queue", queue, "--queues", missing)
            wait_until(lambda: (s := _try_scrape(url)) and value(s, "celery_queue_length", queue=queue) == 5, 30,
                       what="celery_queue_length of the RabbitMQ queue to read 5")
            samples = scrape(url)
            assert value(samples, "celery_queue_length", queue=missing) == 0
            assert value(samples, "celery_queue_consumers", queue=queue) == 0
            # AMQP does not tell unacked counts: absent rather than a made-up 0
            assert not [k for k in samples if k[0] == "celery_queue_unacked"]
        finally:
            if exporter is not None:
                exporter.stop(timeout=5)
            conn.default_channel.queue_delete(queue)


# --- Flower -----------------------------------------------------------------------------------------------------------
def test_flower_answers_and_its_counts_agree_with_the_ledger(run_dir):
    settings = _settings(workers="1", concurrency="2", flower=True, retry_backoff_s="0", retry_max_retries="1")
    with Stack(settings, run_dir) as stack:
        flower = stack.flower_url
        assert flower and flower.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{flower}/healthcheck", timeout=5) as response:
            assert response.read().decode().strip() == "OK"
        recorder = Recorder(stack.settings.ledger_url, stack.settings.run_id).start()
        try:
            with httpx.Client(base_url=stack.settings.api_url, timeout=10) as api:
                for body, n in (({"name": "noop"}, 6), ({"name": "flaky", "p": 1.0}, 2), ({"name": "flaky", "p": 0.0}, 2)):
                    for _ in range(n):
                        name = body["name"]
                        args = {k: v for k, v in body.items() if k != "name"}
                        assert api.post(f"/tasks/{name}", json=args).status_code == 202
            assert recorder.drain(30), "tasks did not finish"
            tasks = recorder.summary()["tasks"]
        finally:
            recorder.close()
        assert (tasks["submitted"], tasks["succeeded"], tasks["failed"], tasks["retried"]) == (10, 8, 2, 2)

        def flower_counts():
            samples = scrape(stack.endpoints["flower"])
            counts = {t: total(samples, "flower_events_total", type=f"task-{t}") for t in ("succeeded", "failed",
                                                                                            "retried")}
            return counts if counts == {"succeeded": 8, "failed": 2, "retried": 2} else None

        wait_until(flower_counts, 20, what="Flower's task counts to equal the ledger's")
        saved = scrape_all(stack, run_dir / "metrics")  # the run's final scrape finds Flower and the exporter
        assert set(saved) >= {"exporter", "flower"}
        assert "flower_events_total" in (run_dir / saved["flower"]).read_text()


# --- the lean event handling ----------------------------------------------------------------------------------------
def test_event_state_tracks_heartbeats_and_task_counts():
    now = [100.0]
    state = EventState(task_events=True, max_tasks=4, clock=lambda: now[0])
    state.handle({"type": "worker-online", "hostname": "a", "freq": 2.0})
    state.handle({"type": "worker-heartbeat", "hostname": "b", "freq": 2.0, "active": 3, "processed": 10})
    state.handle({"type": "worker-heartbeat", "hostname": "b", "freq": 5.0})  # a wake-up heartbeat: no counts
    for i in range(6):
        state.handle({"type": "task-received", "uuid": f"u{i}", "name": "t.add", "hostname": "a"})
    assert len(state.names) <= 4  # bounded: halved, oldest first
    state.handle({"type": "task-started", "uuid": "u5", "hostname": "a"})
    state.handle({"type": "task-succeeded", "uuid": "u5", "hostname": "a", "runtime": 0.02})
    state.handle({"type": "task-failed", "uuid": "u0", "hostname": "a"})  # forgotten by the trim: counted as unknown
    assert state.counts["task-received"] == {"t.add": 6}
    assert state.counts["task-succeeded"] == {"t.add": 1}
    assert state.counts["task-failed"] == {"unknown": 1}
    assert sum(state.runtime["t.add"][:-1]) == 1 and state.runtime["t.add"][-1] == pytest.approx(0.02)
    assert state.worker_status(now[0]) == {"a": (1, 0), "b": (1, 3)}
    now[0] += 6.0  # past 2.5 x 2 s for a; b announced 5 s last, so it is still within 12.5 s
    assert state.worker_status(now[0]) == {"a": (0, 0), "b": (1, 3)}
    state.handle({"type": "worker-offline", "hostname": "b"})
    assert state.worker_status(now[0])["b"] == (0, 0)
    assert state.worker_status(now[0] + 3600) == {}  # silent workers are forgotten


# --- CLI --------------------------------------------------------------------------------------------------------------
def test_exporter_cli_needs_a_broker():
    result = run_cli("exporter", timeout=60, env={"LOADLAB_BROKER": ""})
    assert result.returncode == 2 and "--broker" in result.stderr


def test_bench_exporter_prints_rates_and_ratio(tmp_path):
    result = run_cli("bench", "exporter", "--events", "3000", "--rounds", "1", "--out", str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "flower" in result.stdout and "equal work (loadlab detailed / flower)" in result.stdout
    assert "not resolved" in result.stdout  # one round shows no noise
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["checks"]["loadlab_counts_match_stream"] and data["checks"]["flower_events_counted"]
    assert data["events_per_s"]["loadlab counting"]["median"] > 0 and data["events_per_s"]["flower"]["median"] > 0
    assert data["end_to_end_skipped"]