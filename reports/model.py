"""``report.json`` as a typed model: every section and field it may hold, each figure with its unit.

``reports/schema/report.schema.json`` is generated from this model (``python -m loadlab.reports.model`` writes it;
a test fails when the committed file differs). No section admits a field it does not declare. Gates read a figure's
unit from here (``unit_of``), not from its name.

Units are the field's ``unit`` in the schema: ``ms``, ``us``, ``s``, ``/s`` (a rate), ``bytes``, ``count`` and
``ratio``; a field without one is not a measured figure (a name, a flag, a time stamp).
"""
from __future__ import annotations

import json
import sys
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loadlab.reports.backend_audit import LISTED
from loadlab.reports.recorder import ARRIVALS_KEPT, AUDITED_MAX, LITTLE_SIGMAS, LITTLE_TOLERANCE, SATURATED_GROWTH
from loadlab.reports.report import SCHEMA_PATH, SCHEMA_VERSION

UNITS = ("ms", "us", "s", "/s", "bytes", "count", "ratio")


def _figure(unit: str, description: str | None = None, **kwargs) -> Any:
    return Field(json_schema_extra={"unit": unit}, description=description, **kwargs)


def ms(description: str | None = None, **kwargs) -> Any:
    return _figure("ms", description, ge=0, **kwargs)


def seconds(description: str | None = None, **kwargs) -> Any:
    return _figure("s", description, **kwargs)


def per_s(description: str | None = None, **kwargs) -> Any:
    return _figure("/s", description, ge=0, **kwargs)


def count(description: str | None = None, **kwargs) -> Any:
    return _figure("count", description, ge=0, **kwargs)


def ratio(description: str | None = None, **kwargs) -> Any:
    return _figure("ratio", description, **kwargs)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- latency -----------------------------------------------------------------------------------------------------
class LatencyMs(Section):
    """Percentiles of one phase from its HDR histogram, in milliseconds."""
    count: int = count()
    mean: float = ms()
    p50: float = ms()
    p90: float = ms()
    p95: float = ms()
    p99: float = ms()
    max: float = ms()


class Phases(Section):
    publish: LatencyMs = Field(description="The producer's apply_async/send_task until the broker took it")
    queue_wait: LatencyMs = Field(description="Sent (or due, for a countdown) until a worker started it")
    execution: LatencyMs = Field(description="The task body")
    end_to_end: LatencyMs = Field(description="First send until the result was stored")


class LatencyExtra(Section):
    result_store: LatencyMs
    end_to_end_by_task: dict[str, LatencyMs] = Field(description="End to end per task name")


# --- counts and rates --------------------------------------------------------------------------------------------
class RunSettings(Section):
    """The settings that shape the figures (settings.json has them all)."""
    broker: str | None
    backend: str | None
    serializer: str | None
    compression: str | None
    pool: str | None
    concurrency: int | None
    workers: int | None
    prefetch_multiplier: int | None
    acks_late: bool | None
    tracing: str | None
    metrics: str | None


class Tasks(Section):
    submitted: int = count()
    succeeded: int = count()
    failed: int = count("Tasks that failed for good")
    revoked: int = count(default=0)
    rejected: int = count(default=0)
    retried: int = count("Retries (attempts that ended in RETRY)")
    lost: int = count("Tasks not terminal when the drain ended")
    pending_at_end: int = count("Tasks not terminal when the load stopped")
    duplicates: int = count("Tasks that ran again after they had finished (redeliveries)", default=0)
    reconciled: int = count("Tasks the result backend reported finished after the drain", default=0)
    children: int = count("Of the submitted tasks, those another task published (a chain's later links, a group or "
                          "chord a task started, .delay() in a task): counted once, like any other", default=0)


class Throughput(Section):
    submitted_per_s: float = per_s()
    completed_per_s: float = per_s("Succeeded and failed tasks per second, first send to last finish")


class LocustRequest(Section):
    """One row of Locust's own per-request table."""
    type: str
    name: str
    requests: int = count()
    failures: int = count()
    median_ms: float = ms()
    p95_ms: float = ms()
    p99_ms: float = ms()
    max_ms: float = ms()
    rps: float = per_s()


class Locust(Section):
    requests: int = count("Locust's requests (publishes, HTTP calls and end_to_end events)")
    failures: int = count()
    rps: float = per_s()
    request_failures: int | None = count("Failures of publishes and HTTP calls (end_to_end events left out: their "
                                         "failures are tasks that failed)", default=None)
    by_request: list[LocustRequest] | None = None


# --- retries -----------------------------------------------------------------------------------------------------
class BackoffSeconds(Section):
    p50: float = seconds(ge=0)
    p95: float = seconds(ge=0)
    max: float = seconds(ge=0)


class BackoffOfRetry(BackoffSeconds):
    count: int = count()


class Attempt(Section):
    attempt: int = count()
    state: str
    exception: str | None
    started_at: float | None = Field(description="Epoch seconds")
    failed_at: float | None = Field(description="Epoch seconds")
    eta: str | float | None


class RetryChain(Section):
    id: str
    task: str
    final_state: str
    attempts: int = count()
    first_sent_at: float | None = Field(description="Epoch seconds")
    finished_at: float | None = Field(description="Epoch seconds")
    chain: list[Attempt]


class RetryPolicy(Section):
    max_retries: int | None = None
    backoff_factor_s: float | None = seconds(default=None)
    backoff_max_s: float | None = seconds(default=None)
    jitter: bool | None = None
    delay_s: float | None = seconds("Countdown of every retry when there is no backoff (the task's "
                                    "default_retry_delay)", default=None)


class Retries(Section):
    tasks_retried: int = count()
    attempts: dict[str, int] = _figure("count", "Attempts a task took -> tasks")
    exhausted: int = count("Tasks that used up their retries")
    backoff_observed_s: BackoffSeconds
    backoff_by_retry_s: dict[str, BackoffOfRetry] | None = None
    first_publish_to_success_ms: LatencyMs | None = None
    exceptions: dict[str, int] | None = _figure("count", "Exception type of a retried attempt -> attempts",
                                                default=None)
    chains: list[RetryChain] | None = None
    policy: RetryPolicy = Field(description="The retry policy of the run's task that retries by itself (autoretry_for) "
                                "when there is one such task (the reference mix's flaky); empty when there are "
                                "several (see policies)")
    policies: dict[str, RetryPolicy] | None = Field(None, description="Each task of the app that retries by itself "
                                                    "(autoretry_for), by registered name")


# --- serialization -----------------------------------------------------------------------------------------------
class MicrosecondPercentiles(Section):
    p50: float = _figure("us", ge=0)
    p95: float = _figure("us", ge=0)


class SerializationRow(Section):
    serializer: str
    compression: str
    shape: str | None = None
    payload_bytes: int = _figure("bytes", ge=0)
    wire_bytes: int = _figure("bytes", ge=0)
    compression_ratio: float = ratio(default=1.0)
    encode_us: MicrosecondPercentiles
    decode_us: MicrosecondPercentiles


class CodecTotals(Section):
    count: int = count()
    seconds: float = seconds(ge=0)
    bytes: int = _figure("bytes", ge=0)


Directions = dict[Literal["encode", "decode"], CodecTotals]


class SerializationMeasured(Section):
    by_serializer: dict[str, Directions]
    by_process: dict[str, dict[str, Directions]]


class InbandRow(Section):
    serializer: str
    payload_bytes: int = _figure("bytes", ge=0)
    shape: str
    completed_per_s: float = per_s()
    end_to_end_p50_ms: float = ms()
    end_to_end_p95_ms: float = ms()
    end_to_end_mean_ms: float = ms()
    serialization_ms_per_task: float | None = ms()
    encodes_per_task: float | None = ratio(ge=0)
    decodes_per_task: float | None = ratio(ge=0)
    message_bytes_per_task: float | None = _figure("bytes", ge=0)
    serialization_share: float | None = ratio("Share of the mean end-to-end time spent serializing")
    serialization_share_source: Literal["measured", "offline_estimate"] | None
    metrics: str | None
    run_dir: str


# --- scaling -----------------------------------------------------------------------------------------------------
class ScalingPoint(Section):
    workers: int = count()
    concurrency: int = count()
    pool: str
    prefetch_multiplier: int = count()
    n: int = count("workers × concurrency")
    completed_per_s: float = per_s("The steady window's completion rate (the whole run's without a warm-up)")
    backlog_growth_per_s: float | None = _figure("/s", "Growth of the backlog in the steady window", default=None)
    saturated: bool | None = Field(None, description="The backlog grew: completed_per_s is the point's capacity")
    p95_ms: float = ms()
    lost: int = count()
    run_dir: str


class Usl(Section):
    lambda_: float | None = Field(alias="lambda", description="Throughput of one unit (tasks/s)",
                                  json_schema_extra={"unit": "/s"})
    sigma: float | None = ratio("Contention")
    kappa: float | None = ratio("Coherency")
    n_peak: float | None = count("Units at the peak of the fitted curve")
    r2: float | None = ratio()

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Prediction(Section):
    n: int = count()
    completed_per_s: float = per_s()
    prediction: bool


class Scaling(Section):
    swept: dict[str, list[int | str]] | None = Field(None, description="Each swept setting -> its values")
    points: list[ScalingPoint]
    usl: Usl | None
    usl_note: str | None = None
    knee_n: float | None = count(default=None)
    predictions: list[Prediction] | None = None


# --- over time ---------------------------------------------------------------------------------------------------
class TimeseriesRow(Section):
    t_s: float = seconds("Start of the bucket, seconds since the first task was sent", ge=0)
    width_s: float = seconds(gt=0)
    submitted_per_s: float = per_s()
    completed_per_s: float = per_s()
    failed_per_s: float = per_s()
    retried_per_s: float = per_s()
    in_system: int = count("From the task ledger: tasks sent and not yet terminal at the end of the bucket")
    in_system_mean: float | None = count("From the task ledger: the time average of tasks in the system over the "
                                         "bucket (exact, from send and finish times)", default=None)
    queue_depth: int | None = count("From the broker: ready messages in the run's queue (the bucket's last sample)")
    end_to_end_p50_ms: float | None = ms()
    end_to_end_p95_ms: float | None = ms()
    queue_wait_p50_ms: float | None = ms("Of the attempts that started in the bucket", default=None)
    queue_wait_p95_ms: float | None = ms("Of the attempts that started in the bucket", default=None)
    execution_p50_ms: float | None = ms("Of the attempts that started in the bucket", default=None)
    execution_p95_ms: float | None = ms("Of the attempts that started in the bucket", default=None)


class QueueDepthSampling(Section):
    """How the timeseries' queue_depth was sampled."""
    queue: str
    transport: str | None = Field(description="kombu driver type: redis, amqp, ...")
    source: str | None = None
    interval_s: float = seconds(gt=0)
    statistic: Literal["last"] = Field(description="Which sample of a bucket its queue_depth is")
    samples: int = count()
    errors: int = count("Broker polls that failed (the next one reconnects)")
    peak: int | None = count()
    last: int | None = count()
    last_error: str | None = None


class Steady(Section):
    warmup_s: float = seconds(ge=0)
    window_s: float = seconds(gt=0)
    completed_per_s: float = per_s("Tasks that finished (succeeded or failed) in the window, whatever their send "
                                   "time, per second")
    completed: int | None = count("Tasks that finished in the window", default=None)
    backlog_start: int | None = count("Tasks sent and not yet finished when the window started", default=None)
    backlog_end: int | None = count("Tasks sent and not yet finished when the load stopped", default=None)
    backlog_growth_per_s: float | None = _figure("/s", "(backlog_end - backlog_start) / window_s", default=None)
    saturated: bool | None = Field(None, description=f"The backlog grew by more than {SATURATED_GROWTH:.0%} of the "
                                                     "tasks the window completed: the stack did not keep up, its rate "
                                                     "is its capacity")
    end_to_end_ms: LatencyMs = Field(description="Tasks that finished in the window")


class LittlesLaw(Section):
    """L = λW over whole time-series buckets of the load phase after the warm-up."""
    arrival_rate_per_s: float = per_s("λ: tasks that left the system in the window, per second")
    mean_end_to_end_s: float = seconds("W: their mean time in the system, by the ledger's send and finish times",
                                       ge=0)
    predicted_in_system: float = count("λW")
    observed_in_system: float = count("L: the time average of tasks in the system over the window, integrated from "
                                      "the ledger's send and finish times")
    ratio: float | None = ratio("observed / predicted")
    window_start_s: float | None = seconds("Start of the window on the time series' axis", default=None)
    window_s: float | None = seconds("T: the window's length", default=None)
    tolerance: float | None = _figure("ratio", f"Allowed |ratio - 1|: {LITTLE_TOLERANCE:.0%}, plus what the tasks straddling "
                                    "the window's two edges move the ratio by in a steady state, on average "
                                    f"(E[W²]/(2·E[W]·T)) and {LITTLE_SIGMAS} standard deviations (√(2·E[W³]/(3λ))/"
                                    "(T·E[W])), W over every finished task", default=None)
    within_tolerance: bool | None = None
    reason: str | None = Field(None, description="Why the ratio is outside the tolerance")


class Arrivals(Section):
    """The arrival process: how the tasks were sent, over the load phase after the warm-up."""
    sends: int = count()
    window_s: float = seconds(ge=0)
    interarrival_mean_ms: float = ms()
    interarrival_cv: float | None = ratio("Coefficient of variation of the gaps between consecutive sends (1: "
                                          "Poisson, 0: evenly spaced, above 1: bursts)")
    slot_s: float = seconds(gt=0)
    peak_per_slot: int = count("Most sends in one slot")
    mean_per_slot: float = count("Mean sends per slot")
    peak_to_mean: float | None = ratio("peak_per_slot / mean_per_slot")
    truncated: bool = Field(description=f"Only the first {ARRIVALS_KEPT} sends were kept")


class WorkflowStats(Section):
    """Finished workflows: a root task and every task published under it (Celery's root_id), more than one task."""
    count: int = count("Workflows whose every task reached a terminal state")
    tasks_per_workflow: dict[str, int] = _figure("count", "Tasks in a workflow (the root included) -> workflows")
    tasks_mean: float = _figure("count", "Mean tasks per workflow, the root included", ge=0)
    end_to_end_ms: LatencyMs = Field(description="The root's first publish until the last of its workflow's tasks "
                                                 "finished (result stored)")
    end_to_end_hdr: str | None = Field(None, description="end_to_end_ms's HDR histogram, encoded (merged by sweeps)")


class Workflows(WorkflowStats):
    """Tasks that started other tasks (chain, group, chord, .delay() in a task), over all roots."""
    unfinished: int = count("Workflows with a task not terminal when the report was made (lost, or its root's "
                            "records never came)")
    by_root: dict[str, WorkflowStats] = Field(description="Per root task name")
    children_by_task: dict[str, int] = _figure("count", "Task name -> its tasks that another task published")


class AuditedTask(Section):
    id: str
    task: str | None
    ledger_state: str
    stored_state: str | None = Field(description="None: the backend has no result for the task")
    kind: Literal["retry_after_success", "missing", "expired", "state_differs"]


class BackendAuditKinds(Section):
    retry_after_success: int = count("The ledger saw SUCCESS; the backend stores RETRY")
    missing: int = count("No stored result, within result_expires")
    expired: int = count("No stored result, past result_expires")
    state_differs: int = count("Another stored state than the ledger's")


class BackendAudit(Section):
    """Each finished task's state in the result backend after the drain, against the ledger's."""
    audited: int = count("Tasks read back (tasks with ignore_result are left out)")
    skipped_ignore_result: int = count()
    matching: int = count()
    mismatches: int = count()
    by_kind: BackendAuditKinds
    tasks: list[AuditedTask] = Field(description=f"The first {LISTED} mismatching tasks")
    truncated: bool = Field(description=f"Only the first {AUDITED_MAX} finished tasks were audited")
    error: str | None = Field(None, description="Why the backend could not be read")


# --- outcome -----------------------------------------------------------------------------------------------------
class Drain(Section):
    completed: bool
    lost_ids: list[str]


class FailedTask(Section):
    """A task that failed for good (its last attempt ended in FAILURE)."""
    id: str
    task: str | None
    exception: str | None = Field(description="The exception type of the last attempt")
    attempts: int = count()
    finished_at: float | None = Field(description="Epoch seconds")


class Verdict(Section):
    status: Literal["pass", "warn", "fail"]
    problems: list[str]
    notes: list[str] = Field([], description="What was accounted and is not a problem of the run: the reference "
                             "mix's designed failures, Celery's RETRY-after-SUCCESS race in the result backend")
    ledger_status: Literal["pass", "warn", "fail"] | None = Field(
        None, description="The verdict of the ledger alone, before gates")


class GateEntry(Section):
    """The verdict of one check of one rule (``loadlab.reports.gates`` makes them)."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    rule: str
    metric: str
    value: float | None
    threshold: float
    passed: bool
    baseline: float | None = None
    message: str = ""

    def as_report_entry(self) -> dict[str, Any]:
        return self.model_dump()


class FaultRow(Section):
    fault: str
    at_s: float = seconds(ge=0)
    applied: bool
    detail: str
    recovered_s: float | None = seconds()
    expected_max_lost: int | None = count()
    expectation: str
    lost: int = count()
    lost_ids: list[str]
    as_expected: bool


class WorkerRestart(Section):
    worker: str
    exit_code: int | None
    at_s: float = seconds(ge=0)


class Chaos(Section):
    faults: list[FaultRow]
    lost_after_every_fault: int = count()
    duplicates: int = count()
    worker_restarts: list[WorkerRestart] = Field(default_factory=list)


class Interrupted(Section):
    """A run stopped by a signal: the report covers what ran."""
    signal: Literal["SIGINT", "SIGTERM", "SIGHUP"]
    during: Literal["load", "drain"]
    at_s: float = seconds("Seconds of load before it stopped", ge=0)
    load_duration_s: float = seconds("The load duration asked for", ge=0)
    drain_skipped: bool = Field(description="A second signal cut the drain short")


class UiSwarm(Section):
    swarm: int | None
    counted_from: str
    window_started_at: str
    user_classes: list[str]
    shape: str | None
    submitted_without_sent_record: int = count()


class AppSetting(Section):
    setting: str = Field(description="The Celery setting (its own name)")
    app: Any = Field(None, description="The app's own value (or Celery's default)")
    loadlab: Any = Field(None, description="The value loadlab set; null: left alone")
    effective: Any = Field(None, description="The value the run's processes used")
    by: str = Field(description="Who decided it: the loadlab flag, 'app' or 'Celery default'")


class ReplacedUrl(Section):
    app: str | None = Field(None, description="The app's own URL (password masked)")
    run: str | None = Field(None, description="The URL the run used instead")


class AppConfig(Section):
    """The user's app (--app) under loadlab: what loadlab set over its configuration and what it left alone."""
    app: str | None = Field(None, description="--app module:attr")
    settings: list[AppSetting]
    replaced: dict[str, ReplacedUrl] = Field(description="Celery URL setting -> the app's URL and the run's")
    contradicted: list[str] = Field(description="Each loadlab flag that overrode a value the app set itself")


# --- the report --------------------------------------------------------------------------------------------------
class Report(Section):
    """loadlab run report."""
    schema_version: Literal[1] = SCHEMA_VERSION
    scenario: str
    started_at: str = Field(json_schema_extra={"format": "date-time"})
    duration_s: float = seconds("Load duration (a sweep or in-band campaign: the sum of its runs')", ge=0)
    settings: RunSettings
    tasks: Tasks
    throughput: Throughput
    latency_ms: Phases
    latency_ms_extra: LatencyExtra | None = None
    retries: Retries
    serialization: list[SerializationRow]
    locust: Locust
    drain: Drain | None = None
    workflows: Workflows | None = Field(None, description="Present when a task published another")
    failed_tasks: list[FailedTask] | None = Field(None, description="Every task that failed for good (the first "
                                                                   "1000), with its exception and attempts")
    steady: Steady | None = None
    timeseries: list[TimeseriesRow] | None = Field(
        None, description="The run over time, at most 240 buckets of width_s seconds (1 s, doubled while the run "
                          "would need more), from the first task sent to the last finished")
    timeseries_load_stopped_s: float | None = seconds("When the load stopped, on the time series' axis", default=None)
    histograms_hdr: dict[str, str] | None = Field(None, description="Each phase's HDR histogram, encoded (merged by "
                                                                     "sweeps)")
    verdict: Verdict
    littles_law: LittlesLaw | None = None
    arrivals: Arrivals | None = None
    backend_audit: BackendAudit | None = None
    artefacts: dict[str, str] | None = Field(None, description="What else the run directory holds -> its path")
    queue_depth_sampling: QueueDepthSampling | None = None
    serialization_measured: SerializationMeasured | None = None
    serialization_inband: list[InbandRow] | None = None
    scaling: Scaling | None = None
    chaos: Chaos | None = None
    interrupted: Interrupted | None = None
    app_config: AppConfig | None = None
    ui: UiSwarm | None = None
    gates: list[GateEntry] | None = None


def schema() -> dict:
    generated = Report.model_json_schema(by_alias=True)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "loadlab/report.schema.json",
            "title": "loadlab run report", **{k: v for k, v in generated.items() if k != "title"}}


def schema_text() -> str:
    return json.dumps(schema(), indent=2) + "\n"


def _strip_optional(annotation):
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


def unit_of(path: tuple[str, ...] | list[str]) -> str | None:
    """The unit of the figure at ``path`` (``("latency_ms", "end_to_end", "p95")`` -> ``"ms"``), None for a path the
    model does not declare or a field that is not a figure. List indices and dict keys (task names, serializers) are
    walked through."""
    annotation: Any = Report
    info = None
    for part in path:
        annotation = _strip_optional(annotation)
        origin = typing.get_origin(annotation)
        if origin in (list, dict):  # this part is an index or a key
            annotation = typing.get_args(annotation)[-1]
            continue
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        info = next((f for name, f in annotation.model_fields.items() if part in (name, f.alias)), None)
        if info is None:
            return None
        annotation = info.annotation
    if info is None or typing.get_origin(_strip_optional(annotation)) in (list, dict):
        return None
    extra = info.json_schema_extra or {}
    return extra.get("unit") if isinstance(extra, dict) else None


def main(argv: list[str]) -> int:
    """``python -m loadlab.reports.model [write|check]``: write the schema file, or exit 1 when it is stale."""
    command = argv[0] if argv else "write"
    if command == "write":
        SCHEMA_PATH.write_text(schema_text())
        print(f"wrote {SCHEMA_PATH}")
        return 0
    if command == "check":
        if Path(SCHEMA_PATH).read_text() != schema_text():
            print(f"{SCHEMA_PATH} is stale; run python -m loadlab.reports.model write", file=sys.stderr)
            return 1
        return 0
    print("usage: python -m loadlab.reports.model [write|check]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
