"""One process's metric values: a dict under a lock, optionally written through to prometheus_client's multiprocess
file format (``<kind>_<slot>.db`` in a shared-memory directory) so that the worker's MainProcess can serve what its
pool children count, with the stock ``MultiProcessCollector``.

Why not prometheus_client's own multiprocess values: those cost 2-5 us per observation on this kind of machine
(locks, pid checks and wrappers around the same mmap write), this store ~0.6 us; and they key files by pid, which is
what makes recycled pool children pile files up. Here the caller picks the file name (a pool slot), see
``exporters.worker_metrics``.
"""
from __future__ import annotations

import json
import os
import threading
from collections import defaultdict

from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.utils import floatToGoString

COUNTER, HISTOGRAM, GAUGE = "counter", "histogram", "gauge"
# file name prefixes MultiProcessCollector understands; gauges keep the last value written per slot ("all" mode)
FILE_PREFIX = {COUNTER: "counter", HISTOGRAM: "histogram", GAUGE: "gauge_all"}


def sample_key(family: str, sample: str, labelnames, labelvalues, help_text: str) -> str:
    """The key of one sample, as prometheus_client's multiprocess files spell it."""
    return mmap_key(family, sample, list(labelnames), list(labelvalues), help_text)


class MetricStore:
    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[str, float] = {}
        self._kinds: dict[str, str] = {}
        self._files: dict[str, MmapedDict] = {}
        self._directory: str | None = None
        self._slot: str | None = None
        self._histograms: dict[str, str] = {}  # family -> help, so a histogram with no sample yet still shows
        self._declared: dict[str, str] = {}    # key -> kind of every sample bound so far (definitions, kept on fork)
        os.register_at_fork(after_in_child=self._after_fork)

    # --- hot path -----------------------------------------------------------------------------------------------
    def add(self, kind: str, key: str, amount: float) -> None:
        with self._lock:
            value = self._values.get(key)
            if value is None:
                self._kinds[key] = kind
                value = 0.0
            value += amount
            self._values[key] = value
            if self._directory is not None:
                (self._files.get(kind) or self._open(kind)).write_value(key, value, 0.0)

    def observe(self, bucket_key: str, sum_key: str, amount: float) -> None:
        """One histogram observation: its bucket +1 and the sum +amount, under one lock."""
        with self._lock:
            values = self._values
            count = values.get(bucket_key)
            if count is None:
                self._kinds[bucket_key] = HISTOGRAM
                count = 0.0
            total = values.get(sum_key)
            if total is None:
                self._kinds[sum_key] = HISTOGRAM
                total = 0.0
            values[bucket_key] = count = count + 1.0
            values[sum_key] = total = total + amount
            if self._directory is not None:
                file = self._files.get(HISTOGRAM) or self._open(HISTOGRAM)
                file.write_value(bucket_key, count, 0.0)
                file.write_value(sum_key, total, 0.0)

    # One event often records two things (a codec call: its time and the message size; a task starting: the
    # started counter and its queue wait; ending: its state's counter and runtime). These take one lock round and
    # one file lookup for both, on a path that runs a few times per task.
    def observe_pair(self, bucket_a: str, sum_a: str, amount_a: float, bucket_b: str, sum_b: str,
                     amount_b: float) -> None:
        """Two histogram observations."""
        with self._lock:
            values = self._values
            count_a = values.get(bucket_a, 0.0) + 1.0
            total_a = values.get(sum_a, 0.0) + amount_a
            count_b = values.get(bucket_b, 0.0) + 1.0
            total_b = values.get(sum_b, 0.0) + amount_b
            values[bucket_a], values[sum_a], values[bucket_b], values[sum_b] = count_a, total_a, count_b, total_b
            if self._directory is not None:
                write = (self._files.get(HISTOGRAM) or self._open(HISTOGRAM)).write_value
                write(bucket_a, count_a, 0.0)
                write(sum_a, total_a, 0.0)
                write(bucket_b, count_b, 0.0)
                write(sum_b, total_b, 0.0)

    def count_and_observe(self, counter_key: str, bucket_key: str, sum_key: str, amount: float) -> None:
        """A counter +1 and one histogram observation."""
        with self._lock:
            values = self._values
            counted = values.get(counter_key, 0.0) + 1.0
            count = values.get(bucket_key, 0.0) + 1.0
            total = values.get(sum_key, 0.0) + amount
            values[counter_key], values[bucket_key], values[sum_key] = counted, count, total
            if self._directory is not None:
                (self._files.get(COUNTER) or self._open(COUNTER)).write_value(counter_key, counted, 0.0)
                write = (self._files.get(HISTOGRAM) or self._open(HISTOGRAM)).write_value
                write(bucket_key, count, 0.0)
                write(sum_key, total, 0.0)

    def set(self, kind: str, key: str, value: float) -> None:
        with self._lock:
            self._kinds.setdefault(key, kind)
            self._values[key] = value
            if self._directory is not None:
                (self._files.get(kind) or self._open(kind)).write_value(key, value, 0.0)

    # --- files ----------------------------------------------------------------------------------------------------
    def _open(self, kind: str) -> MmapedDict:
        file = self._files[kind] = MmapedDict(os.path.join(self._directory, f"{FILE_PREFIX[kind]}_{self._slot}.db"))
        return file

    def attach(self, directory: str, slot: str) -> None:
        """Write through to ``directory`` under the name ``slot`` from now on. Values already in that slot's files
        (a recycled pool child's predecessor) are continued, not reset: the files hold cumulative totals."""
        if "_" in slot:
            raise ValueError(f"slot {slot!r} must not contain '_' (file names are <kind>_<slot>.db)")
        with self._lock:
            recorded_before = self._values
            self._values, self._files = {}, {}
            self._directory, self._slot = directory, slot
            for kind, prefix in FILE_PREFIX.items():
                path = os.path.join(directory, f"{prefix}_{slot}.db")
                if os.path.exists(path):
                    file = self._files[kind] = MmapedDict(path)
                    for key, value, _timestamp in file.read_all_values():
                        self._values[key] = value
                        self._kinds[key] = kind
        for key, kind in list(self._declared.items()):
            if key not in self._values:
                self.add(kind, key, 0.0)
        for key, amount in recorded_before.items():
            kind = self._kinds[key]
            if kind == GAUGE:
                self.set(kind, key, amount)
            else:
                self.add(kind, key, amount)

    def detach(self) -> None:
        with self._lock:
            for file in self._files.values():
                file.close()
            self._files, self._directory, self._slot = {}, None, None

    def _after_fork(self) -> None:
        # A forked child starts at zero and in memory: the parent's values (and its files) are the parent's.
        self._lock = threading.Lock()
        self._values = dict.fromkeys(self._declared, 0.0)
        self._files, self._directory, self._slot = {}, None, None

    def declare(self, kind: str, key: str) -> None:
        """A sample exists from its first use at 0, as with prometheus_client: a histogram shows all its buckets
        (histogram_quantile needs them) and a counter its 0 before the first event. Kept across fork and attach."""
        with self._lock:
            self._declared[key] = kind
        if key not in self._values or self._directory is not None:
            self.add(kind, key, 0.0)

    def declare_histogram(self, family: str, help_text: str) -> None:
        self._histograms[family] = help_text

    # --- exposition (in-memory stores; attached stores are read from their files) -------------------------------
    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._values)

    def collector(self) -> "StoreCollector":
        return StoreCollector(self)


class StoreCollector:
    """Exposes an in-memory store like MultiProcessCollector exposes files: buckets made cumulative, ``_count``
    derived from them."""

    def __init__(self, store: MetricStore):
        self.store = store
        self._parsed: dict[str, tuple] = {}

    def describe(self):
        return []

    def _parse(self, key: str) -> tuple:
        parsed = self._parsed.get(key)
        if parsed is None:
            family, sample, labels, help_text = json.loads(key)
            parsed = self._parsed[key] = (family, sample, tuple(sorted(labels.items())), help_text)
        return parsed

    def collect(self):
        kinds = self.store._kinds
        families: dict[str, Metric] = {}
        buckets: dict[str, dict[tuple, dict[float, float]]] = defaultdict(lambda: defaultdict(dict))
        for key, value in self.store.snapshot().items():
            family, sample, labels, help_text = self._parse(key)
            kind = kinds.get(key, COUNTER)
            metric = families.get(family)
            if metric is None:
                metric = families[family] = Metric(family, help_text, kind)
            if kind == HISTOGRAM and sample.endswith("_bucket"):
                le = dict(labels)["le"]
                without_le = tuple(item for item in labels if item[0] != "le")
                buckets[family][without_le][float(le)] = value
            else:
                metric.add_sample(sample, dict(labels), value)
        for family, by_labels in buckets.items():
            metric = families[family]
            for labels, counts in by_labels.items():
                cumulative = 0.0
                for bound in sorted(counts):
                    cumulative += counts[bound]
                    metric.add_sample(family + "_bucket", {**dict(labels), "le": floatToGoString(bound)}, cumulative)
                metric.add_sample(family + "_count", dict(labels), cumulative)
        for family, help_text in self.store._histograms.items():
            families.setdefault(family, Metric(family, help_text, HISTOGRAM))
        return list(families.values())
