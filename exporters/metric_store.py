"""One process's metric values, optionally kept in prometheus_client's multiprocess file format
(``<kind>_<slot>.db`` in a shared-memory directory) so that the worker's MainProcess can serve what its pool children
count, with the stock ``MultiProcessCollector``.

Every sample is a *cell*: a place holding one float, either a slot of an in-memory list or a double of a slot file
(``SlotFile``), looked up by its key once per update. An update is then ``values[index] += amount`` under a lock: in a
file that is one aligned 8-byte store into the shared mapping, nothing to copy or ship later.

Why not prometheus_client's own multiprocess values, or its ``MmapedDict`` behind a dict: those went through three
Python calls, a ``struct.pack`` and a slice assignment per sample written (about three times a cell's cost, see
docs/performance.md), and prometheus_client keys its files by pid, which is what makes recycled pool children pile files up. Here the caller
picks the file name (a pool slot), see ``loadlab.exporters.worker_metrics``.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import threading
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable

from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import mmap_key
from prometheus_client.utils import floatToGoString

COUNTER, HISTOGRAM, GAUGE = "counter", "histogram", "gauge"
# file name prefixes MultiProcessCollector understands; gauges keep the last value written per slot ("all" mode)
FILE_PREFIX = {COUNTER: "counter", HISTOGRAM: "histogram", GAUGE: "gauge_all"}

# a histogram's (bucket bounds, bucket keys with +Inf last, sum key)
HistogramKeys = tuple[tuple[float, ...], tuple[str, ...], str]

_INT = struct.Struct("i")
_INITIAL_FILE_BYTES = 1 << 16  # as prometheus_client's; doubled when full, so always a whole number of doubles


def sample_key(family: str, sample: str, labelnames, labelvalues, help_text: str) -> str:
    """The key of one sample, as prometheus_client's multiprocess files spell it."""
    return mmap_key(family, sample, list(labelnames), list(labelvalues), help_text)


class SlotFile:
    """One ``<kind>_<slot>.db`` in the layout ``MultiProcessCollector`` reads: an int32 of the bytes used, padding
    to 8, then per sample an int32 key length, the UTF-8 key padded so that what follows is 8-aligned, the value and
    a timestamp (two doubles). Values are read and written through a ``memoryview`` of the mapping cast to doubles:
    one aligned 8-byte store, which a reader never sees half-done (``struct.pack_into`` zeroes the bytes first)."""

    def __init__(self, path: str):
        self._file = open(path, "a+b")  # noqa: SIM115 - open for the life of the attachment; closed by close()
        size = os.fstat(self._file.fileno()).st_size
        if size == 0:
            self._file.truncate(_INITIAL_FILE_BYTES)
            size = _INITIAL_FILE_BYTES
        self._map = mmap.mmap(self._file.fileno(), size)
        # A grown file gets a new mapping; views of the old ones stay valid for the cells they hold (the same shared
        # pages) and are released at close.
        self._views = [memoryview(self._map).cast("d")]
        self._used = _INT.unpack_from(self._map, 0)[0]
        if self._used == 0:
            self._used = 8
            self._map[0:4] = _INT.pack(self._used)
        self.indexes: dict[str, int] = {}  # key -> index of its value among the file's doubles
        position = 8
        while position < self._used:
            (length,) = _INT.unpack_from(self._map, position)
            key = self._map[position + 4:position + 4 + length].decode("utf-8")
            position += 4 + length + (8 - (length + 4) % 8)
            self.indexes[key] = position // 8
            position += 16

    def cell(self, key: str) -> tuple[memoryview, int]:
        """Where ``key``'s value lives, the entry appended (value 0) if the file does not have it yet."""
        index = self.indexes.get(key)
        if index is None:
            encoded = key.encode("utf-8")
            padded = encoded + b" " * (8 - (len(encoded) + 4) % 8)
            entry = _INT.pack(len(encoded)) + padded + bytes(16)
            if self._used + len(entry) > len(self._map):
                size = len(self._map)
                while self._used + len(entry) > size:
                    size *= 2
                self._file.truncate(size)
                self._map = mmap.mmap(self._file.fileno(), size)
                self._views.append(memoryview(self._map).cast("d"))
            self._map[self._used:self._used + len(entry)] = entry
            self._used += len(entry)
            self._map[0:4] = _INT.pack(self._used)  # after the entry: a reader sees all of it or none
            index = self.indexes[key] = (self._used - 16) // 8
        return self._views[-1], index

    def close(self) -> None:
        for view in self._views:
            view.release()
        self._views = []
        self._map.close()
        self._file.close()


class MetricStore:
    def __init__(self):
        self._lock = threading.Lock()
        self._cells: dict[str, tuple] = {}  # key -> (values, index): a slot of _memory, or a double of a SlotFile
        self._memory: list[float] = []
        self._kinds: dict[str, str] = {}
        self._files: dict[str, SlotFile] = {}
        self._directory: str | None = None
        self._slot: str | None = None
        self._histograms: dict[str, str] = {}  # family -> help, so a histogram with no sample yet still shows
        self._declared: dict[str, str] = {}    # key -> kind of every sample bound so far (definitions, kept on fork)
        os.register_at_fork(after_in_child=self._after_fork)

    def _cell(self, kind: str, key: str) -> tuple:
        """A new sample's cell (lock held): at 0, in this process's slot file of its kind when attached."""
        cell = self._cells.get(key)
        if cell is None:
            self._kinds[key] = kind
            if self._directory is None:
                self._memory.append(0.0)
                cell = (self._memory, len(self._memory) - 1)
            else:
                file = self._files.get(kind)
                if file is None:
                    path = os.path.join(self._directory, f"{FILE_PREFIX[kind]}_{self._slot}.db")
                    file = self._files[kind] = SlotFile(path)
                cell = file.cell(key)
            self._cells[key] = cell
        return cell

    # --- hot path: one dict lookup and one in-place add per sample ----------------------------------------------------
    def add(self, kind: str, key: str, amount: float) -> None:
        with self._lock:
            values, index = self._cells.get(key) or self._cell(kind, key)
            values[index] += amount

    def set(self, kind: str, key: str, value: float) -> None:
        with self._lock:
            values, index = self._cells.get(key) or self._cell(kind, key)
            values[index] = value

    def observe(self, bucket_key: str, sum_key: str, amount: float) -> None:
        """One histogram observation: its bucket +1 and the sum +amount, under one lock."""
        cells = self._cells
        with self._lock:
            values, index = cells.get(bucket_key) or self._cell(HISTOGRAM, bucket_key)
            values[index] += 1.0
            values, index = cells.get(sum_key) or self._cell(HISTOGRAM, sum_key)
            values[index] += amount

    # --- recorders: the per-task and per-message paths ----------------------------------------------------------------
    # One event often records two things (a codec call: its time and the message size; a task starting: the started
    # counter and its queue wait; ending: its state's counter and runtime). A recorder is a function bound to the
    # samples it updates: it finds the bucket, takes the lock once for all of them and updates the cells in place.
    # It is one call where a method, a bucket lookup and a fallback per sample were five to seven: this runs several
    # times per task in every process, so its instructions are a measurable share of the stack's (bench overhead).
    # Its samples are declared (bound instruments declare theirs), so their cells exist after every attach, detach
    # and fork: a plain subscript finds them. The lock is taken with acquire/release, not ``with`` (half the
    # instructions a round), and a recorder takes one or two rounds per task.
    def counter_recorder(self, counter_key: str) -> Callable[[], None]:
        """``record()``: the counter +1."""
        self._check_declared((counter_key,))

        def record() -> None:
            lock = self._lock
            lock.acquire()
            try:
                values, index = self._cells[counter_key]
                values[index] += 1.0
            finally:
                lock.release()

        return record

    def counter_and_histogram_recorder(self, counter_key: str, histogram: HistogramKeys) -> Callable[[float], None]:
        """``record(amount)``: the counter +1 and one observation of ``histogram``."""
        bounds, bucket_keys, sum_key = histogram
        self._check_declared((counter_key, *bucket_keys, sum_key))

        def record(amount: float) -> None:
            bucket = bucket_keys[bisect_left(bounds, amount)]  # first: a value that cannot be observed changes nothing
            lock = self._lock
            lock.acquire()
            try:
                cells = self._cells  # read under the lock: attach and detach replace it
                values, index = cells[counter_key]
                values[index] += 1.0
                values, index = cells[bucket]
                values[index] += 1.0
                values, index = cells[sum_key]
                values[index] += amount
            finally:
                lock.release()

        return record

    def histogram_pair_recorder(self, first: HistogramKeys, second: HistogramKeys) -> Callable[[float, float], None]:
        """``record(first_amount, second_amount)``: one observation of each histogram."""
        bounds_a, buckets_a, sum_a = first
        bounds_b, buckets_b, sum_b = second
        self._check_declared((*buckets_a, sum_a, *buckets_b, sum_b))

        def record(amount_a: float, amount_b: float) -> None:
            bucket_a, bucket_b = buckets_a[bisect_left(bounds_a, amount_a)], buckets_b[bisect_left(bounds_b, amount_b)]
            lock = self._lock
            lock.acquire()
            try:
                cells = self._cells  # read under the lock: attach and detach replace it
                values, index = cells[bucket_a]
                values[index] += 1.0
                values, index = cells[sum_a]
                values[index] += amount_a
                values, index = cells[bucket_b]
                values[index] += 1.0
                values, index = cells[sum_b]
                values[index] += amount_b
            finally:
                lock.release()

        return record

    def _check_declared(self, keys) -> None:
        missing = [key for key in keys if key not in self._declared]
        if missing:
            raise KeyError(f"a recorder's samples must be declared first; not declared: {missing}")

    # --- files ----------------------------------------------------------------------------------------------------
    def attach(self, directory: str, slot: str) -> None:
        """Keep values in ``directory``'s files for ``slot`` from now on. Values already in that slot's files
        (a recycled pool child's predecessor) are continued, not reset: the files hold cumulative totals."""
        if "_" in slot:
            raise ValueError(f"slot {slot!r} must not contain '_' (file names are <kind>_<slot>.db)")
        with self._lock:
            recorded_before = self._values()
            self._close_files()
            self._cells, self._memory = {}, []
            self._directory, self._slot = directory, slot
            for kind, prefix in FILE_PREFIX.items():
                path = os.path.join(directory, f"{prefix}_{slot}.db")
                if os.path.exists(path):
                    file = self._files[kind] = SlotFile(path)
                    for key in file.indexes:
                        self._cells[key] = file.cell(key)
                        self._kinds[key] = kind
            for key, kind in self._declared.items():
                self._cell(kind, key)
            for key, amount in recorded_before.items():
                kind = self._kinds[key]
                values, index = self._cell(kind, key)
                if kind == GAUGE:
                    values[index] = amount
                else:
                    values[index] += amount

    def detach(self) -> None:
        """Back to memory, with the values as they are (a late update after a worker's shutdown still counts)."""
        with self._lock:
            values = self._values()
            self._close_files()
            self._directory, self._slot = None, None
            self._cells, self._memory = {}, []
            for key, amount in values.items():
                memory, index = self._cell(self._kinds[key], key)
                memory[index] = amount

    def _close_files(self) -> None:
        """(Lock held; the caller replaces the cells, which point into the views released here.)"""
        for file in self._files.values():
            file.close()
        self._files = {}

    def _after_fork(self) -> None:
        # A forked child starts at zero and in memory: the parent's values (and its files) are the parent's. The
        # inherited mappings are only dropped (unmapped in this process when collected); the parent keeps its own.
        self._lock = threading.Lock()
        self._files, self._directory, self._slot = {}, None, None
        self._cells, self._memory = {}, []
        for key, kind in self._declared.items():
            self._cell(kind, key)

    def declare(self, kind: str, key: str) -> None:
        """A sample exists from its first use at 0, as with prometheus_client: a histogram shows all its buckets
        (histogram_quantile needs them) and a counter its 0 before the first event. Kept across fork and attach."""
        with self._lock:
            self._declared[key] = kind
            self._cell(kind, key)

    def declare_histogram(self, family: str, help_text: str) -> None:
        self._histograms[family] = help_text

    # --- exposition (in-memory stores; attached stores are read from their files) -------------------------------
    def _values(self) -> dict[str, float]:
        return {key: values[index] for key, (values, index) in self._cells.items()}

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return self._values()

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
