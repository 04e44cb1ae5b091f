"""The run recorder: consumes the ledger channel, follows every submitted task id to a terminal state, and keeps
phase latencies in HDR histograms. Memory is bounded by what is in flight, not by how many tasks ran: finished ids
leave the ledger (a bounded window of recent ones is kept to recognise redeliveries), histograms have a fixed size,
and the time series merges neighbouring buckets when it grows past ``MAX_BUCKETS``. Two records of every task are
kept up to a cap: its send time (``ARRIVALS_KEPT``, for the arrival process) and its final state
(``AUDITED_MAX``, for the result backend audit).
"""
from __future__ import annotations

import math
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

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
ARRIVALS_KEPT = 200_000  # send times kept for the arrival process (8 bytes each)
ARRIVAL_SLOT_S = 0.1  # peak-to-mean of the arrivals is taken per slot of this width
AUDITED_MAX = 100_000  # finished tasks kept (id, task, state, finish; ~180 bytes each) for the result backend audit
# Little's law over a finite window T holds up to the tasks straddling its two edges. In a steady state the tasks in
# the system at an instant hold λ·E[W²]/2 task-seconds of their time in it on either side (mean) with a variance of
# λ·E[W³]/3 (M/G/∞), so the edges move L/λW by E[W²]/(2·E[W]·T) at most on average and by a standard deviation of
# √(2·E[W³]/(3λ))/(T·E[W]); a few multi-second retry chains in a short window dominate both. The ratio may stray by
# this allowance, plus the mean edge, plus LITTLE_SIGMAS standard deviations (a healthy 8 s smoke run with its
# retry chains strays further about once in 1 700 runs, simulated).
LITTLE_TOLERANCE = 0.05
LITTLE_SIGMAS = 4
# a steady window whose backlog (tasks sent, not yet finished) grew by more than this share of the tasks it
# completed was saturated: the stack could not keep up, and its completion rate is the stack's capacity
SATURATED_GROWTH = 0.05


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


def _percentiles_ms(phase: str, hist: HdrHistogram) -> dict:
    """``<phase>_p50_ms`` and ``<phase>_p95_ms`` of a bucket's histogram (None without a sample)."""
    count = hist.get_total_count()
    return {f"{phase}_p{p}_ms": round(hist.get_value_at_percentile(p) / 1000, 3) if count else None for p in (50, 95)}


@dataclass
class Bucket:
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    retried: int = 0
    end_to_end: HdrHistogram = field(default_factory=lambda: new_histogram(SERIES_DIGITS, word_size=4))
    # queue wait and execution of the attempts that started in the bucket
    queue_wait: HdrHistogram = field(default_factory=lambda: new_histogram(SERIES_DIGITS, word_size=4))
    execution: HdrHistogram = field(default_factory=lambda: new_histogram(SERIES_DIGITS, word_size=4))
    # the broker's queue depth: the last sample taken in the bucket, and when it was taken (None: no sample)
    queue_depth: int | None = None
    queue_depth_at: float | None = None
    # for the exact time integral of tasks in the system: sums of send and finish times (seconds since the series
    # started) of the tasks sent / leaving in the bucket, and the ledger's end-to-end seconds of those leaving
    sent_offsets_s: float = 0.0
    left_offsets_s: float = 0.0
    left_end_to_end_s: float = 0.0
    left_timed: int = 0

    def merge(self, other: "Bucket") -> None:
        self.submitted += other.submitted
        self.completed += other.completed
        self.failed += other.failed
        self.retried += other.retried
        self.sent_offsets_s += other.sent_offsets_s
        self.left_offsets_s += other.left_offsets_s
        self.left_end_to_end_s += other.left_end_to_end_s
        self.left_timed += other.left_timed
        self.end_to_end.add(other.end_to_end)
        self.queue_wait.add(other.queue_wait)
        self.execution.add(other.execution)
        if other.queue_depth_at is not None:
            self.observe_queue_depth(other.queue_depth_at, other.queue_depth)

    def observe_queue_depth(self, at: float, depth: int) -> None:
        if self.queue_depth_at is None or at >= self.queue_depth_at:
            self.queue_depth, self.queue_depth_at = depth, at


@dataclass
class Workflow:
    """An open workflow: a root task and the tasks published under it (Celery's ``root_id``)."""
    root_name: str | None
    start: float | None  # the earliest send time of its tasks: the root's first publish once the root's is known
    tasks: int = 1       # the root counts when it is known or still to come
    open: int = 1        # its tasks not yet terminal
    last: float | None = None  # the latest finish of its tasks

    def root_sent(self, name: str | None, sent_at: float | None) -> None:
        self.root_name = self.root_name or name
        if sent_at is not None and (self.start is None or sent_at < self.start):
            self.start = sent_at


@dataclass
class WorkflowFigures:
    """The finished workflows of one root task name."""
    count: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # tasks in the workflow -> workflows
    end_to_end: HdrHistogram = field(default_factory=new_histogram)

    def add(self, tasks: int, end_to_end_s: float | None) -> None:
        self.count += 1
        self.sizes[tasks] = self.sizes.get(tasks, 0) + 1
        record_seconds(self.end_to_end, end_to_end_s)

    def merge(self, other: "WorkflowFigures") -> None:
        self.count += other.count
        for size, n in other.sizes.items():
            self.sizes[size] = self.sizes.get(size, 0) + n
        self.end_to_end.add(other.end_to_end)

    def stats(self) -> dict:
        tasks = sum(size * n for size, n in self.sizes.items())
        return {"count": self.count, "tasks_per_workflow": {str(k): v for k, v in sorted(self.sizes.items())},
                "tasks_mean": round(tasks / self.count, 3) if self.count else 0.0,
                "end_to_end_ms": histogram_stats_ms(self.end_to_end),
                "end_to_end_hdr": self.end_to_end.encode().decode()}

    @classmethod
    def from_stats(cls, stats: dict) -> "WorkflowFigures":
        """The figures back from a report's section (its encoded histogram), to merge reports' workflows."""
        return cls(count=stats["count"], sizes={int(k): n for k, n in stats["tasks_per_workflow"].items()},
                   end_to_end=HdrHistogram.decode(stats["end_to_end_hdr"]))


def merge_workflow_summaries(summaries: list[dict]) -> dict | None:
    """One ``workflows`` section for several runs' (a sweep's points): counts summed, histograms merged."""
    if not summaries:
        return None
    by_root: dict[str, WorkflowFigures] = {}
    children: dict[str, int] = {}
    for summary in summaries:
        for name, stats in summary["by_root"].items():
            by_root.setdefault(name, WorkflowFigures()).merge(WorkflowFigures.from_stats(stats))
        for name, n in summary["children_by_task"].items():
            children[name] = children.get(name, 0) + n
    return workflow_section(by_root, sum(summary["unfinished"] for summary in summaries), children)


def workflow_section(by_root: dict[str, WorkflowFigures], unfinished: int, children_by_task: dict[str, int]) -> dict:
    """The report's ``workflows`` section: over all root task names, and per name."""
    total = WorkflowFigures()
    for figures in by_root.values():
        total.merge(figures)
    return {**total.stats(), "unfinished": unfinished,
            "by_root": {name: figures.stats() for name, figures in sorted(by_root.items())},
            "children_by_task": dict(sorted(children_by_task.items()))}


class TimeSeries:
    """Per-interval counts and end-to-end percentiles; interval doubles when there would be too many buckets."""

    def __init__(self, start: float, width_s: float = 1.0):
        self.start = start
        self.width = width_s
        self.buckets: dict[int, Bucket] = {}

    def offset(self, ts: float) -> float:
        return max(0.0, ts - self.start)

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

    def in_system_seconds(self) -> list[tuple[int, float]]:
        """Per bucket: tasks in the system at its start and their exact time integral over it (task-seconds),
        from the send and finish times. With n sent at offsets s_i and m leaving at f_j in bucket k (ending at
        e = (k + 1)·width): ∫N dt = N(start)·width + Σ(e − s_i) − Σ(e − f_j)."""
        out = []
        in_system = 0
        last = max(self.buckets) if self.buckets else -1
        for index in range(last + 1):
            b = self.buckets.get(index) or Bucket()
            end = (index + 1) * self.width
            left = b.completed + b.failed
            integral = (in_system * self.width + b.submitted * end - b.sent_offsets_s - left * end + b.left_offsets_s)
            out.append((in_system, max(0.0, integral)))
            in_system += b.submitted - left
        return out

    def rows(self) -> list[dict]:
        rows = []
        in_system = 0
        last = max(self.buckets) if self.buckets else -1
        integrals = self.in_system_seconds()
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
                "in_system_mean": round(integrals[index][1] / self.width, 3),
                "queue_depth": b.queue_depth,
                "end_to_end_p50_ms": round(b.end_to_end.get_value_at_percentile(50) / 1000, 3) if count else None,
                "end_to_end_p95_ms": round(b.end_to_end.get_value_at_percentile(95) / 1000, 3) if count else None,
                **_percentiles_ms("queue_wait", b.queue_wait), **_percentiles_ms("execution", b.execution),
            })
        return rows


def little_tolerance(moments: list, rate_per_s: float, window_s: float) -> float:
    """Allowed |L/λW - 1| over a window of window_s at rate_per_s, from the moments (count, ΣW, ΣW², ΣW³) of the
    times in the system: LITTLE_TOLERANCE + the mean edge E[W²]/(2·E[W]·T) + LITTLE_SIGMAS standard deviations of
    the two edges, √(2·E[W³]/(3λ))/(T·E[W])."""
    count, sum_w, sum_w2, sum_w3 = moments
    if not count or not sum_w or rate_per_s <= 0 or window_s <= 0:
        return LITTLE_TOLERANCE
    mean_w, mean_w2, mean_w3 = sum_w / count, sum_w2 / count, sum_w3 / count
    mean_edge = mean_w2 / (2 * mean_w * window_s)
    edge_sd = math.sqrt(2 * mean_w3 / (3 * rate_per_s)) / (window_s * mean_w)
    return LITTLE_TOLERANCE + mean_edge + LITTLE_SIGMAS * edge_sd


class Recorder:
    """Consumes the ledger channel of one run. ``on_completion(task, state, end_to_end_s)`` is called for each task
    that reaches a terminal state (Locust uses it to fire its ``end_to_end`` request events)."""

    def __init__(self, ledger_url: str, run_id: str, *, max_retries: int | Mapping[str, int | None] | None = None,
                 on_completion: Callable[[str, str, float | None], None] | None = None, warmup_s: float = 0.0):
        self.ledger_url = ledger_url
        self.key = ledger.channel_key(run_id)
        # a task that failed after this many retries used them up: one limit for every task, or each task's own
        # by its registered name (``stack.tasks.retry_limits``: a user's app declares its own)
        self.max_retries = max_retries
        self.on_completion = on_completion
        self.histograms = {phase: new_histogram() for phase in PHASES}
        self.per_task: dict[str, HdrHistogram] = {}
        self.per_task_states: dict[str, dict[str, int]] = {}    # task name (short_name) -> final state -> tasks
        self.per_worker_states: dict[str, dict[str, int]] = {}  # worker hostname -> attempt state -> attempts
        self.backoff = new_histogram()
        self.backoff_by_retry: dict[int, HdrHistogram] = {}  # retry number (1 = first retry) -> observed delay
        self.first_publish_to_success = new_histogram()
        self.counts = {"submitted": 0, "succeeded": 0, "failed": 0, "revoked": 0, "rejected": 0, "retried": 0,
                       "duplicates": 0, "reconciled": 0, "children": 0}
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
        # steady window: from the warm-up's end to the load's stop; its rate counts every task that finished in it
        # (whatever its send time) and its backlog is tasks sent and not yet finished at either end
        self.warmup_s = warmup_s
        self.steady_end_to_end = new_histogram()
        self.steady_completed = 0
        self.sent_before_steady = 0
        self.left_before_steady = 0
        self.arrival_times = array("d")  # the first ARRIVALS_KEPT send times
        # count, ΣW, ΣW², ΣW³ of every finished task's time in the system (the drain's included: Little's tolerance
        # needs the whole distribution, long retry chains that outlive the window above all)
        self.in_system_moments = [0, 0.0, 0.0, 0.0]
        self.terminal_log: list[tuple[str, str, str, float]] = []  # (id, task, state, finished_at) for the audit
        # workflows (tasks that tasks published: chain, group, chord, .delay() in a task), only while open: root id ->
        # its workflow, and each of its tasks not yet terminal -> root id. Finished ones leave their figures below.
        self.workflows: dict[str, Workflow] = {}
        self.members: dict[str, str] = {}
        self.children_by_task: dict[str, int] = {}  # task name -> tasks of it another task published
        self.workflow_by_root: dict[str, WorkflowFigures] = {}  # root task name -> its finished workflows
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
            self._sent(*record[1:8])
        elif kind == ledger.ATTEMPT:
            self._attempt(*record[1:16])

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

    def _sent(self, task_id, name, sent_at, publish_s, intended_at=None, parent_id=None, root_id=None) -> None:
        self.counts["submitted"] += 1
        if self.first_sent_at is None or sent_at < self.first_sent_at:
            self.first_sent_at = sent_at
        record_seconds(self.histograms["publish"], publish_s)
        self._count_sent(sent_at)
        if root_id is not None:
            if task_id not in self.members:  # else it joined when its result beat this record
                self._join(task_id, name, sent_at, parent_id, root_id)
        elif task_id in self.workflows:  # a root whose tasks came first: its send time starts the workflow
            self.workflows[task_id].root_sent(name, sent_at)
        early = self.early.pop(task_id, None)
        if early is not None:
            self._terminal(*early)
        else:
            self.pending[task_id] = (name, sent_at)

    def _join(self, task_id, name, sent_at, parent_id, root_id) -> None:
        """``task_id`` belongs to the workflow of ``root_id`` (a child when ``parent_id``, another task published it).
        The root is usually in flight (it publishes its first tasks while it runs); its own records can come after
        its tasks' (other processes write them), and then it still counts as an open task of the workflow."""
        workflow = self.workflows.get(root_id)
        if workflow is None:
            root = self.pending.get(root_id)
            early = self.early.get(root_id) if root is None else None
            if root is not None:
                workflow = Workflow(root[0], root[1])
            elif early is not None:  # finished, its SENT yet to come: it ends when that comes (or is adopted)
                workflow = Workflow(early[1], early[3])
            elif root_id in self.recent_terminal:  # finished and accounted before this task was seen
                workflow = Workflow(None, None, open=0)
            else:  # its records are yet to come
                workflow = Workflow(None, None)
            self.workflows[root_id] = workflow
        workflow.tasks += 1
        workflow.open += 1
        if sent_at is not None and (workflow.start is None or sent_at < workflow.start):
            workflow.start = sent_at
        self.members[task_id] = root_id
        if parent_id is not None:
            self.counts["children"] += 1
            short = short_name(name) if name else "?"
            self.children_by_task[short] = self.children_by_task.get(short, 0) + 1

    def _workflow_task_done(self, root_id: str, finished_at: float) -> None:
        workflow = self.workflows.get(root_id)
        if workflow is None:  # a task given a root_id of its own making, already closed as a root: nothing to add
            return
        workflow.open -= 1
        if workflow.last is None or finished_at > workflow.last:
            workflow.last = finished_at
        if workflow.open > 0:
            return
        del self.workflows[root_id]
        name = short_name(workflow.root_name) if workflow.root_name else "?"
        figures = self.workflow_by_root.get(name)
        if figures is None:
            figures = self.workflow_by_root[name] = WorkflowFigures()
        end_to_end = max(0.0, workflow.last - workflow.start) if workflow.start is not None else None
        figures.add(workflow.tasks, end_to_end)

    def workflow_summary(self) -> dict | None:
        """Workflows of more than one task (None when no task published another): how many finished, their tasks,
        first publish to last finish, over all and per root task name; tasks other tasks published, per name."""
        if not self.workflow_by_root and not self.workflows:
            return None
        return workflow_section(self.workflow_by_root, len(self.workflows), self.children_by_task)

    def _count_sent(self, sent_at: float) -> None:
        bucket = self._series(sent_at)
        bucket.submitted += 1
        bucket.sent_offsets_s += self.series.offset(sent_at)
        if len(self.arrival_times) < ARRIVALS_KEPT:
            self.arrival_times.append(sent_at)
        if self.warmup_s and self.first_sent_at is not None and sent_at < self.first_sent_at + self.warmup_s:
            self.sent_before_steady += 1

    def _attempt(self, task_id, name, state, sent_at, attempt_sent_at, eta, started_at, body_done_at,
                 finished_at, retries, exc_type, intended_at=None, hostname=None, parent_id=None,
                 root_id=None) -> None:
        if started_at is not None:
            queued_since = max(attempt_sent_at or sent_at or started_at, eta or 0)
            queue_wait_s = max(0.0, started_at - queued_since)
            record_seconds(self.histograms["queue_wait"], queue_wait_s)
            started_bucket = self._series(started_at)
            record_seconds(started_bucket.queue_wait, queue_wait_s)
            if body_done_at is not None:
                record_seconds(self.histograms["execution"], max(0.0, body_done_at - started_at))
                record_seconds(started_bucket.execution, max(0.0, body_done_at - started_at))
                record_seconds(self.histograms["result_store"], max(0.0, finished_at - body_done_at))
        if hostname and (state == "RETRY" or state in ledger.TERMINAL_STATES):
            states = self.per_worker_states.setdefault(hostname, {})
            states[state] = states.get(state, 0) + 1
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
            if root_id is not None and task_id not in self.members:  # it belongs to its workflow from now on
                self._join(task_id, name, sent_at or finished_at, parent_id, root_id)
            elif task_id in self.workflows:  # a root its tasks came before: its name and send time, in case its
                self.workflows[task_id].root_sent(name, sent_at)  # SENT never comes (adopted)

    def _terminal(self, task_id, name, state, sent_at, finished_at, retries, exc_type, intended_at,
                  final_attempt: dict | None = None) -> None:
        entry = self.pending.pop(task_id, None)
        if sent_at is None and entry is not None:
            sent_at = entry[1]
        root = self.members.pop(task_id, None)
        if root is None and task_id in self.workflows:
            root = task_id
        if root is not None:
            self._workflow_task_done(root, finished_at)
        self.recent_terminal[task_id] = None
        if len(self.recent_terminal) > RECENT_TERMINAL:
            self.recent_terminal.popitem(last=False)
        key = {"SUCCESS": "succeeded", "FAILURE": "failed", "REVOKED": "revoked", "REJECTED": "rejected"}[state]
        self.counts[key] += 1
        states = self.per_task_states.setdefault(short_name(name) if name else "?", {})
        states[state] = states.get(state, 0) + 1
        bucket = self._series(finished_at)
        bucket.left_offsets_s += self.series.offset(finished_at)
        if sent_at is not None:
            in_system_s = max(0.0, finished_at - sent_at)
            bucket.left_end_to_end_s += in_system_s
            bucket.left_timed += 1
            moments = self.in_system_moments
            moments[0] += 1
            moments[1] += in_system_s
            moments[2] += in_system_s * in_system_s
            moments[3] += in_system_s * in_system_s * in_system_s
        if len(self.terminal_log) < AUDITED_MAX:
            self.terminal_log.append((task_id, name, state, finished_at))
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
        if self.warmup_s and self.first_sent_at is not None:
            if finished_at < self.first_sent_at + self.warmup_s:
                self.left_before_steady += 1
            elif (self.load_stopped_at is None or finished_at <= self.load_stopped_at) and state in ("SUCCESS",
                                                                                                      "FAILURE"):
                self.steady_completed += 1
                record_seconds(self.steady_end_to_end, end_to_end)
        attempts = retries + 1
        self.attempts[attempts] = self.attempts.get(attempts, 0) + 1
        chain = self.retrying.pop(task_id, None)
        if retries:
            self.tasks_retried += 1
            limit = self.max_retries.get(name) if isinstance(self.max_retries, Mapping) else self.max_retries
            if state == "FAILURE" and limit is not None and retries >= limit:
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
                    self._count_sent(early[3])
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
                # the backend's read: an AsyncResult (Celery 5.5) may deadlock collecting another (see stack/api.py)
                state = app.backend.get_task_meta(task_id)["status"]
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
        backlog_start = max(0, self.sent_before_steady - self.left_before_steady)
        backlog_end = self.pending_at_end if self.pending_at_end is not None else len(self.pending)
        growth = backlog_end - backlog_start
        return {"warmup_s": self.warmup_s, "window_s": round(window, 3),
                "completed_per_s": round(self.steady_completed / window, 3),
                "completed": self.steady_completed,
                "backlog_start": backlog_start, "backlog_end": backlog_end,
                "backlog_growth_per_s": round(growth / window, 3),
                "saturated": growth > max(1, SATURATED_GROWTH * self.steady_completed),
                "end_to_end_ms": histogram_stats_ms(self.steady_end_to_end)}

    def _window(self) -> tuple[float, float] | None:
        """The load phase after the warm-up, as offsets on the time series' axis (None: no load stop yet, the
        whole series)."""
        if self.series is None or self.first_sent_at is None:
            return None
        start = self.series.offset(self.first_sent_at + self.warmup_s)
        last = max(self.series.buckets) + 1
        end = (self.series.offset(self.load_stopped_at) if self.load_stopped_at is not None
               else last * self.series.width)
        return start, end

    def littles_law(self) -> dict | None:
        """L = λW over whole buckets of the load phase (after the warm-up): L is the exact time average of tasks in
        the system (the integral of the ledger's send and finish times, not samples at bucket ends), λ the rate of
        tasks leaving in the window, W their mean end-to-end time by the ledger's send and finish times. Judged
        against the tolerance little_tolerance() states (the tasks straddling the window's edges), with the reason
        when it fails."""
        window = self._window()
        if window is None:
            return None
        width = self.series.width
        first = math.ceil(window[0] / width - 1e-9)
        last = math.floor(window[1] / width + 1e-9)  # exclusive
        integrals = self.series.in_system_seconds()
        last = min(last, len(integrals))
        if last - first < 1:
            return None
        span = (last - first) * width
        buckets = [self.series.buckets.get(i) or Bucket() for i in range(first, last)]
        left = sum(b.completed + b.failed for b in buckets)
        timed = sum(b.left_timed for b in buckets)
        if not left or not timed:
            return None
        observed = sum(integral for _, integral in integrals[first:last]) / span
        rate = left / span
        mean_w = sum(b.left_end_to_end_s for b in buckets) / timed
        predicted = rate * mean_w
        ratio_value = observed / predicted if predicted else None
        tolerance = little_tolerance(self.in_system_moments, rate, span)
        backlog_start = integrals[first][0]
        backlog_end = integrals[last][0] if last < len(integrals) else sum(
            b.submitted - b.completed - b.failed for b in self.series.buckets.values())
        within = ratio_value is not None and abs(ratio_value - 1) <= tolerance
        reason = None
        if not within:
            if abs(backlog_end - backlog_start) > SATURATED_GROWTH * left:
                reason = (f"not a steady state: tasks in the system went from {backlog_start} to {backlog_end} "
                          f"over the {span:g} s window, and L = λW holds only when the backlog neither grows nor "
                          "shrinks")
            elif ratio_value is None:
                reason = "no task left the system in the window"
            else:
                reason = (f"the ledger's time integral of tasks in the system ({observed:.3f}) and its completion "
                          f"rate × mean end-to-end time ({predicted:.3f}) disagree by more than the tolerance: "
                          "records lost or duplicated, or the clocks of the processes differ")
        return {"arrival_rate_per_s": round(rate, 3), "mean_end_to_end_s": round(mean_w, 4),
                "predicted_in_system": round(predicted, 3), "observed_in_system": round(observed, 3),
                "ratio": round(ratio_value, 3) if ratio_value is not None else None,
                "window_start_s": round(first * width, 3), "window_s": round(span, 3),
                "tolerance": round(tolerance, 4), "within_tolerance": within, "reason": reason}

    def arrival_process(self) -> dict | None:
        """How the sends came: the coefficient of variation of the gaps between consecutive sends (1 for Poisson
        arrivals, 0 for a perfectly even stream, above 1 when they come in bursts) and the peak-to-mean of sends
        per ARRIVAL_SLOT_S slot, over the load phase after the warm-up."""
        import numpy as np

        if self.first_sent_at is None:
            return None
        times = np.sort(np.asarray(self.arrival_times, dtype=float))
        start = self.first_sent_at + self.warmup_s
        end = self.load_stopped_at if self.load_stopped_at is not None else float(times[-1]) if len(times) else start
        times = times[(times >= start) & (times <= end)]
        slots = int((end - start) / ARRIVAL_SLOT_S)
        if len(times) < 3 or slots < 1:
            return None
        gaps = np.diff(times)
        counts, _ = np.histogram(times, bins=slots, range=(start, start + slots * ARRIVAL_SLOT_S))
        mean_count = float(counts.mean())
        return {"sends": int(len(times)), "window_s": round(end - start, 3),
                "interarrival_mean_ms": round(float(gaps.mean()) * 1000, 4),
                "interarrival_cv": round(float(gaps.std() / gaps.mean()), 3) if gaps.mean() > 0 else None,
                "slot_s": ARRIVAL_SLOT_S, "peak_per_slot": int(counts.max()),
                "mean_per_slot": round(mean_count, 3),
                "peak_to_mean": round(float(counts.max()) / mean_count, 3) if mean_count else None,
                "truncated": len(self.arrival_times) >= ARRIVALS_KEPT}

    def summary(self, lost_ids_limit: int = 100) -> dict:
        with self._lock:
            c = self.counts
            lost = len(self.pending)
            # early records whose SENT never came: the task ran, so it was submitted (by a producer we could not see)
            tasks = {"submitted": c["submitted"], "succeeded": c["succeeded"], "failed": c["failed"],
                     "revoked": c["revoked"], "rejected": c["rejected"], "retried": c["retried"], "lost": lost,
                     "pending_at_end": self.pending_at_end if self.pending_at_end is not None else lost,
                     "duplicates": c["duplicates"], "reconciled": c["reconciled"], "children": c["children"]}
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
                "workflows": self.workflow_summary(),
                "lost_ids": list(self.pending)[:lost_ids_limit],
                "failed": list(self.failed_for_good),
                "steady": self._steady(),
                "littles_law": self.littles_law(),
                "arrivals": self.arrival_process(),
                "timeseries": self.series.rows() if self.series else [],
                "load_stopped_s": round(self.load_stopped_at - self.series.start, 3)
                if self.series and self.load_stopped_at else None,
                "histograms": {phase: self.histograms[phase].encode().decode() for phase in REPORT_PHASES},
            }
