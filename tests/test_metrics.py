"""Prometheus metrics: the slot-file store, timed serializers, and a short real run whose scrapes must agree with the
report's task ledger."""
from __future__ import annotations

import json
import re
from collections import defaultdict

import pytest
from celery.utils.dispatch import Signal
from kombu.serialization import dumps, loads, registry
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector

from loadlab.exporters import metric_store, metrics, serializers, task_signals
from loadlab.exporters.metric_store import MetricStore
from tests.conftest import run_cli

# DESIGN.md's task metrics plus the load generator's two: every one must be in a run's scrapes
OUR_METRICS = [spec.name for spec in (*metrics.IN_PROCESS_SPECS, *metrics.LOADGEN_SPECS)]

ACCEPT = {"application/json", "application/x-msgpack"}
_SAMPLE = re.compile(r'^([a-zA-Z_:][\w:]*)(\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prom(text: str) -> list[tuple[str, dict, float]]:
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            samples.append((match.group(1), dict(_LABEL.findall(match.group(3) or "")), float(match.group(4))))
    return samples


def total(samples, name: str, **labels) -> float:
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


# --- the store ---------------------------------------------------------------------------------------------------------
def test_a_recycled_slot_continues_its_predecessors_totals_in_the_same_files(tmp_path):
    store = MetricStore()
    inst = metrics.Instruments(store)
    for generation in range(50):  # 50 children recycled through the same two pool slots
        store._after_fork()
        store.attach(str(tmp_path), f"slot{generation % 2}")
        inst.succeeded.labels("loadlab.noop", "celery").inc()
        inst.runtime.labels("loadlab.noop", "celery").observe(0.003)
        store.detach()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["counter_slot0.db", "counter_slot1.db", "histogram_slot0.db", "histogram_slot1.db"]
    registry_ = CollectorRegistry()
    MultiProcessCollector(registry_, path=str(tmp_path))
    samples = parse_prom(generate_latest(registry_).decode())
    assert total(samples, "celery_task_succeeded_total") == 50
    assert total(samples, "celery_task_runtime_seconds_count") == 50
    assert total(samples, "celery_task_runtime_seconds_bucket", le="0.005") == 50
    assert total(samples, "celery_task_runtime_seconds_bucket", le="0.0025") == 0  # every bucket is there


def test_a_slot_file_that_outgrows_its_first_mapping_keeps_every_value_where_prometheus_client_reads_it(tmp_path):
    store = MetricStore()
    store.attach(str(tmp_path), "slot0")
    early = metric_store.sample_key("loadlab_test", "loadlab_test_total", ("n",), ("early",), "h")
    store.add(metric_store.COUNTER, early, 1.0)
    # ~180 bytes per entry: 2000 of them grow the file from 64 KiB through two remappings
    keys = [metric_store.sample_key("loadlab_test", "loadlab_test_total", ("n",), (str(i),), "h") for i in range(2000)]
    for i, key in enumerate(keys):
        store.add(metric_store.COUNTER, key, float(i))
    store.add(metric_store.COUNTER, early, 1.0)  # a cell from the first mapping, written after the file grew
    path = tmp_path / "counter_slot0.db"
    assert path.stat().st_size >= 4 * 65536
    on_disk = {key: value for key, value, *_ in MmapedDict.read_all_values_from_file(str(path))}
    assert on_disk[early] == 2.0
    assert [on_disk[key] for key in keys] == [float(i) for i in range(2000)]
    store.detach()
    store.add(metric_store.COUNTER, early, 1.0)  # after detach: counted in memory, the file left as it was
    assert store.snapshot()[early] == 3.0
    reopened = MetricStore()
    reopened.attach(str(tmp_path), "slot0")  # a recycled child's successor continues from the file
    reopened.add(metric_store.COUNTER, keys[-1], 1.0)
    assert reopened.snapshot()[keys[-1]] == 2000.0 and reopened.snapshot()[early] == 2.0
    reopened.detach()


def test_a_recorder_writes_where_the_stores_values_are_now_and_a_bad_value_leaves_the_store_usable(tmp_path):
    store = MetricStore()
    inst = metrics.Instruments(store)
    started = inst.started.labels("loadlab.noop", "celery")
    wait = inst.queue_wait.labels("loadlab.noop", "celery")
    record = store.counter_and_histogram_recorder(started.key, wait.keys)  # made while the store is in memory
    record(0.003)
    store.attach(str(tmp_path), "slot0")  # the cells move into the slot file: the recorder follows them
    record(0.2)
    with pytest.raises(TypeError):
        record(None)  # a value that cannot be observed: refused before anything is written, the lock not left held
    record(0.003)
    counters = MmapedDict.read_all_values_from_file(str(tmp_path / "counter_slot0.db"))
    assert {key: value for key, value, *_ in counters}[started.key] == 3.0
    store.detach()
    record(30.0)
    values = store.snapshot()
    assert values[started.key] == 4.0
    assert values[wait.bucket_key(0.003)] == 2.0 and values[wait.bucket_key(0.2)] == 1.0
    assert values[wait.bucket_key(30.0)] == 1.0 and values[wait.sum_key] == pytest.approx(30.206)
    undeclared = metric_store.sample_key("loadlab_test", "loadlab_test_total", (), (), "h")
    with pytest.raises(KeyError, match="not declared"):
        store.counter_recorder(undeclared)


def test_loadlabs_task_hooks_share_one_celery_receiver_and_a_hook_that_raises_does_not_stop_the_others(caplog):
    signal = Signal(name="loadlab_test_signal")
    seen = []

    def broken(arguments):
        raise RuntimeError("a bug in one hook")

    task_signals.connect(signal, broken)
    task_signals.connect(signal, seen.append)
    task_signals.connect(signal, broken)  # connecting twice is one hook
    assert len(signal.receivers) == 1 and task_signals.hooks_of(signal) == [broken, seen.append]
    signal.send(sender="loadlab.noop", task_id="t1", state="SUCCESS")
    assert seen == [{"signal": signal, "sender": "loadlab.noop", "task_id": "t1", "state": "SUCCESS"}]
    task_signals.disconnect(signal, broken)
    signal.send(sender="loadlab.noop", task_id="t2")
    assert len(seen) == 2 and len(caplog.records) == 1
    assert [r.getMessage() for r in caplog.records].count(
        f"loadlab's loadlab_test_signal hook {broken.__qualname__} raised") == 1


def test_in_memory_exposition_matches_prometheus_histogram_semantics():
    store = MetricStore()
    inst = metrics.Instruments(store)
    for value in (0.0005, 0.003, 0.003, 7.0, 500.0):
        inst.queue_wait.labels("loadlab.cpu", "celery").observe(value)
    inst.sent.labels("loadlab.cpu", "celery").inc(3)
    registry_ = CollectorRegistry()
    registry_.register(store.collector())
    text = generate_latest(registry_).decode()
    samples = parse_prom(text)
    assert "# TYPE celery_task_queue_wait_seconds histogram" in text
    assert "# TYPE celery_task_sent_total counter" in text
    assert total(samples, "celery_task_sent_total") == 3
    assert total(samples, "celery_task_queue_wait_seconds_count") == 5
    assert total(samples, "celery_task_queue_wait_seconds_bucket", le="0.001") == 1
    assert total(samples, "celery_task_queue_wait_seconds_bucket", le="0.005") == 3
    assert total(samples, "celery_task_queue_wait_seconds_bucket", le="+Inf") == 5
    assert total(samples, "celery_task_queue_wait_seconds_sum") == pytest.approx(507.0065)


def test_timed_serializers_keep_names_and_content_types_and_record_each_call():
    before = {name: (codec.content_type, codec.content_encoding) for name, codec in registry._encoders.items()}
    serializers.install()
    try:
        assert {n: (c.content_type, c.content_encoding) for n, c in registry._encoders.items()} == before
        snapshot = metrics.STORE.snapshot
        count_key = metrics.INSTRUMENTS.serialization.labels("decode", "msgpack").bucket_keys
        decoded_before = sum(snapshot().get(k, 0) for k in count_key)
        for body in ({"a": 1}, [1, 2, 3], {"text": "é" * 100}):
            content_type, encoding, payload = dumps(body, serializer="msgpack")
            assert content_type == "application/x-msgpack"
            assert loads(payload, content_type, encoding, accept=ACCEPT) == body
            content_type, encoding, payload = dumps(body, serializer="json")
            assert loads(payload, content_type, encoding, accept=ACCEPT) == body
        assert sum(snapshot().get(k, 0) for k in count_key) == decoded_before + 3
        # sizes are bytes, not characters; a body with no length counts 0 bytes and the call still returns
        sizes = metrics.INSTRUMENTS.message_bytes.labels("encode", "loadlab-test")
        assert serializers._timed_encoder(lambda data: data, "loadlab-test")("é" * 10) == "é" * 10
        assert snapshot()[sizes.sum_key] == 20.0
        assert serializers._timed_decoder(lambda data: "decoded", "loadlab-test")(object()) == "decoded"
        assert snapshot()[metrics.INSTRUMENTS.message_bytes.labels("decode", "loadlab-test").bucket_key(0)] == 1.0
    finally:
        serializers.uninstall()
    assert not serializers.installed()


# --- a real run --------------------------------------------------------------------------------------------------------
def test_a_short_run_scrapes_every_metric_and_its_counters_equal_the_ledger(run_dir):
    done = run_cli("run", "smoke", "--duration", "4s", "--users", "4", "--serializer", "msgpack",
                   "--retry-backoff-s", "0", "--out", str(run_dir), timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((run_dir / "report.json").read_text())
    tasks = report["tasks"]
    assert tasks["submitted"] > 20 and tasks["lost"] == 0

    scrapes = {path.stem: parse_prom(path.read_text()) for path in (run_dir / "metrics").glob("*.prom")}
    assert {"api", "loadgen", "exporter"} <= set(scrapes) and any(name.startswith("w1.") for name in scrapes)
    every = [sample for samples in scrapes.values() for sample in samples]
    present = {name for name, _, _ in every}
    for name in OUR_METRICS:
        assert name in present or f"{name}_count" in present, f"{name} is in no scrape"
    # the report says where the scrapes are
    artefacts = report["artefacts"]
    assert sorted(v for k, v in artefacts.items() if k.startswith("metrics of")) == sorted(
        f"metrics/{p.name}" for p in (run_dir / "metrics").glob("*.prom"))
    assert "metrics/" in (run_dir / "report.html").read_text()

    # counters against the ledger (summed over every process: pool children, API, load generator)
    worker = [s for name, samples in scrapes.items() if name.startswith("w1.") for s in samples]
    assert total(every, "celery_task_succeeded_total") == tasks["succeeded"]
    assert total(every, "celery_task_failed_total") == tasks["failed"]
    assert total(every, "celery_task_retried_total") == tasks["retried"]
    assert total(every, "celery_task_revoked_total") == tasks["revoked"] == 0
    attempts = tasks["succeeded"] + tasks["failed"] + tasks["retried"]
    assert total(worker, "celery_task_started_total") == attempts
    assert total(worker, "celery_task_received_total") == attempts
    assert total(worker, "celery_task_runtime_seconds_count") == attempts
    assert total(worker, "celery_task_queue_wait_seconds_count") == attempts
    assert total(every, "loadlab_task_end_to_end_seconds_count") == tasks["succeeded"] + tasks["failed"]
    # Locust kills a user greenlet or two mid-publish when the load stops: such a message can reach the broker
    # without after_task_publish running in its producer (the ledger adopts it as an orphan). Never more than users.
    sent = total(every, "celery_task_sent_total")
    assert 0 <= tasks["submitted"] - sent <= 4, (sent, tasks["submitted"])

    # serialization: msgpack encoded by the producers, decoded by the pool children, sizes alongside
    producers = scrapes["api"] + scrapes["loadgen"]
    for samples, direction in ((producers, "encode"), (worker, "decode")):
        for family in ("celery_task_serialization_seconds", "celery_task_message_bytes"):
            n = total(samples, f"{family}_count", direction=direction, serializer="msgpack")
            assert n >= tasks["submitted"] * (0.9 if direction == "encode" else 1), (family, direction, n)
    assert total(worker, "celery_task_message_bytes_sum", direction="decode", serializer="msgpack") > 0
    # the API's own request metrics
    assert total(scrapes["api"], "http_requests_total", handler="/tasks/{name}", method="POST") > 0

    # labels are bounded: task names and the queue, never ids
    labels = defaultdict(set)
    for name, lab, _ in worker:
        if name.startswith("celery_task_"):
            for key, value in lab.items():
                labels[key].add(value)
    assert set(labels) <= {"task", "queue", "direction", "serializer", "le"}
    assert labels["queue"] == {"celery"}
    assert labels["task"] <= {f"loadlab.{t}" for t in ("noop", "cpu", "io", "flaky", "payload")}



def test_bench_metric_store_compares_the_slot_files_with_prometheus_clients_public_values():
    from loadlab.bench import metric_store as store_bench

    amounts = [0.001, 0.02, 0.3, 4.0, 99.0]
    ours, public = (store_bench.exposition(side, amounts) for side in (store_bench.loadlab_recorder,
                                                                          store_bench.public_recorder))
    assert ours == public and ours[("loadlab_bench_tasks_total", (("task", "t"),))] == len(amounts)
    assert ours[("loadlab_bench_runtime_seconds_bucket", (("le", "+Inf"), ("task", "t")))] == len(amounts)
    result = run_cli("bench", "metric-store", "--tasks", "1000", "--rounds", "2", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "read back the same by MultiProcessCollector: yes" in result.stdout
    assert re.search(r"public / store = [\d.]+ \[[\d.]+-[\d.]+\] .*: (met|missed|not resolved)", result.stdout)
