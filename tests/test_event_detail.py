"""The exporter's detailed event mode exports what celery-exporter would for the same events, and the exporter bench
compares it with Flower on equal work."""
from __future__ import annotations

import json
import time
from bisect import bisect_left
from collections import defaultdict

from loadlab.bench.events import generate_stream
from loadlab.exporters.event_detail import DetailedEventState
from loadlab.exporters.event_state import TASK_COUNTERS
from tests.conftest import RABBITMQ, need_service, run_cli


def _fleet_stream(n: int = 6000) -> list[dict]:
    """The bench's fleet-shaped stream, moved to now (so heartbeats are fresh), with a second queue for some names."""
    events = generate_stream(n, seed=3)
    shift = time.time() - events[-1]["timestamp"]
    for event in events:
        event["timestamp"] += shift
        event["local_received"] += shift
        if event["type"] == "task-sent" and event["name"].endswith(("1", "2")):
            event["queue"] = "priority"
    return events


def celery_exporter_series(events: list[dict]) -> dict:
    """What danihodovic/celery-exporter's ``Exporter`` exports for these events (its rules, on the Celery ``State`` it
    builds on; the package itself is not installable here): per event type a counter by (name, hostname after '@',
    queue), task-failed also by exception class; a label set seen in a worker's event has every counter (0 if none);
    runtime per label set from task-succeeded; worker up (alive by its heartbeats) and active by hostname."""
    import re

    from celery.events.state import State

    state = State()
    counters: dict = defaultdict(int)
    runtime: dict = defaultdict(list)
    up, active = {}, {}
    for event in events:
        kind = event["type"]
        if kind.startswith("task-"):
            state.event(dict(event))
            task = state.tasks.get(event["uuid"])
            labels = (task.name, task.hostname.rpartition("@")[2], getattr(task, "queue", "celery"))
            for counter in TASK_COUNTERS:
                key = (counter, *labels)
                if counter == "task-failed":
                    match = re.match(r"^(\w+)\(", task.exception or "") if counter == kind else None
                    key = (*key, (match.group(1) if match else "UnknownException") if counter == kind else "")
                if counter == kind:
                    counters[key] += 1
                elif kind != "task-sent":
                    counters[key] += 0
            if kind == "task-succeeded":
                runtime[labels].append(task.runtime)
        elif kind == "worker-heartbeat":
            worker = state.event(dict(event))[0][0]
            host = event["hostname"].rpartition("@")[2]
            up[host], active[host] = (1 if worker.alive else 0), worker.active or 0
    return {"counters": dict(counters), "runtime": dict(runtime), "up": up, "active": active}


def test_the_detailed_mode_exports_celery_exporters_series_for_the_same_events():
    events = _fleet_stream()
    expected = celery_exporter_series(events)
    state = DetailedEventState()
    for event in events:
        state.handle(dict(event))

    counters = {(etype, *key): n for etype, table in state.detail_counts.items() for key, n in table.items()}
    assert counters == expected["counters"]
    assert any(key[3] == "priority" for key in counters) and any(key[0] == "task-failed" and key[4] == "ValueError"
                                                                  for key in counters)
    bounds = state.buckets
    assert set(state.runtime_detail) == set(expected["runtime"])
    for labels, values in expected["runtime"].items():
        buckets = [0] * (len(bounds) + 1)
        for value in values:
            buckets[bisect_left(bounds, value)] += 1
        row = state.runtime_detail[labels]
        assert row[:-1] == buckets and abs(row[-1] - sum(values)) < 1e-9, labels
    # the queue wait (received -> started) is kept for the same label sets as the runtime
    assert state.queue_wait_detail and set(state.queue_wait_detail) <= set(counters_of(counters, "task-started"))
    status = state.worker_status(time.monotonic())
    assert {host: up for host, (up, _active) in status.items()} == expected["up"]
    assert {host: active for host, (_up, active) in status.items()} == expected["active"]

    # and the /metrics families carry them with loadlab's metric names, labels task, hostname, queue (+ exception)
    families = {family.name: family for family in state.families()}
    failed = families["celery_task_failed"].samples
    assert failed and set(failed[0].labels) == {"task", "hostname", "queue", "exception"}
    runtime = [s for s in families["celery_task_runtime_seconds"].samples if s.name.endswith("_count")]
    assert sum(s.value for s in runtime) == sum(len(v) for v in expected["runtime"].values())


def counters_of(counters: dict, etype: str) -> set:
    return {key[1:4] for key in counters if key[0] == etype}


def test_bench_exporter_compares_equal_work_with_flower_and_drains_a_real_broker(tmp_path):
    need_service("rabbitmq", "127.0.0.1", 5672)
    result = run_cli("bench", "exporter", "--events", "3000", "--rounds", "2", "--e2e-events", "1500",
                     "--e2e-broker", RABBITMQ, "--out", str(tmp_path), timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "loadlab detailed" in out and "flower" in out and "celery-exporter" in out
    assert "equal work (loadlab detailed / flower) target >= 5.00x: " in out
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["verdict"] in ("met", "missed", "not resolved")
    assert all(data["checks"].values()) and data["checks"]["loadlab_detailed_counts_match_stream"]
    ratio = data["ratio_to_flower"]["loadlab detailed"]
    assert ratio["ci_low"] <= ratio["ratio"] <= ratio["ci_high"]
    e2e = data["end_to_end"]
    assert set(e2e["events_per_s"]) == {"loadlab detailed", "loadlab counting", "flower"}
    assert all(row["min"] > 0 for row in e2e["events_per_s"].values())


def test_bench_exporter_refuses_an_end_to_end_broker_it_cannot_use(tmp_path):
    result = run_cli("bench", "exporter", "--events", "1000", "--rounds", "1", "--e2e-broker", "redis://127.0.0.1:6379/0",
                     "--out", str(tmp_path), timeout=60)
    assert result.returncode == 2 and "--e2e-broker" in result.stderr and "not an AMQP URL" in result.stderr
    assert "Traceback" not in result.stderr
