"""Tracing: sampler per mode, traces.jsonl written safely by many processes, no span lost when pool children are
recycled after every task (while the worker's scrape stays cheap), and one API submit = one trace."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import httpx
import pytest
import redis

from loadlab.config.settings import Settings
from loadlab.exporters import celery_spans, otel_compat, traces_file, tracing
from loadlab.stack.supervisor import Stack
from tests.conftest import (
    MACHINE_REDIS,
    TEST_QUEUE_PREFIX,
    need_service,
    processes_mentioning,
    run_cli,
    unique,
    wait_until,
)
from tests.test_metrics import parse_prom, total

CONSUMER, PRODUCER, SERVER, CLIENT = 5, 4, 2, 3
RECYCLED = 100


@pytest.fixture
def fast_paths_on():
    """The fast path under test runs, whatever ``LOADLAB_OTEL_FAST_PATHS`` says for the rest of the run."""
    was = otel_compat.fast_paths()
    otel_compat.use_fast_paths(True)
    yield
    otel_compat.use_fast_paths(was)


def read_spans(path: Path) -> list[dict]:
    """Every span of traces.jsonl, with its service name; each line must be one complete OTLP JSON document."""
    spans = []
    if not path.exists():
        return spans
    for line in path.read_text().splitlines():
        doc = json.loads(line)
        (resource_spans,) = doc["resourceSpans"]
        service = next(a["value"]["stringValue"] for a in resource_spans["resource"]["attributes"]
                       if a["key"] == "service.name")
        (scope_spans,) = resource_spans["scopeSpans"]
        (span,) = scope_spans["spans"]
        span["service"] = service
        span["attrs"] = {a["key"]: next(iter(a["value"].values())) for a in span["attributes"]}
        spans.append(span)
    return spans


def test_sampler_follows_the_tracing_mode():
    sampled = tracing.sampler(Settings.build(tracing="sampled", trace_sample_ratio="0.25"))
    assert "ParentBased" in sampled.get_description() and "TraceIdRatioBased{0.25}" in sampled.get_description()
    assert "AlwaysOnSampler" in tracing.sampler(Settings.build(tracing="all")).get_description()


def test_processes_appending_to_one_traces_file_never_interleave_lines(tmp_path):
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    path = tmp_path / "traces.jsonl"
    exporter = traces_file.JsonLinesSpanExporter(path)
    provider = TracerProvider(resource=Resource.create({"service.name": "t"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    children = []
    for worker in range(4):
        pid = os.fork()
        if pid == 0:  # each child writes 200 spans with a large attribute, so a torn write would show
            try:
                for i in range(200):
                    with tracer.start_as_current_span(f"w{worker}") as span:
                        span.set_attribute("payload", "x" * 3000)
            finally:
                os._exit(0)
        children.append(pid)
    for pid in children:
        assert os.waitpid(pid, 0)[1] == 0
    spans = read_spans(path)
    assert Counter(s["name"] for s in spans) == {f"w{w}": 200 for w in range(4)}


@pytest.fixture(scope="module")
def traced_stack(tmp_path_factory):
    """One stack for the module: tracing every task, metrics on, pool children recycled after every task."""
    run_dir = tmp_path_factory.mktemp("traced") / unique("run")
    settings = Settings.build(run_id=unique(), run_dir=str(run_dir), tracing="all", metrics="on",
                              max_tasks_per_child="1", concurrency="2")
    stack = Stack(settings, run_dir, api=True).__enter__()
    try:
        yield stack
    finally:
        stack.stop()
        wait_until(lambda: not processes_mentioning(str(run_dir)), 15, 0.2, "the stack's processes to exit")


def _worker_endpoint(stack) -> dict:
    (path,) = (Path(stack.run_dir) / "ports").glob("w1.*.json")
    return json.loads(path.read_text())


def _scrape_seconds(url: str, times: int = 7) -> tuple[float, str]:
    durations = []
    for _ in range(times):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read().decode()
        durations.append(time.perf_counter() - started)
    return statistics.median(durations), body


def _run_noops(stack, count: int) -> list[str]:
    results = [stack.app.send_task("loadlab.noop") for _ in range(count)]
    for result in results:
        result.get(timeout=120)
    return [r.id for r in results]


def test_recycled_children_lose_no_span_and_the_scrape_stays_bounded(traced_stack):
    endpoint = _worker_endpoint(traced_stack)
    ids = _run_noops(traced_stack, 10)
    after_10, _ = _scrape_seconds(endpoint["url"])
    # ~0.2 s per recycled task on a 2-core machine (fork + Celery's child init): 120 keep the test short, and
    # with per-pid files they would already be 240+ files, a many-fold slower scrape
    ids += _run_noops(traced_stack, RECYCLED - 10)
    after_many, body = _scrape_seconds(endpoint["url"])

    # every task had a child of its own; the metric files are per pool slot (2) plus the MainProcess
    files = os.listdir(endpoint["multiprocess_dir"])
    assert len(files) <= 3 * (2 + 1), files
    assert after_many < 3 * after_10 + 0.02, (after_10, after_many)
    samples = parse_prom(body)
    assert total(samples, "celery_task_succeeded_total", task="loadlab.noop") == RECYCLED
    assert total(samples, "celery_task_runtime_seconds_count", task="loadlab.noop") == RECYCLED

    # every run span reached traces.jsonl although each child left right after its task (os._exit)
    traces = Path(traced_stack.run_dir) / tracing.TRACES_FILE

    def run_spans():
        return [s for s in read_spans(traces) if s["kind"] == CONSUMER and s["name"] == "run/loadlab.noop"]

    wait_until(lambda: len(run_spans()) >= RECYCLED, 30, 0.5, "a run span per task in traces.jsonl")
    spans = run_spans()
    assert len(spans) == RECYCLED
    assert {s["attrs"]["messaging.message.id"] for s in spans} == set(ids)


def test_one_api_submit_is_one_trace_through_api_publish_run_and_result_store(traced_stack):
    api = traced_stack.settings.api_url
    task_id = httpx.post(f"{api}/tasks/noop", json={}, timeout=10).json()["id"]
    wait_until(lambda: httpx.get(f"{api}/tasks/{task_id}", timeout=10).json()["state"] == "SUCCESS", 30, 0.1,
               "the task to succeed")
    traces = Path(traced_stack.run_dir) / tracing.TRACES_FILE

    def the_trace():
        spans = read_spans(traces)
        run = [s for s in spans if s["kind"] == CONSUMER and s["attrs"].get("messaging.message.id") == task_id]
        if not run:
            return None
        trace = [s for s in spans if s["traceId"] == run[0]["traceId"]]
        # the API's batch processor exports every few seconds: wait for its spans too
        return trace if any(s["kind"] == SERVER for s in trace) else None

    trace = wait_until(the_trace, 20, 0.25, "the API, publish and run spans of one trace")
    by_kind = {s["kind"]: s for s in trace}
    server, publish, run = by_kind[SERVER], by_kind[PRODUCER], by_kind[CONSUMER]
    assert (server["service"], server["name"]) == ("loadlab-api", "POST /tasks/{name}")
    assert (publish["service"], publish["name"]) == ("loadlab-api", "apply_async/loadlab.noop")
    assert (run["service"], run["name"]) == ("loadlab-worker", "run/loadlab.noop")
    assert publish["parentSpanId"] == server["spanId"] and run["parentSpanId"] == publish["spanId"]
    # the result store is a Redis span inside the run span
    stores = [s for s in trace if s["kind"] == CLIENT and s.get("parentSpanId") == run["spanId"]]
    assert stores and all(s["attrs"]["db.system"] == "redis" for s in stores)
    assert len({s["traceId"] for s in trace}) == 1


def test_write_through_processor_batches_flushes_idle_buffers_and_never_duplicates_across_fork(tmp_path):
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    path = tmp_path / "traces.jsonl"
    processor = traces_file.JsonLinesSpanProcessor(traces_file.JsonLinesSpanExporter(path))
    provider = TracerProvider(resource=Resource.create({"service.name": "t"}), shutdown_on_exit=False)
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("t")
    for i in range(processor.MAX_LINES):  # a full batch is written at once, by the thread that ended the span
        tracer.start_span(f"full{i}").end()
    assert len(read_spans(path)) == processor.MAX_LINES
    tracer.start_span("buffered").end()  # below the batch size: written by the timer once it is stale
    pid = os.fork()
    if pid == 0:  # a forked child ends its own span and flushes: the parent's buffered span is not its to write
        try:
            tracer.start_span("child").end()
            processor.force_flush()
        finally:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    names = wait_until(lambda: Counter(s["name"] for s in read_spans(path)) if len(read_spans(path)) ==
                       processor.MAX_LINES + 2 else None, timeout=5 * processor.MAX_DELAY_S, what="the idle flush")
    assert names["buffered"] == 1 and names["child"] == 1
    processor.shutdown()


def test_the_result_store_is_one_span_inside_the_run_span_on_a_sql_backend_too(tmp_path):
    run_dir = tmp_path / unique("run")
    settings = Settings.build(run_id=unique(), run_dir=str(run_dir), tracing="all", metrics="off",
                              backend=f"db+sqlite:///{tmp_path / 'results.sqlite'}", concurrency="1")
    with Stack(settings, run_dir, api=False) as stack:
        task_id = stack.app.send_task("loadlab.noop").id
        stack.app.AsyncResult(task_id).get(timeout=30)
        traces = run_dir / tracing.TRACES_FILE

        def spans_of_the_task():
            spans = [s for s in read_spans(traces) if s["attrs"].get("messaging.message.id") == task_id]
            return spans if {s["kind"] for s in spans} >= {CONSUMER, CLIENT} else None

        spans = wait_until(spans_of_the_task, 20, 0.25, "the run and result store spans in traces.jsonl")
    (run,) = [s for s in spans if s["kind"] == CONSUMER]
    (store,) = [s for s in spans if s["kind"] == CLIENT]
    assert store["name"] == "store_result/loadlab.noop" and store["parentSpanId"] == run["spanId"]
    assert (store["attrs"]["db.system"], store["attrs"]["celery.state"]) == ("sqlite", "SUCCESS")
    assert run["startTimeUnixNano"] <= store["startTimeUnixNano"] <= store["endTimeUnixNano"] <= run["endTimeUnixNano"]


PUBLISH_UNREGISTERED = """
import json, sys, time
from celery import signals
from loadlab.exporters import tracing
from loadlab.stack.app import make_app
from loadlab.config.settings import Settings

published_at = {}  # connected before the tracing: runs first, once the broker has the message


@signals.after_task_publish.connect(weak=False)
def _published(headers=None, **_):
    published_at[headers["id"]] = time.time_ns()


settings = Settings.build(tracing="all", metrics="off", run_dir=sys.argv[1], broker=sys.argv[2], queue=sys.argv[3])
app = make_app(settings)
for _ in range(2):
    app.send_task("elsewhere.not_registered_here")
tracing._state["provider"].force_flush()
print(json.dumps(published_at))
"""


def test_the_publish_span_of_a_task_this_process_does_not_register_covers_the_publish(tmp_path):
    # contrib Celery keeps no handle on such a span: it ended when before_task_publish returned, before the send
    need_service("Redis", "127.0.0.1", 6379)
    queue = unique(TEST_QUEUE_PREFIX)
    script = tmp_path / "publish.py"
    script.write_text(PUBLISH_UNREGISTERED)
    try:
        done = subprocess.run([sys.executable, str(script), str(tmp_path), f"{MACHINE_REDIS}/0", queue],
                              capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent)
        assert done.returncode == 0, done.stderr[-2000:]
    finally:
        redis.Redis.from_url(f"{MACHINE_REDIS}/0").delete(queue)
    published_at = json.loads(done.stdout.strip().splitlines()[-1])
    spans = read_spans(tmp_path / tracing.TRACES_FILE)
    assert [s["name"] for s in spans] == ["apply_async/elsewhere.not_registered_here"] * 2
    assert all("parentSpanId" not in s for s in spans)  # two root spans: neither nested under the other
    for span in spans:
        assert int(span["endTimeUnixNano"]) >= published_at[span["attrs"]["messaging.message.id"]]


def test_sampled_tracing_keeps_whole_traces_and_leaves_unsampled_tasks_without_spans(tmp_path):
    run_dir = tmp_path / unique("run")
    settings = Settings.build(run_id=unique(), run_dir=str(run_dir), tracing="sampled", trace_sample_ratio="0.5",
                              metrics="off", concurrency="2", retry_backoff_s="0", retry_max_retries="1")
    with Stack(settings, run_dir, api=True) as stack:
        api = stack.settings.api_url
        with httpx.Client(base_url=api, timeout=10) as client:
            ids = {client.post("/tasks/noop", json={}).json()["id"]: 1 for _ in range(40)}
            ids |= {client.post("/tasks/flaky", json={"p": 1.0}).json()["id"]: 2 for _ in range(20)}  # 2 attempts

            def all_finished():
                return all(client.get(f"/tasks/{i}").json()["state"] in ("SUCCESS", "FAILURE") for i in ids)

            wait_until(all_finished, 60, 0.25, "every task to finish")
        traces = run_dir / tracing.TRACES_FILE

        def spans_by_trace():
            by_trace: dict[str, list[dict]] = {}
            for span in read_spans(traces):
                by_trace.setdefault(span["traceId"], []).append(span)
            # status reads (GET) are traces of their own; each process flushes its spans within a second, so
            # wait for the API's and for a retry's publish (written by the child that ran the first attempt)
            submits = {t: spans for t, spans in by_trace.items() if any(s["kind"] == CONSUMER for s in spans)}

            def whole(spans):
                # every attempt of the task and its publish: a retry's spans may still be in another child's buffer
                # while the first attempt's are written, and then publishes and runs are 1 and 1 of 2
                runs = [s for s in spans if s["kind"] == CONSUMER]
                attempts = ids.get(runs[0]["attrs"].get("messaging.message.id"), 0)
                return (any(s["name"] == "POST /tasks/{name}" for s in spans) and len(runs) == attempts
                        and sum(s["kind"] == PRODUCER for s in spans) == attempts)

            complete = all(whole(spans) for spans in submits.values())
            return submits if submits and complete else None

        by_trace = wait_until(spans_by_trace, 20, 0.25, "the sampled traces, API spans included")
    sampled_ids = set()
    for spans in by_trace.values():
        (server,) = [s for s in spans if s["name"] == "POST /tasks/{name}"]
        runs = [s for s in spans if s["kind"] == CONSUMER]
        (task_id,) = {s["attrs"]["messaging.message.id"] for s in runs}
        sampled_ids.add(task_id)
        publishes = {s["spanId"]: s for s in spans if s["kind"] == PRODUCER}
        stores = [s for s in spans if s["kind"] == CLIENT and s["name"].startswith("store_result/")]
        # every attempt ran, was published (the API's publish, then the retry's from the worker) and stored its state
        assert len(runs) == len(stores) == len(publishes) == ids[task_id], spans
        assert all(run["parentSpanId"] in publishes for run in runs)
        if ids[task_id] == 2:  # contrib's retry and failure handlers found the run spans loadlab's lean path made
            by_state = {run["attrs"]["celery.state"]: run for run in runs}
            assert "celery.retry.reason" in by_state["RETRY"]["attrs"], runs
            assert by_state["FAILURE"]["status"]["code"] == 2, runs
        assert any(p["parentSpanId"] == server["spanId"] for p in publishes.values())
    # a ratio of 0.5 over 60 tasks: both sides are far from empty; an unsampled task left no span anywhere
    assert 6 <= len(sampled_ids) <= 54, len(sampled_ids)
    assert sampled_ids <= set(ids)


LOCUST_USERS_STARTING_TOGETHER = """
from gevent import monkey
monkey.patch_all()
import sys
import gevent
from celery import signals
from loadlab.loadtests.api import celery_client
from loadlab.exporters import task_signals
from loadlab.config.settings import Settings

settings = Settings.build(tracing="all", metrics="off", run_dir=sys.argv[1])
users = [gevent.spawn(celery_client, settings) for _ in range(8)]
gevent.joinall(users, raise_error=True)
# loadlab's hook on its one receiver (fast paths on) or contrib's own receiver (off): one set, not one per user
publish_handlers = [h for h in task_signals.hooks_of(signals.before_task_publish) if "publish_hook" in repr(h)]
publish_handlers += [r for r in signals.before_task_publish.receivers if "_trace_before_publish" in repr(r)]
print(len({id(user.value) for user in users}), len(publish_handlers))
"""


def test_locust_users_starting_together_share_one_app_and_one_set_of_publish_spans(tmp_path):
    # each app used to install the Celery instrumentation again: 8 users, 8 nested publish spans per task
    script = tmp_path / "users.py"
    script.write_text(LOCUST_USERS_STARTING_TOGETHER)
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    apps, publish_handlers = map(int, done.stdout.split())
    assert (apps, publish_handlers) == (1, 1)


def _otlp_reference_json(span) -> dict:
    """The span as the SDK's OTLP encoder makes it, turned into OTLP JSON's conventions (hex ids, int enums)."""
    import base64

    from google.protobuf.json_format import MessageToDict
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    request = MessageToDict(encode_spans([span]), use_integers_for_enums=True)
    (reference,) = request["resourceSpans"][0]["scopeSpans"][0]["spans"]
    for holder in [reference, *reference.get("links", [])]:
        for key in ("traceId", "spanId", "parentSpanId"):
            if key in holder:
                holder[key] = base64.b64decode(holder[key]).hex()
    reference.pop("flags", None)  # W3C flags of the span and its parent: not written to traces.jsonl
    for link in reference.get("links", []):
        link.pop("flags", None)
    reference["status"].setdefault("code", 0)
    return reference


def test_the_span_encoder_writes_what_the_sdks_otlp_encoder_means(tmp_path):
    # traces.jsonl is encoded by hand for speed: it must say what the SDK's own OTLP encoder says, span for span
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider(shutdown_on_exit=False)
    tracer = provider.get_tracer("t")
    parent = tracer.start_span("parent", kind=trace.SpanKind.PRODUCER,
                               attributes={"s": "a \"quoted\" café", "i": 7, "f": 0.25, "b": True, "zero": 0,
                                           "list": ["x", "y"], "ints": [1, 2]})
    parent.end()
    child = tracer.start_span("store_result/loadlab.noop", context=trace.set_span_in_context(parent),
                              kind=trace.SpanKind.CLIENT, links=[trace.Link(parent.get_span_context(), {"k": "v"})])
    child.add_event("retry", {"attempt": 2})
    child.set_status(trace.Status(trace.StatusCode.ERROR, "boom"))
    child.end()
    bare = tracer.start_span("bare")
    bare.end()
    # string attributes only, no events, links or status: a line from a template of the span's shape
    strings = {"messaging.message.id": "6b3c%s\"", "celery.task_name": "loadlab.noop", "100%": "é"}
    root = tracer.start_span("run/loadlab.noop", kind=trace.SpanKind.CONSUMER, attributes=strings)
    root.end()
    nested = tracer.start_span("apply_async/%d", context=trace.set_span_in_context(root), attributes=strings)
    nested.end()
    exporter = traces_file.JsonLinesSpanExporter(tmp_path / "traces.jsonl")
    for span in (parent, child, bare, root, nested, root):  # root again: from its template this time
        ours = _without_empty_lists(json.loads(traces_file.encode_span_json(span)))
        assert ours == _otlp_reference_json(span), span.name
        (line,) = exporter.line(span).splitlines()
        (resource_spans,) = json.loads(line)["resourceSpans"]
        (scope_spans,) = resource_spans["scopeSpans"]
        assert scope_spans["scope"]["name"] == "t" and resource_spans["resource"]["attributes"]
        assert _without_empty_lists(scope_spans["spans"]) == [ours], span.name
    assert len(traces_file._LINE_TEMPLATES) >= 2


def _without_empty_lists(value):
    """protobuf's JSON leaves out empty repeated fields; OTLP JSON may carry them as []."""
    if isinstance(value, dict):
        return {k: _without_empty_lists(v) for k, v in value.items() if v != []}
    if isinstance(value, list):
        return [_without_empty_lists(v) for v in value]
    return value


def _exported(limits=None, sampler=None):
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider(span_limits=limits or SpanLimits(), **({"sampler": sampler} if sampler else {}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("loadlab.test"), exporter


@pytest.mark.parametrize("max_length", [None, 4])
def test_the_run_span_started_without_start_span_is_the_span_start_span_makes(max_length, fast_paths_on):
    from opentelemetry import trace
    from opentelemetry.sdk.trace import SpanLimits

    parent = trace.SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=True,
                               trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED))
    parent_context = trace.set_span_in_context(trace.NonRecordingSpan(parent))
    attributes = {"messaging.message.id": "6b3c0c5e", "celery.retries": 2, "celery.task_name": "loadlab.noop"}
    spans = []
    for lean in (True, False):
        tracer, exporter = _exported(SpanLimits(max_span_attribute_length=max_length))
        start = otel_compat.started_spans(tracer)
        assert start is not None  # this SDK keeps the fields the lean path sets: the lean path is what runs
        span = (start("run/loadlab.noop", parent_context, trace.SpanKind.CONSUMER, dict(attributes)) if lean else
                tracer.start_span("run/loadlab.noop", parent_context, trace.SpanKind.CONSUMER, dict(attributes)))
        # what contrib's failure and retry handlers and a task's own code do to the run span
        span.set_attribute("celery.retry.reason", "boom")
        span.record_exception(ValueError("boom"))
        span.set_status(trace.Status(trace.StatusCode.ERROR, "boom"))
        span.end()
        (finished,) = exporter.get_finished_spans()
        spans.append(finished)
    lean, sdk = spans
    assert lean.context.trace_id == sdk.context.trace_id == parent.trace_id
    assert lean.context.span_id != sdk.context.span_id and lean.parent == sdk.parent == parent
    assert lean.context.trace_flags == sdk.context.trace_flags and lean.context.trace_flags.sampled
    assert (lean.name, lean.kind, lean.status.status_code, lean.status.description) == (
        sdk.name, sdk.kind, sdk.status.status_code, sdk.status.description)
    assert dict(lean.attributes) == dict(sdk.attributes)
    if max_length:
        assert lean.attributes["messaging.message.id"] == "6b3c"  # the limits apply as in the SDK's path
    assert [(e.name, e.attributes["exception.type"]) for e in lean.events] == [
        (e.name, e.attributes["exception.type"]) for e in sdk.events] == [("exception", "ValueError")]
    assert lean.resource == sdk.resource and lean.instrumentation_scope == sdk.instrumentation_scope
    assert lean.start_time <= lean.end_time


def _traces_file_tracer(path: Path, sampler):
    """A tracer whose only span processor is the traces.jsonl writer, as ``tracing.setup`` makes it."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    processor = traces_file.JsonLinesSpanProcessor(traces_file.JsonLinesSpanExporter(path))
    provider = TracerProvider(resource=Resource.create({"service.name": "t"}), sampler=sampler,
                              shutdown_on_exit=False)
    provider.add_span_processor(processor)
    return provider.get_tracer("loadlab.test"), processor


@pytest.mark.parametrize("mode", ["all", "sampled"])
def test_spans_written_straight_to_the_traces_file_are_the_lines_the_sdks_spans_give(tmp_path, mode, fast_paths_on):
    # run and store spans skip the SDK's ReadableSpan (and, under a sampled parent, the sampler's calls) on their way
    # to traces.jsonl: each line must say what the SDK's own span, ended through the processor, says
    from opentelemetry import trace
    from opentelemetry.sdk.trace import ReadableSpan

    tracer, processor = _traces_file_tracer(tmp_path / "traces.jsonl", tracing.sampler(Settings.build(tracing=mode)))
    write_span = traces_file.span_writer_for(tracer)
    start, finished = otel_compat.started_spans(tracer, write_span), otel_compat.finished_spans(tracer, write_span)
    assert write_span is not None and start.decides_sampled_remote
    parent = trace.SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=True,
                               trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED))
    parent_context = trace.set_span_in_context(trace.NonRecordingSpan(parent))
    attributes = {"messaging.message.id": "6b3c0c5e", "celery.retries": 2, "celery.task_name": "loadlab.noop"}
    made = {
        "direct": start("run/loadlab.noop", None, trace.SpanKind.CONSUMER, dict(attributes),
                        sampled_remote_parent=parent),
        "through the sampler": start("run/loadlab.noop", parent_context, trace.SpanKind.CONSUMER, dict(attributes)),
        "sdk": tracer.start_span("run/loadlab.noop", parent_context, trace.SpanKind.CONSUMER, dict(attributes))}
    assert type(made["direct"]) is type(made["through the sampler"]) is not type(made["sdk"])
    for name, span in made.items():
        span.set_attribute("celery.retry.reason", "boom")  # what contrib's handlers and a task's code may do
        span.add_event("retrying", {"attempt": 2})
        span.record_exception(ValueError("boom"))
        span.set_status(trace.Status(trace.StatusCode.ERROR, "boom"))
        span.set_string_attribute("celery.state", "FAILURE") if name != "sdk" else span.set_attribute(
            "celery.state", "FAILURE")
        span.end()
        span.end()  # a second end is ignored, as the SDK's
    store = trace.SpanContext(parent.trace_id, 0x1111111111111111, is_remote=False, trace_flags=parent.trace_flags)
    store_attributes = {"celery.action": "store_result", "celery.state": "SUCCESS", "db.system": "redis"}
    finished("store_result/loadlab.noop", store, parent, store_attributes, trace.SpanKind.CLIENT, 10, 20)
    processor.on_end(ReadableSpan(name="store_result/loadlab.noop", context=store, parent=parent,
                                  resource=tracer.resource, attributes=store_attributes, kind=trace.SpanKind.CLIENT,
                                  start_time=10, end_time=20, instrumentation_scope=tracer._instrumentation_scope))
    processor.force_flush()
    lines = (tmp_path / "traces.jsonl").read_text().splitlines()
    assert len(lines) == 5
    runs = [json.loads(line) for line in lines[:3]]
    for run in runs:  # ids and times are each span's own
        span = run["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
        assert span.pop("spanId") and int(span.pop("endTimeUnixNano")) >= int(span.pop("startTimeUnixNano"))
        for event in span["events"]:
            event.pop("timeUnixNano")
    assert runs[0] == runs[1] == runs[2]
    assert lines[3] == lines[4]
    (run,) = runs[0]["resourceSpans"][0]["scopeSpans"][0]["spans"]
    assert run["traceId"] == f"{parent.trace_id:032x}" and run["parentSpanId"] == f"{parent.span_id:016x}"
    assert [e["name"] for e in run["events"]] == ["retrying", "exception"] and run["status"]["code"] == 2


def test_a_task_s_traceparent_is_read_as_the_w3c_propagator_reads_it_or_left_to_it():
    from types import SimpleNamespace

    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    def w3c(traceparent):  # the SDK's own reading, what contrib's extract gives
        span = trace.get_current_span(TraceContextTextMapPropagator().extract({"traceparent": traceparent}))
        context = span.get_span_context()
        return context if context.is_valid else None

    valid = ["00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
             "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"]
    for traceparent in valid:
        ours = celery_spans._remote_parent(traceparent, SimpleNamespace(traceparent=traceparent))
        assert ours == w3c(traceparent) and type(ours) is trace.SpanContext and ours.is_valid and ours.is_remote
        assert ours.trace_state == w3c(traceparent).trace_state
    for traceparent in ["00-00000000000000000000000000000000-b7ad6b7169203331-01",  # zero ids
                        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
                        "00-0af7651916cd43dd8448eb211c80319cxb7ad6b7169203331-01",  # no dash
                        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333z-01",  # not hex
                        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1", None, 55]:
        assert celery_spans._remote_parent(traceparent, SimpleNamespace(traceparent=traceparent)) is None
        assert traceparent is None or not isinstance(traceparent, str) or w3c(traceparent) is None
    # a tracestate or baggage is contrib's to read
    assert celery_spans._remote_parent(valid[0], SimpleNamespace(traceparent=valid[0], tracestate="k=v")) is None


def test_the_lean_run_span_follows_the_sampler_for_a_root_it_drops(fast_paths_on):
    from opentelemetry import trace
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    tracer, exporter = _exported(sampler=ParentBased(TraceIdRatioBased(0.5)))
    start = otel_compat.started_spans(tracer)
    spans = [start("run/loadlab.noop", None, trace.SpanKind.CONSUMER, {}) for _ in range(400)]
    kept = [s for s in spans if s.is_recording()]
    assert 100 < len(kept) < 300  # the ratio sampler decided, per trace id
    assert all(s.get_span_context().trace_flags.sampled == s.is_recording() for s in spans)
    for span in spans:
        span.end()
    assert len(exporter.get_finished_spans()) == len(kept)


def test_bench_overhead_runs_the_stacks_side_by_side_and_prints_ratios_to_bare(run_dir):
    result = run_cli("bench", "overhead", "--rounds", "1", "--tasks", "100", "--paced-tasks", "10", "--out",
                     str(run_dir), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    names = {"bare", "metrics", "metrics+sampled", "all traced", "bare again"}
    for name in names:
        assert name in result.stdout
    # the targets, each with its verdict: one round shows no noise, so nothing is resolved
    assert ">= 0.97 not resolved" in result.stdout and ">= 0.90 not resolved" in result.stdout
    assert "A/A control" in result.stdout
    data = json.loads((run_dir / "bench.json").read_text())
    assert set(data["slices"]) == names
    for name, slices in data["slices"].items():
        assert [s["round"] for s in slices] == [1], name
        assert all(s["throughput_per_s"] > 0 and s["p50_ms"] > 0 and s["cpu_ms_per_task"] > 0 for s in slices)
    assert data["summary"]["bare"]["throughput_ratio"] == 1.0
    # the traced stack wrote its spans; the bare one has none
    assert read_spans(run_dir / "session-1" / "all-traced" / tracing.TRACES_FILE)
    assert not (run_dir / "session-1" / "bare" / tracing.TRACES_FILE).exists()


def test_bench_overhead_starts_every_configuration_first_and_last_over_its_sessions():
    from loadlab.bench.overhead import CONFIGS, sessions

    planned = sessions(20, CONFIGS)
    assert [len(rounds) for _, rounds in planned] == [2] * 10  # fresh stacks every two rounds
    assert [i for _, rounds in planned for i in rounds] == list(range(20))  # every round once, in order
    for position in range(len(CONFIGS)):
        assert [order[position][0] for order, _ in planned].count(CONFIGS[0][0]) == 2
        assert {order[position][0] for order, _ in planned} == {name for name, *_ in CONFIGS}
    assert [len(rounds) for _, rounds in sessions(7, CONFIGS)] == [2, 2, 1, 2]
    assert [len(rounds) for _, rounds in sessions(20, CONFIGS, per_session=4)] == [4] * 5
    assert len(sessions(1, CONFIGS)) == 1


def test_bench_overhead_summarizes_earlier_runs_with_the_same_settings_and_refuses_the_others(tmp_path):
    from loadlab.bench.overhead import CONFIGS, combined, load_earlier, summarize

    settings = {"tasks": 1000, "paced_tasks": 40, "paced_rate": 40.0, "workers": 1, "concurrency": 2}

    def run(metrics_ratios: list[float]) -> dict:
        # rounds in sessions of two; metrics runs at the given share of bare's throughput, the others at bare's
        slices = {name: [{"round": i + 1, "session": i // 2 + 1, "p50_ms": 3.0, "cpu_ms_per_task": 2.5,
                          "throughput_per_s": 600.0 * (ratio if name == "metrics" else 1.0)}
                         for i, ratio in enumerate(metrics_ratios)] for name, *_ in CONFIGS}
        return {**settings, "rounds": len(metrics_ratios), "slices": slices}

    first = tmp_path / "first"
    first.mkdir()
    (first / "bench.json").write_text(json.dumps(run([0.95, 0.95, 0.96, 0.96])))
    this_run = run([0.99, 0.99, 0.98, 0.98])["slices"]
    [earlier] = load_earlier([str(first)], settings)  # a run's directory or its bench.json
    together = combined(this_run, [earlier])
    assert [len(slices) for slices in together.values()] == [8] * len(CONFIGS)
    assert {s["session"] for s in together["metrics"]} == {1, 2, "1.1", "1.2"}  # each run's sessions its own
    summary = summarize(together)["metrics"]
    assert summary["throughput_ratio"] == pytest.approx(0.97, abs=0.001)  # geometric mean of the four sessions
    assert summary["throughput_ratio_ci_low"] < 0.96 and 0.98 < summary["throughput_ratio_ci_high"]
    assert summarize(this_run)["metrics"]["throughput_ratio"] == pytest.approx(0.985, abs=0.001)  # this run alone

    other = tmp_path / "other.json"
    other.write_text(json.dumps({**run([0.9]), "tasks": 500}))
    with pytest.raises(ValueError, match=r"ran with --tasks 500, this run with 1000"):
        load_earlier([str(other)], settings)
    other.write_text("{}")
    with pytest.raises(ValueError, match="is not the bench.json of a `loadlab bench overhead` run"):
        load_earlier([str(other)], settings)


def test_bench_overhead_refuses_an_earlier_run_it_cannot_read_before_starting_anything(tmp_path):
    result = run_cli("bench", "overhead", "--with-earlier", str(tmp_path / "missing"), "--out", str(tmp_path / "b"),
                     timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--with-earlier" in result.stderr and "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "b").exists()


def test_bench_overhead_waits_for_results_stored_out_of_order_and_gives_up_at_its_deadline():
    """The burst's wait watches the last task published, then fetches the rest: results stored in any order are all
    found, with their date_done, and a result that never comes ends in a TimeoutError, not a hang."""
    import threading

    from celery import Celery

    from loadlab.bench.overhead import _wait_stored

    need_service("Redis", "127.0.0.1", 6379)
    app = Celery("bench-wait", broker=f"{MACHINE_REDIS}/2", backend=f"{MACHINE_REDIS}/2", set_as_current=False)
    ids = [f"{TEST_QUEUE_PREFIX}{unique()}" for _ in range(30)]
    try:
        def store(order):
            for task_id in order:
                app.backend.store_result(task_id, None, "SUCCESS")
                time.sleep(0.005)

        # the last one published is stored first, the others after it and in reverse
        writer = threading.Thread(target=store, args=([ids[-1], *reversed(ids[:-1])],))
        started = time.time()
        writer.start()
        done = _wait_stored(app, ids, timeout_s=30)
        writer.join()
        assert set(done) == set(ids)
        assert all(started - 1 <= stamp <= time.time() + 1 for stamp in done.values())
        with pytest.raises(TimeoutError):
            _wait_stored(app, [*ids, f"{TEST_QUEUE_PREFIX}{unique()}"], timeout_s=0.5)
    finally:
        app.backend.client.delete(*(app.backend.get_key_for_task(task_id) for task_id in ids))
        app.close()
