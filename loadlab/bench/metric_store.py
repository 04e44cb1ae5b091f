"""``loadlab bench metric-store``: loadlab's metric store (``loadlab.exporters.metric_store``, which writes
prometheus_client's multiprocess file layout itself, one file per pool slot) against prometheus_client's public
multiprocess values (``values.MultiProcessValue(process_identifier=…)``, which also names its files by the slot),
on what a worker records per task: a counter +1 and one histogram observation.

Both sides run in this process, their rounds interleaved, each writing its own directory; the ratio is the public
side's time per task over the store's, judged by ``loadlab.bench.verdict`` (the geometric mean of the paired
per-round ratios with its Student-t interval), as every bench. The private layout is worth keeping
only if the public values cost at least ``KEEP_IF_PUBLIC_COSTS`` times as much.
"""
from __future__ import annotations

import os
import random
import tempfile
import time
from contextlib import contextmanager

KEEP_IF_PUBLIC_COSTS = 1.5
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FAMILY, HISTOGRAM_FAMILY, HELP = "loadlab_bench_tasks", "loadlab_bench_runtime_seconds", "bench"


def loadlab_recorder(directory: str):
    """The store as a pool child uses it: declared samples, attached to a slot file, one bound recorder."""
    from loadlab.exporters.metric_store import COUNTER, HISTOGRAM, MetricStore, sample_key

    store = MetricStore()
    counter_key = sample_key(FAMILY, FAMILY + "_total", ("task",), ("t",), HELP)
    bucket_keys = tuple(sample_key(HISTOGRAM_FAMILY, HISTOGRAM_FAMILY + "_bucket", ("task", "le"),
                                   ("t", str(bound)), HELP) for bound in (*BUCKETS, "+Inf"))
    sum_key = sample_key(HISTOGRAM_FAMILY, HISTOGRAM_FAMILY + "_sum", ("task",), ("t",), HELP)
    store.declare(COUNTER, counter_key)
    for key in (*bucket_keys, sum_key):
        store.declare(HISTOGRAM, key)
    store.attach(directory, "0")
    return store.counter_and_histogram_recorder(counter_key, (BUCKETS, bucket_keys, sum_key)), store.detach


@contextmanager
def _multiprocess_values(directory: str, slot: str):
    from prometheus_client import values

    saved_class, saved_dir = values.ValueClass, os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    values.ValueClass = values.MultiProcessValue(process_identifier=lambda: slot)
    try:
        yield
    finally:
        values.ValueClass = saved_class
        if saved_dir is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = saved_dir


def public_recorder(directory: str):
    """prometheus_client's Counter and Histogram on its public multiprocess values, files named by the slot."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    with _multiprocess_values(directory, "0"):
        registry = CollectorRegistry()
        counter = Counter(FAMILY, HELP, ["task"], registry=registry).labels("t")
        histogram = Histogram(HISTOGRAM_FAMILY, HELP, ["task"], buckets=BUCKETS, registry=registry).labels("t")
        inc, observe = counter.inc, histogram.observe

    def record(amount: float) -> None:
        inc()
        observe(amount)

    return record, lambda: None


def time_side(make_recorder, amounts: list[float]) -> float:
    """Seconds per task of one side, in a directory of its own."""
    with tempfile.TemporaryDirectory(prefix="loadlab-bench-metrics-") as directory:
        record, close = make_recorder(directory)
        started = time.perf_counter()
        for amount in amounts:
            record(amount)
        elapsed = time.perf_counter() - started
        close()
    return elapsed / len(amounts)


def exposition(make_recorder, amounts: list[float]) -> dict:
    """What ``MultiProcessCollector`` reads back from the side's files: the same for both sides."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    with tempfile.TemporaryDirectory(prefix="loadlab-bench-metrics-") as directory:
        record, close = make_recorder(directory)
        for amount in amounts:
            record(amount)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in registry.collect() for s in family.samples}
        close()
    return samples


def run(tasks: int, rounds: int, seed: int = 1) -> dict:
    from loadlab.bench.verdict import paired_ratio, verdict

    rng = random.Random(seed)
    amounts = [rng.expovariate(10.0) for _ in range(tasks)]
    same = exposition(loadlab_recorder, amounts[:1000]) == exposition(public_recorder, amounts[:1000])
    store_s, public_s, ratios = [], [], []
    for index in range(rounds):
        order = [("store", loadlab_recorder), ("public", public_recorder)]
        if index % 2:
            order.reverse()  # neither side always runs first
        timed = {name: time_side(make, amounts) for name, make in order}
        store_s.append(timed["store"])
        public_s.append(timed["public"])
        ratios.append(timed["public"] / timed["store"])
    ratio = paired_ratio(ratios)
    return {"tasks": tasks, "rounds": rounds, "same_exposition": same,
            "store_ns_per_task": sorted(store_s)[len(store_s) // 2] * 1e9,
            "public_ns_per_task": sorted(public_s)[len(public_s) // 2] * 1e9,
            "ratio": ratio.value, "ratio_ci_low": ratio.low, "ratio_ci_high": ratio.high,
            "target": KEEP_IF_PUBLIC_COSTS, "verdict": verdict(ratio.low, ratio.high, KEEP_IF_PUBLIC_COSTS)}


def render(result: dict) -> str:
    from loadlab.bench.verdict import MET, MISSED

    keep = {MET: "met: the private layout stays",
            MISSED: "missed: prometheus_client's public MultiProcessValue would do"}.get(
        result["verdict"], "not resolved: the interval spans the target")
    return (f"counter +1 and one histogram observation per task, {result['tasks']:,} tasks x {result['rounds']} "
            f"interleaved rounds (this machine's times)\n"
            f"  loadlab metric store (slot files)   {result['store_ns_per_task']:8.0f} ns/task\n"
            f"  prometheus_client MultiProcessValue {result['public_ns_per_task']:8.0f} ns/task\n"
            f"  public / store = {result['ratio']:.2f} [{result['ratio_ci_low']:.2f}-{result['ratio_ci_high']:.2f}] "
            f"(geometric mean [95 % CI]; keep the private layout if >= {result['target']}): {keep}\n"
            f"  both read back the same by MultiProcessCollector: {'yes' if result['same_exposition'] else 'NO'}")
