"""The run recorder: consumes the ledger channel, follows every submitted task id to a terminal state, and keeps
phase latencies in HDR histograms. Memory is bounded by what is in flight, not by how many tasks ran: finished ids
leave the ledger (a bounded window of recent ones is kept to recognise redeliveries), histograms have a fixed size,
and the time series merges neighbouring buckets when it grows past ``MAX_BUCKETS``.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from hdrh.histogram import HdrHistogram

from loadlab.exporters import ledger
from loadlab.stack.tasks import short_name

PHASES = ("publish", "queue_wait", "execution", "result_store", "end_to_end")
REPORT_PHASES = ("publish", "queue_wait", "execution", "end_to_end")
PERCENTILES = (50, 90, 95, 99)
# microseconds, 1 us .. 1 h, 3 significant digits (DESIGN: >= 3)
HDR_LOWEST_US, HDR_HIGHEST_US, HDR_DIGITS = 1, 3_600_000_000, 3
SERIES_DIGITS = 2  # per-bucket histograms of the time series: 1 % resolution keeps them small
MAX_BUCKETS = 240  # with 4-byte counters and 2 digits: ~3 MB at most for the whole series
RECENT_TERMINAL = 100_000
RETRY_CHAIN_LIMIT = 1000
FAILED_LISTED = 1000  # tasks that failed for good, listed in the report one by one


def new_histogram(digits: int = HDR_DIGITS, word_size: int = 8) -> HdrHistogram:
    return HdrHistogram(HDR_LOWEST_US, HDR_HIGHEST_US, digits, word_size=word_size)


def record_seconds(hist: HdrHistogram, seconds: float | None) -> None:
    if seconds is None:
        return
    hist.record_value(min(HDR_HIGHEST_US, max(HDR_LOWEST_US, int(seconds * 1e6 + 0.5))))


def histogram_stats_ms(hist: HdrHistogram) -> dict:
    count = hist.get_total_count()
    if not count:
        return {"count": 0, "mean": 0.0, "p50": 0.0, "p90": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}
    out = {"count": count, "mean": round(hist.get_mean_value() / 1000.0, 3)}
    for p in PERCENTILES:
        out[f"p{p}"] = round(hist.get_value_at_percentile(p) / 1000.0, 3)
    out["max"] = round(hist.get_max_value() / 1000.0, 3)
    return out


@dataclass
class Bucket:
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    retried: int = 0
    end_to_end: HdrHistogram = field(default_factory=lambda: new_histogram(SERIES_DIGITS, word_size=4))
    # the broker's queue depth: the last sample taken in the bucket, and when it was taken (None: no sample)
    queue_depth: int | None = None
    queue_depth_at: float | None = None

    def merge(self, other: "Bucket") -> None:
        self.submitted += other.submitted
        self.completed += other.completed
        self.failed += other.failed
        self.retried += other.retried
        self.end_to_end.add(other.end_to_end)
        if other.queue_depth_at is not None:
            self.observe_queue_depth(other.queue_depth_at, other.queue_depth)

    def observe_queue_depth(self, at: float, depth: int) -> None:
        if self.queue_depth_at is None or at >= self.queue_depth_at:
            self.queue_depth, self.queue_depth_at = depth, at


class TimeSeries:
    """Per-interval counts and end-to-end percentiles; interval doubles when there would be too many buckets."""

    def __init__(self, start: float, width_s: float = 1.0):
        self.start = start
        self.width = width_s
        self.buckets: dict[int, Bucket] = {}

    def at(self, ts: float) -> Bucket:
        index = max(0, int((ts - self.start) / self.width))
        while index >= MAX_BUCKETS:
            self._coarsen()
            index = max(0, int((ts - self.start) / self.width))
        bucket = self.buckets.get(index)
        if bucket is None:
            bucket = self.buckets[index] = Bucket()
        return bucket

    def _coarsen(self) -> None:
        merged: dict[int, Bucket] = {}
        for index, bucket in sorted(self.buckets.items()):
            target = merged.get(index // 2)
            if target is None:
                merged[index // 2] = bucket
            else:
                target.merge(bucket)
        self.buckets = merged
        self.width *= 2

    def rows(self) -> list[dict]:
        rows = []
        in_system = 0
        last = max(self.buckets) if self.buckets else -1
        for index in range(last + 1):
            b = self.buckets.get(index) or Bucket()
            in_system += b.submitted - b.completed - b.failed
            count = b.end_to_end.get_total_count()
            rows.append({
                "t_s": round(index * self.width, 3),
                "width_s": self.width,
                "submitted_per_s": round(b.submitted / self.width, 3),
                "completed_per_s": round(b.completed / self.width, 3),
                "failed_per_s": round(b.failed / self.width, 3),
                "retried_per_s": round(b.retried / self.width, 3),
                "in_system": max(0, in_system),
                "queue_depth": b.queue_depth,
                "end_to_end_p50_ms": round(b.end_to_end.get_value_at_percentile(50) / 1000, 3) if count else None,
                "end_to_end_p95_ms": round(b.end_to_end.get_value_at_percentile(95) / 1000, 3) if count else None,
            })
        return rows


class Recorder:
    """Consumes the ledger channel of one run. ``on_completion(task, state, end_to_end_s)`` is called for each task
    that reaches a terminal state (Locust uses it to fire its ``end_to_end`` request events)."""

    def __init__(self, ledger_url: str, run_id: str, *, max_retries: int | None = None,
                 on_completion: Callable[[str, str, float | None], None] | None = None, warmup_s: float = 0.0):
        self.ledger_url = ledger_url
        self.key = ledger.channel_key(run_id)
        self.max_retries = max_retries
        self.on_completion = on_completion
        self.histograms = {phase: new_histogram() for phase in PHASES}
        self.per_task: dict[str, HdrHistogram] = {}
        self.backoff = new_histogram()
        self.backoff_by_retry: dict[int, HdrHistogram] = {}  # retry number (1 = first retry) -> observed delay
        self.first_publish_to_success = new_histogram()
        self.counts = {"submitted": 0, "succeeded": 0, "failed": 0, "revoked": 0, "rejected": 0, "retried": 0,
                       "duplicates": 0, "reconciled": 0}
        self.attempts: dict[int, int] = {}
        self.exhausted = 0
        self.tasks_retried = 0
        self.retry_exceptions: dict[str, int] = {}
        self.pending: dict[str, tuple[str, float]] = {}   # id -> (task name, sent_at)
        self.early: dict[str, list] = {}                  # terminal records that beat their SENT record
        self.recent_terminal: OrderedDict[str, None] = OrderedDict()
        self.retrying: dict[str, list] = {}               # id -> retry chain while the task is retrying
        self.retry_chains: list[dict] = []
        self.failed_for_good: list[dict] = []  # the first FAILED_LISTED tasks that ended in FAILURE
        self.series: TimeSeries | None = None
        self._depth_before_series: tuple[float, int] | None = None  # the last queue sample before the first task
        self.first_sent_at: float | None = None
        self.last_finished_at: float | None = None
        self.pending_at_end: int | None = None
        self.load_stopped_at: float | None = None
        self.records = 0
        # steady window: tasks sent after the warm-up and finished before the load stopped
        self.warmup_s = warmup_s
        self.steady_end_to_end = new_histogram()
        self.steady_completed = 0
        self._client = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.closed = False  # close() pops the last records: after it, what the report is built from

    # --- consuming -----------------------------------------------------------------------------------------------
    def _redis(self):
        if self._client is None:
            import redis

            self._client = redis.Redis.from_url(self.ledger_url, socket_timeout=10)
        return self._client

    def start(self) -> "Recorder":
        self._thread = threading.Thread(target=self._loop, name="loadlab-recorder", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.poll():
                time.sleep(0.02)

    def poll(self, batch: int = 1000) -> int:
        """Consume what is in the channel now; returns the number of records handled."""
        items = ledger.pop_batch(self._redis, self.key, batch)
        if items is None:
            self._client = None
            return 0
        if not items:
            return 0
        with self._lock:
            for data in items:
                self.handle(ledger.decode(data))
        return len(items)

    def close(self) -> None:
        self.closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.poll(100_000)
        self.adopt_orphans()
        try:
            self._redis().delete(self.key)
        except Exception:  # noqa: BLE001
            pass

    # --- records ---------------------------------------------------------------------------------------------------
    def handle(self, record: list) -> None:
        self.records += 1
        kind = record[0]
        if kind == ledger.SENT:
            self._sent(*record[1:6])
        elif kind == ledger.ATTEMPT:
            self._attempt(*record[1:14])

    def _series(self, ts: float) -> Bucket:
        if self.series is None:
            self.series = TimeSeries(ts)
            if self._depth_before_series is not None:  # the queue as it was when the first task went out
                at, depth = self._depth_before_series
                self.series.at(at).observe_queue_depth(at, depth)
        return self.series.at(ts)

    def observe_queue_depth(self, at: float, depth: int) -> None:
        """A sample of the broker's queue depth (ready messages) taken at ``at`` (epoch seconds); each time series
        bucket keeps the last sample that fell in it. Before the first task there is no time axis yet: the latest
        such sample goes to the first bucket once there is."""
        with self._lock:
            if self.series is None:
                self._depth_before_series = (at, int(depth))
            else:
                self.series.at(at).observe_queue_depth(at, int(depth))

    def _sent(self, task_id, name, sent_at, publish_s, intended_at=None) -> None:
        self.counts["submitted"] += 1
        if self.first_sent_at is None or sent_at < self.first_sent_at:
            self.first_sent_at = sent_at
        record_seconds(self.histograms["publish"], publish_s)
        self._series(sent_at).submitted += 1
        early = self.early.pop(task_id, None)
        if early is not None:
            self._terminal(*early)
        else:
            self.pending[task_id] = (name, sent_at)

    def _attempt(self, task_id, name, state, sent_at, attempt_sent_at, eta, started_at, body_done_at,
                 finished_at, retries, exc_type, intended_at=None, hostname=None) -> None:
        if started_at is not None:
            queued_since = max(attempt_sent_at or sent_at or started_at, eta or 0)
            record_seconds(self.histograms["queue_wait"], max(0.0, started_at - queued_since))
            if body_done_at is not None:
                record_seconds(self.histograms["execution"], max(0.0, body_done_at - started_at))
                record_seconds(self.histograms["result_store"], max(0.0, finished_at - body_done_at))
        attempt = {"attempt": (retries or 0) + 1, "state": state, "exception": exc_type, "started_at": started_at,
                   "failed_at": body_done_at, "eta": eta}
        if state == "RETRY":
            self.counts["retried"] += 1
            self._series(finished_at).retried += 1
            self.retry_exceptions[exc_type or "?"] = self.retry_exceptions.get(exc_type or "?", 0) + 1
            # a retry's own record can arrive after the task's final one (it is sent once the retry is published)
            if task_id not in self.recent_terminal:
                self.retrying.setdefault(task_id, []).append(attempt)
            return
        if state not in ledger.TERMINAL_STATES:
            return
        args = (task_id, name, state, sent_at, finished_at, retries or 0, exc_type, intended_at, attempt)
        if task_id in self.pending:
            self._terminal(*args)
        elif task_id in self.recent_terminal:
            self.counts["duplicates"] += 1
        else:
            self.early[task_id] = list(args)

    def _terminal(self, task_id, name, state, sent_at, finished_at, retries, exc_type, intended_at,
                  final_attempt: dict | None = None) -> None:
        entry = self.pending.pop(task_id, None)
        if sent_at is None and entry is not None:
            sent_at = entry[1]
        self.recent_terminal[task_id] = None
        if len(self.recent_terminal) > RECENT_TERMINAL:
            self.recent_terminal.popitem(last=False)
        key = {"SUCCESS": "succeeded", "FAILURE": "failed", "REVOKED": "revoked", "REJECTED": "rejected"}[state]
        self.counts[key] += 1
        bucket = self._series(finished_at)
        if state == "SUCCESS":
            bucket.completed += 1
        else:
            bucket.failed += 1
            if state == "FAILURE" and len(self.failed_for_good) < FAILED_LISTED:
                self.failed_for_good.append({"id": task_id, "task": name, "exception": exc_type,
                                             "attempts": (retries or 0) + 1, "finished_at": finished_at})
        self.last_finished_at = max(self.last_finished_at or finished_at, finished_at)
        # coordinated omission: with an intended send time, latency counts from when the request should have gone
        origin = intended_at or sent_at
        end_to_end = (finished_at - origin) if origin is not None else None
        if end_to_end is not None:
            end_to_end = max(0.0, end_to_end)
            record_seconds(self.histograms["end_to_end"], end_to_end)
            record_seconds(bucket.end_to_end, end_to_end)
            short = short_name(name) if name else "?"  # the app's own tasks keep their registered names
            hist = self.per_task.get(short)
            if hist is None:
                hist = self.per_task[short] = new_histogram()
            record_seconds(hist, end_to_end)
        if (self.warmup_s and origin is not None and end_to_end is not None and self.first_sent_at is not None
                and origin >= self.first_sent_at + self.warmup_s
                and (self.load_stopped_at is None or finished_at <= self.load_stopped_at)):
            self.steady_completed += 1
            record_seconds(self.steady_end_to_end, end_to_end)
        attempts = retries + 1
        self.attempts[attempts] = self.attempts.get(attempts, 0) + 1
        chain = self.retrying.pop(task_id, None)
        if retries:
            self.tasks_retried += 1
            if state == "FAILURE" and self.max_retries is not None and retries >= self.max_retries:
                self.exhausted += 1
            if state == "SUCCESS" and sent_at is not None:
                record_seconds(self.first_publish_to_success, finished_at - sent_at)
            chain = sorted((chain or []) + ([final_attempt] if final_attempt else []), key=lambda a: a["attempt"])
            # observed backoff: an attempt failed -> the next attempt started (includes the countdown and queueing)
            for previous, following in zip(chain, chain[1:]):
                if following["attempt"] == previous["attempt"] + 1 and previous["failed_at"] and following["started_at"]:
                    delay = max(0.0, following["started_at"] - previous["failed_at"])
                    record_seconds(self.backoff, delay)
                    by_retry = self.backoff_by_retry.get(previous["attempt"])
                    if by_retry is None:
                        by_retry = self.backoff_by_retry[previous["attempt"]] = new_histogram()
                    record_seconds(by_retry, delay)
            if len(self.retry_chains) < RETRY_CHAIN_LIMIT:
                self.retry_chains.append({"id": task_id, "task": name, "final_state": state, "attempts": attempts,
                                          "first_sent_at": sent_at, "finished_at": finished_at, "chain": chain})
        if self.on_completion is not None:
            try:
                self.on_completion(short_name(name) if name else "?", state, end_to_end)
            except Exception:  # noqa: BLE001 - a listener must not stop the ledger
                pass

    # --- end of run ----------------------------------------------------------------------------------------------
    def adopt_orphans(self) -> None:
        """Tasks that finished but whose SENT record never came (a producer stopped between publishing and
        reporting it) were submitted all the same: count them, with the send time their headers carried."""
        with self._lock:
            for task_id, early in list(self.early.items()):
                del self.early[task_id]
                self.counts["submitted"] += 1
                if early[3] is not None:
                    self._series(early[3]).submitted += 1
                self._terminal(*early)

    def mark_load_stopped(self, at: float | None = None) -> None:
        """The load stopped ``at`` (epoch seconds; now when not given): the drain starts."""
        self.poll(100_000)
        self.load_stopped_at = at or time.time()
        with self._lock:
            self.pending_at_end = len(self.pending)

    @property
    def outstanding(self) -> int:
        return len(self.pending)

    def drain(self, timeout_s: float, tick: Callable[[int], None] | None = None, settle_s: float = 0.5) -> bool:
        """Wait until every submitted task is terminal (and no record arrived for ``settle_s``) or the deadline."""
        deadline = time.monotonic() + timeout_s
        quiet_since = time.monotonic()
        while True:
            if self.poll(10_000):
                quiet_since = time.monotonic()
            if tick is not None:
                tick(self.outstanding)
            if self.outstanding == 0 and time.monotonic() - quiet_since >= settle_s:
                return True
            if time.monotonic() >= deadline:
                return self.outstanding == 0
            time.sleep(0.05)

    def reconcile(self, app, limit: int = 10_000) -> None:
        """Ask the result backend about tasks the ledger never saw finish (e.g. a worker killed after storing)."""
        for task_id in list(self.pending)[:limit]:
            try:
                state = app.AsyncResult(task_id).state
            except Exception:  # noqa: BLE001
                continue
            if state in ("SUCCESS", "FAILURE", "REVOKED"):
                name, _sent_at = self.pending[task_id]
                self.counts["reconciled"] += 1
                self._terminal(task_id, name, state, None, time.time(), 0, None, None, None)

    def _steady(self) -> dict | None:
        if not self.warmup_s or self.first_sent_at is None or self.load_stopped_at is None:
            return None
        window = self.load_stopped_at - (self.first_sent_at + self.warmup_s)
        if window <= 0:
            return None
        return {"warmup_s": self.warmup_s, "window_s": round(window, 3),
                "completed_per_s": round(self.steady_completed / window, 3),
                "end_to_end_ms": histogram_stats_ms(self.steady_end_to_end)}

    def summary(self, lost_ids_limit: int = 100) -> dict:
        with self._lock:
            c = self.counts
            lost = len(self.pending)
            # early records whose SENT never came: the task ran, so it was submitted (by a producer we could not see)
            tasks = {"submitted": c["submitted"], "succeeded": c["succeeded"], "failed": c["failed"],
                     "revoked": c["revoked"], "rejected": c["rejected"], "retried": c["retried"], "lost": lost,
                     "pending_at_end": self.pending_at_end if self.pending_at_end is not None else lost,
                     "duplicates": c["duplicates"], "reconciled": c["reconciled"]}
            span = None
            if self.first_sent_at is not None and self.last_finished_at is not None:
                span = max(1e-9, self.last_finished_at - self.first_sent_at)
            completed = tasks["succeeded"] + tasks["failed"]
            return {
                "tasks": tasks,
                "latency_ms": {phase: histogram_stats_ms(self.histograms[phase]) for phase in PHASES},
                "latency_ms_by_task": {name: histogram_stats_ms(h) for name, h in sorted(self.per_task.items())},
                "completed_per_s": round(completed / span, 3) if span else 0.0,
                "retries": {
                    "tasks_retried": self.tasks_retried,
                    "attempts": {str(k): v for k, v in sorted(self.attempts.items())},
                    "exhausted": self.exhausted,
                    "backoff_observed_s": {k: round(v / 1000, 3) for k, v in histogram_stats_ms(self.backoff).items()
                                           if k in ("p50", "p95", "max")},
                    "backoff_by_retry_s": {
                        str(k): {key: (round(v / 1000, 3) if key != "count" else v)
                                 for key, v in histogram_stats_ms(h).items() if key in ("count", "p50", "p95", "max")}
                        for k, h in sorted(self.backoff_by_retry.items())},
                    "first_publish_to_success_ms": histogram_stats_ms(self.first_publish_to_success),
                    "exceptions": dict(sorted(self.retry_exceptions.items())),
                    "chains": self.retry_chains[:50],
                },
                "lost_ids": list(self.pending)[:lost_ids_limit],
                "failed": list(self.failed_for_good),
                "steady": self._steady(),
                "timeseries": self.series.rows() if self.series else [],
                "load_stopped_s": round(self.load_stopped_at - self.series.start, 3)
                if self.series and self.load_stopped_at else None,
                "histograms": {phase: self.histograms[phase].encode().decode() for phase in REPORT_PHASES},
            }
