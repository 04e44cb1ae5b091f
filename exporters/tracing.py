"""OpenTelemetry tracing of the stack: one trace per submitted task, API request -> publish -> run -> result store.

The contrib instrumentations do the spans: Celery (publish and run, context in the message headers), FastAPI (the
API request) and Redis — on the API's result backend client only, so a status lookup shows up inside its request
span while the broker's polling and the harness's own ledger pushes stay out of the traces.

Where the contrib code has gaps, or costs more than the stack it watches, this module fills them:
- per pool child: the provider, the span processor's thread and the Celery instrumentation are set up in
  ``worker_process_init`` (never in the prefork MainProcess, which runs no task and must not fork with a live
  exporter thread); threads/solo/gevent pools set up in the MainProcess at ``worker_init``;
- a child that exits (``max_tasks_per_child`` recycling included) leaves through ``os._exit``, so no atexit handler
  runs and the batch processor's queued spans would be lost: ``worker_process_shutdown`` flushes them;
- the result store is one ``store_result/<task>`` span around Celery's ``Backend.store_result``, for every backend
  (Redis, SQL, …). On Redis the contrib instrumentation made two spans of it (the ``GET`` Celery reads first and
  the ``SETEX``+``PUBLISH`` pipeline) and was the costliest part of a traced task; SQL backends had no span at all;
- contrib Celery's ``set_attributes_from_context`` sets up to 19 attributes per span one by one, some of them the
  ``str()`` of a dict (``delivery_info``). It is replaced by one ``set_attributes`` call with the attributes people
  query: message id, destination, hostname, state, retries, eta, countdown and expires;
- contrib connects its publish and run handlers as Celery receivers of their own, and Celery unpacks a signal's
  keywords again for each receiver: here they are hooks of loadlab's one receiver per signal
  (``loadlab.exporters.task_signals``), with the ledger's and the metrics', and share one lookup of the task's request;
- the batch queue is sized so a burst does not drop spans before the next export.

``--tracing all`` samples every trace, ``sampled`` keeps ``trace_sample_ratio`` of new traces (parent-based: a task
follows the decision of whoever published it). Spans go over OTLP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set
(``OTEL_EXPORTER_OTLP_PROTOCOL`` grpc or http/protobuf), otherwise to ``<run_dir>/traces.jsonl``: one finished span
per line, as an OTLP JSON ``TracesData`` document, appended with one ``O_APPEND`` write per batch so that lines from
several processes never interleave.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from pathlib import Path

from celery import signals

from loadlab.exporters import task_signals

log = logging.getLogger("loadlab.tracing")

TRACES_FILE = "traces.jsonl"
MAX_QUEUE_SIZE = 65_536      # spans buffered per process before the batch processor drops any
FLUSH_TIMEOUT_MS = 10_000

_state: dict = {"provider": None, "worker_hooks": False, "setting_up": False}


# --- setup -------------------------------------------------------------------------------------------------------------
def install(app, settings, role: str) -> None:
    """Trace this process (producers: now) or, for ``role="worker"``, every process that runs tasks."""
    if settings.tracing == "off":
        return
    _state["app"], _state["settings"] = app, settings
    if role != "worker":
        setup(app, settings, f"loadlab-{role}", result_store="redis-client")
        return
    if _state["worker_hooks"]:
        return
    _state["worker_hooks"] = True
    _import_sdk()  # in the parent: pool children (and every recycled replacement) inherit the loaded modules
    signals.worker_init.connect(_worker_init, weak=False, dispatch_uid="loadlab-tracing-worker-init")
    signals.worker_process_init.connect(_worker_process_init, weak=False, dispatch_uid="loadlab-tracing-process-init")
    signals.worker_process_shutdown.connect(_flush_on_exit, weak=False, dispatch_uid="loadlab-tracing-process-exit")
    signals.worker_shutdown.connect(_flush_on_exit, weak=False, dispatch_uid="loadlab-tracing-worker-exit")


def setup(app, settings, service: str, result_store: str = "span"):
    """Provider, exporter and instrumentations for this process (once). ``result_store``: ``"span"`` (processes that
    run tasks: one span per result store) or ``"redis-client"`` (the API: contrib Redis spans for status reads).

    Once even when greenlets race here (Locust users starting together): setting up yields, and a second set of
    Celery handlers would give every publish a span per set, each nested in the last."""
    if _state["provider"] is not None or _state["setting_up"]:
        return _state["provider"]
    _state["setting_up"] = True
    try:
        return _setup(app, settings, service, result_store)
    finally:
        _state["setting_up"] = False


def _setup(app, settings, service: str, result_store: str):
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or service,
                                "service.instance.id": f"{os.uname().nodename}:{os.getpid()}"})
    provider = TracerProvider(resource=resource, sampler=sampler(settings), id_generator=preset_trace_ids())
    exporter = span_exporter(settings)
    if isinstance(exporter, JsonLinesSpanExporter):
        provider.add_span_processor(JsonLinesSpanProcessor(exporter))
    else:  # a collector over the network: the SDK's batching thread keeps its latency off the tasks
        provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=MAX_QUEUE_SIZE,
                                                       max_export_batch_size=512))
    trace.set_tracer_provider(provider)
    _state["provider"] = provider
    lean_celery_attributes()
    celery_instrumentor_class()().instrument(tracer_provider=provider,
                                             unsampled_fast_path=settings.tracing == "sampled")
    if result_store == "span":
        trace_result_store(app, provider)
    else:
        instrument_result_backend(app, provider)
    return provider


def _import_sdk() -> None:
    import opentelemetry.instrumentation.celery  # noqa: F401
    import opentelemetry.instrumentation.redis  # noqa: F401
    import opentelemetry.sdk.resources  # noqa: F401
    import opentelemetry.sdk.trace.export  # noqa: F401
    import opentelemetry.sdk.trace.sampling  # noqa: F401
    if exports_otlp():
        span_exporter_class()


def sampler(settings):
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased

    if settings.tracing == "all":
        return ParentBased(ALWAYS_ON)
    return ParentBased(TraceIdRatioBased(settings.trace_sample_ratio))


def exports_otlp() -> bool:
    """Spans go to a collector (the standard OTLP variables are set), not to traces.jsonl."""
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def span_exporter_class():
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter


def span_exporter(settings):
    if exports_otlp():
        return span_exporter_class()()
    directory = Path(settings.run_dir) if settings.run_dir else Path.cwd()
    return JsonLinesSpanExporter(directory / TRACES_FILE)


# --- Celery spans: unsampled tasks, lean attributes, the result store ------------------------------------------------
def preset_trace_ids():
    """The SDK's random ids, except that a root trace id decided in advance (``preset``) is used by the next root
    span this thread starts: so the publish fast path and the SDK's sampler see the same id and agree."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class PresetTraceIds(RandomIdGenerator):
        def __init__(self):
            self._preset = threading.local()
            os.register_at_fork(after_in_child=self._after_fork)

        def _after_fork(self) -> None:
            self._preset = threading.local()

        def preset(self, trace_id: int) -> None:
            self._preset.trace_id = trace_id

        def generate_trace_id(self) -> int:
            trace_id = getattr(self._preset, "trace_id", None)
            if trace_id is None:
                return super().generate_trace_id()
            self._preset.trace_id = None
            return trace_id

    return PresetTraceIds()


def fast_path_possible() -> bool:
    """The fast path writes and reads W3C ``traceparent`` itself: only with the default propagators."""
    return os.environ.get("OTEL_PROPAGATORS", "tracecontext,baggage").replace(" ", "") in (
        "tracecontext", "tracecontext,baggage")


@functools.cache  # one class: contrib's instrumentors are singletons per class
def celery_instrumentor_class():
    from time import time_ns

    from opentelemetry import baggage, context, trace
    from opentelemetry.instrumentation.celery import CeleryInstrumentor, utils
    from opentelemetry.sdk.trace import Tracer as SdkTracer
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

    producer, consumer = trace.SpanKind.PRODUCER, trace.SpanKind.CONSUMER
    set_span_in_context, get_current_context = trace.set_span_in_context, context.get_current
    SpanContext, TraceFlags = trace.SpanContext, trace.TraceFlags
    sampled_flag = TraceFlags.SAMPLED
    random_flag = getattr(TraceFlags, "RANDOM_TRACE_ID", 0)  # W3C level 2, newer APIs

    class LoadlabCeleryInstrumentor(CeleryInstrumentor):
        """contrib Celery, with a lean path for what it does per task, measured costlier than the SDK's own spans.

        - **Unsampled tasks** (``--tracing sampled``): contrib makes and propagates a non-recording span for every
          unsampled task, on both sides: measured, an unsampled task cost about 60 % of a fully traced one. Here an
          unsampled publish writes only its ``traceparent`` (flags ``00``), and a task that arrives with one runs
          inside that non-recording context (spans it starts follow the decision) without the span bookkeeping.
        - **Traced tasks**: contrib's publish and run handlers set each attribute in its own call (the SDK takes a
          lock and validates the value per call), enter ``use_span`` on top of attaching the extracted context,
          run the composite propagators both ways and record a runtime histogram for a meter loadlab does not
          export. The lean path makes the same spans (names, kinds, parents, attributes) with their attributes
          given at start, one context attach each, and the W3C ``traceparent`` written and read directly. It keeps
          contrib's per-task store on the task object, so contrib's failure and retry handlers still find the run
          span. What each step saves is in docs/performance.md.

        Both need the default propagators (W3C trace context, baggage); a task with baggage or a ``tracestate``,
        or a process with other propagators, goes through contrib unchanged."""

        def _instrument(self, **kwargs):
            fast = kwargs.pop("unsampled_fast_path", False) and fast_path_possible()
            provider = kwargs.get("tracer_provider")
            self._fast_path = fast
            self._lean = fast_path_possible()
            self._sampler = getattr(provider, "sampler", None)
            # ParentBased(ALWAYS_ON), --tracing all: every root is recorded and sampled, with no trace state
            self._samples_roots = (isinstance(self._sampler, ParentBased)
                                   and getattr(self._sampler, "_root", None) is ALWAYS_ON)
            self._ids = getattr(provider, "id_generator", None)
            self._finished = None  # publish spans handed to the processors once sent (an SDK tracer only)
            self._unsampled_runs: dict[str, object] = {}  # task id -> context token
            self._unsampled_publishes: set[str] = set()    # task ids published by the fast path, until after_publish
            if not hasattr(self._ids, "preset"):
                self._fast_path = False
            super()._instrument(**kwargs)
            # the per-task handlers run as hooks of loadlab's one receiver per signal (loadlab.exporters.task_signals), not as
            # receivers of their own: Celery unpacks a signal's keywords again for every receiver
            for signal, receiver, hook in self._per_task_hooks():
                signal.disconnect(receiver)
                task_signals.connect(signal, hook)
            self._start_run = None  # run spans built without start_span's generic path (an SDK tracer only)
            if isinstance(self._tracer, SdkTracer) and self._sampler is not None and self._ids is not None:
                self._finished = finished_spans(self._tracer)  # contrib's tracer: its processors and scope
                self._start_run = started_spans(self._tracer)

        def _per_task_hooks(self):
            return ((signals.before_task_publish, self._trace_before_publish, self._before_publish_hook),
                    (signals.after_task_publish, self._trace_after_publish, self._after_publish_hook),
                    (signals.task_prerun, self._trace_prerun, self._prerun_hook),
                    (signals.task_postrun, self._trace_postrun, self._postrun_hook))

        def _uninstrument(self, **kwargs):
            for signal, _receiver, hook in self._per_task_hooks():
                task_signals.disconnect(signal, hook)
            super()._uninstrument(**kwargs)

        # -- publish ----------------------------------------------------------------------------------------------
        def _before_publish_hook(self, arguments):
            headers = arguments.get("headers")
            if self._fast_path and headers is not None and self._publish_unsampled(headers, arguments.get("sender")):
                return
            if self._lean and headers and self._publish_traced(headers, arguments):
                return
            self._trace_before_publish(**arguments)

        def _after_publish_hook(self, arguments):
            headers = arguments.get("headers")
            if self._fast_path and headers is not None and headers.get("id") in self._unsampled_publishes:
                self._unsampled_publishes.discard(headers["id"])
                return
            if self._lean and headers:
                task = utils.retrieve_task_from_sender(arguments)
                task_id = headers.get("id")
                held = utils.retrieve_context(task, task_id, is_publish=True)
                if held is not None and held[1] is _LEAN:
                    published, _, token = held
                    utils.detach_context(task, task_id, is_publish=True)
                    context.detach(token)
                    if published is not None:
                        name, span_context, parent, attributes, started = published
                        self._finished(name, span_context, parent, attributes, producer, started, time_ns())
                    return
            self._trace_after_publish(**arguments)

        def _publish_traced(self, headers: dict, kwargs) -> bool:
            """contrib's publish span, made as the SDK would (its sampler, id generator and flags) but handed to the
            span processors as a ``ReadableSpan`` when the message is out, timed by loadlab: the SDK's live span
            (locks, bounded copies) is a large share of a publish's tracing cost (docs/performance.md), and nothing
            is recorded onto this span while it is open. The ``traceparent`` is written directly; the span goes
            straight to traces.jsonl when that is the only processor and, under ``--tracing all``, a root's sampling
            is decided without asking the sampler (``ParentBased(ALWAYS_ON)``: always recorded and sampled).
            Returns False when the message is not one this path handles: contrib's handler then makes the span."""
            task_id = headers.get("id")
            if task_id is None or self._finished is None:
                return False
            current = get_current_context()
            parent = None
            if current:  # an empty context (a plain producer) has neither a parent span nor baggage
                if baggage.get_all(current):
                    return False
                parent = trace.get_current_span(current).get_span_context()
                parent = parent if parent.is_valid else None
            task = utils.retrieve_task_from_sender(kwargs)
            task_name = task.name if task is not None else kwargs.get("sender", "unknown")
            name = f"apply_async/{task_name}"
            attributes = {"celery.action": "apply_async", "messaging.message.id": task_id,
                          "celery.task_name": task_name}
            routing_key = kwargs.get("routing_key")
            if routing_key and isinstance(routing_key, str):
                attributes["messaging.destination"] = routing_key
            if parent is None and self._samples_roots:  # --tracing all: the sampler's answer for a root is known
                trace_id = self._ids.generate_trace_id()
                flags = sampled_flag | random_flag if random_flag and self._ids.is_trace_id_random() else sampled_flag
                span_context = new_span_context()(trace_id, self._ids.generate_span_id(), False, TraceFlags(flags))
                published = (name, span_context, None, attributes, time_ns())
            else:
                trace_id = parent.trace_id if parent is not None else self._ids.generate_trace_id()
                sampling = self._sampler.should_sample(None, trace_id, name, producer, attributes)
                flags = sampled_flag if sampling.decision.is_sampled() else TraceFlags.DEFAULT
                if random_flag and (parent.trace_flags & random_flag if parent is not None
                                    else self._ids.is_trace_id_random()):
                    flags |= random_flag
                span_context = SpanContext(trace_id, self._ids.generate_span_id(), is_remote=False,
                                           trace_flags=TraceFlags(flags), trace_state=sampling.trace_state)
                if sampling.trace_state:
                    headers["tracestate"] = sampling.trace_state.to_header()
                published = None
                if sampling.decision.is_recording():
                    if sampling.attributes:
                        attributes.update(sampling.attributes)
                    published = (name, span_context, parent, attributes, time_ns())
            headers["traceparent"] = f"00-{trace_id:032x}-{span_context.span_id:016x}-{flags:02x}"
            # current while the message is sent, as contrib's use_span makes it: spans started inside are children
            token = context.attach(set_span_in_context(trace.NonRecordingSpan(span_context)))
            utils.attach_context(task, task_id, published, _LEAN, token, is_publish=True)
            return True

        def _publish_unsampled(self, headers: dict, name) -> bool:
            parent = trace.get_current_span().get_span_context()
            if parent.is_valid:
                if parent.trace_flags.sampled or parent.trace_state:
                    return False
                trace_id = parent.trace_id
            else:
                trace_id = self._ids.generate_trace_id()
                if self._sampler.should_sample(None, trace_id, f"apply_async/{name}").decision.is_sampled():
                    self._ids.preset(trace_id)  # the SDK's root span takes this id, so it is sampled too
                    return False
            if baggage.get_all():
                return False  # contrib's inject carries it
            task_id = headers.get("id")
            if task_id is None:
                return False
            headers["traceparent"] = f"00-{trace_id:032x}-{self._ids.generate_span_id():016x}-00"
            if len(self._unsampled_publishes) >= 10_000:  # publishes that failed never reached after_publish
                self._unsampled_publishes.clear()
            self._unsampled_publishes.add(task_id)
            return True

        # -- run --------------------------------------------------------------------------------------------------
        def _prerun_hook(self, arguments):
            task, task_id = arguments.get("task"), arguments.get("task_id")
            if task is not None and task_id is not None and (self._fast_path or self._lean):
                request = task_signals.request_of(arguments)
                traceparent = _fields(request).get("traceparent")
                parent = None
                if traceparent is not None:
                    parent = _remote_parent(traceparent, request)
                    if parent is None:
                        return self._trace_prerun(**arguments)  # a header only contrib's extract reads
                    if self._fast_path and not parent.trace_flags.sampled:
                        self._unsampled_runs[task_id] = context.attach(
                            set_span_in_context(trace.NonRecordingSpan(parent)))
                        return
                if self._lean:
                    return self._run_traced(task, task_id, request, parent)
            self._trace_prerun(**arguments)

        def _run_traced(self, task, task_id: str, request, parent) -> None:
            """contrib's run span (a child of the publish span in the message), built in one call."""
            attributes = lean_attributes(request)
            attributes["celery.action"] = "run"
            attributes["celery.task_name"] = task.name
            start_run = self._start_run
            if start_run is not None and start_run.decides_sampled_remote and parent is not None and (
                    parent.trace_flags.sampled):  # the common case: no context to build for the sampler
                span = start_run(f"run/{task.name}", None, consumer, attributes, sampled_remote_parent=parent)
                token = context.attach(set_span_in_context(span))
                utils.attach_context(task, task_id, span, _LEAN, token)
                return
            parent_context = set_span_in_context(trace.NonRecordingSpan(parent)) if parent is not None else None
            if start_run is not None:
                span = start_run(f"run/{task.name}", parent_context, consumer, attributes)
            else:
                span = self._tracer.start_span(f"run/{task.name}", context=parent_context, kind=consumer,
                                               attributes=attributes)
            token = context.attach(set_span_in_context(span, parent_context))
            utils.attach_context(task, task_id, span, _LEAN, token)

        def _postrun_hook(self, arguments):
            task_id = arguments.get("task_id")
            token = self._unsampled_runs.pop(task_id, None) if self._fast_path else None
            if token is not None:
                context.detach(token)
                return
            task = arguments.get("task")
            held = utils.retrieve_context(task, task_id) if self._lean and task_id is not None else None
            if held is not None and held[1] is _LEAN:
                span, _, token = held
                state = arguments.get("state")
                if state and isinstance(state, str):
                    set_string = getattr(span, "set_string_attribute", None)  # a span of ``started_spans``
                    (set_string or span.set_attribute)("celery.state", state)
                span.end()
                utils.detach_context(task, task_id)
                context.detach(token)
                return
            self._trace_postrun(**arguments)

    return LoadlabCeleryInstrumentor


_LEAN = object()  # in contrib's per-task store, in place of a use_span activation: a span of the lean path


def _remote_parent(traceparent, request):
    """The sender's span context from a W3C ``traceparent`` (version 00), or None: malformed, or the message also
    carries what only contrib's propagators read (``tracestate``, ``baggage``)."""
    fields = _fields(request)
    if (not isinstance(traceparent, str) or len(traceparent) != 55 or not traceparent.startswith("00-")
            or traceparent[35] != "-" or traceparent[52] != "-" or fields.get("tracestate") or fields.get("baggage")):
        return None
    try:
        trace_id, span_id, flags = int(traceparent[3:35], 16), int(traceparent[36:52], 16), int(traceparent[53:], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:  # all zeros: invalid
        return None
    trace = _trace_api()
    return new_span_context()(trace_id, span_id, True, trace.TraceFlags(flags))


@functools.cache
def new_span_context():
    """``new(trace_id, span_id, is_remote, trace_flags, trace_state=None)``: the API's ``SpanContext`` for ids known
    valid (non-zero, 128 and 64 bits), built as the tuple it is, without its constructor's keyword handling and
    checks: three of them per traced task. The API's constructor when this API's tuple differs (checked here once)."""
    from opentelemetry.trace import SpanContext, TraceFlags
    from opentelemetry.trace.span import DEFAULT_TRACE_STATE

    new_tuple = tuple.__new__

    def new(trace_id: int, span_id: int, is_remote: bool, trace_flags, trace_state=None):
        return new_tuple(SpanContext, (trace_id, span_id, is_remote, trace_flags,
                                       DEFAULT_TRACE_STATE if trace_state is None else trace_state, True))

    probe = (0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True, TraceFlags(1))
    reference = SpanContext(*probe)
    made = new(*probe)
    if type(made) is not type(reference) or made != reference or not made.is_valid or made.trace_state != (
            reference.trace_state):
        return lambda trace_id, span_id, is_remote, trace_flags, trace_state=None: SpanContext(
            trace_id, span_id, is_remote, trace_flags, trace_state)
    return new


@functools.cache
def _trace_api():
    from opentelemetry import trace  # imported once tracing is on: with --tracing off nothing of OTel is loaded

    return trace


# context key -> attribute (OTel messaging semconv where there is one, contrib Celery's names otherwise)
_LEAN_ATTRIBUTES = (("id", "messaging.message.id"), ("routing_key", "messaging.destination"),
                    ("hostname", "celery.hostname"), ("origin", "celery.hostname"), ("state", "celery.state"),
                    ("retries", "celery.retries"), ("eta", "celery.eta"), ("countdown", "celery.countdown"),
                    ("expires", "celery.expires"))
_ATTRIBUTE_TYPES = (str, bool, int, float)


def lean_attributes(context) -> dict:
    """The attributes people query, from a signal's kwargs or a task request: contrib Celery's
    ``set_attributes_from_context``, cut down (it sets up to 19, some the ``str()`` of a dict)."""
    get = _fields(context).get
    attributes = {}
    for key, name in _LEAN_ATTRIBUTES:
        value = get(key)
        if value is not None and value != "" and value != 0 and isinstance(value, _ATTRIBUTE_TYPES):
            attributes[name] = value
    delivery_info = get("delivery_info")
    if delivery_info and "messaging.destination" not in attributes:
        routing_key = delivery_info.get("routing_key")
        if routing_key:
            attributes["messaging.destination"] = routing_key
    return attributes


def _fields(context):
    """A Celery request's fields as a dict: what the message set is in the instance's ``__dict__``, the rest are
    class defaults (None, 0, ''), which the attributes leave out anyway. ``request.get(key)`` is a getattr that
    raises and catches AttributeError for every field the message lacks: the costliest part of reading ten."""
    fields = getattr(context, "__dict__", None)
    return fields if isinstance(fields, dict) and not isinstance(context, dict) else context


def set_lean_attributes(span, context) -> None:
    """In place of contrib's ``set_attributes_from_context`` (its own handlers): one ``set_attributes`` call."""
    if not span.is_recording():
        return
    attributes = lean_attributes(context)
    if attributes:
        span.set_attributes(attributes)


class _UnregisteredTask:
    """Stands in for a task this process only knows by name (``send_task`` of another app's task). contrib Celery
    keeps the publish span on the task object; without one nothing holds the span, it ends as soon as
    ``before_task_publish`` returns, and the publish it should time is left out of it."""

    def __init__(self, name: str):
        self.name = name


_SENDERS: dict = {}
_MAX_SENDERS = 10_000


def task_from_sender(kwargs):
    """contrib Celery's ``retrieve_task_from_sender`` (twice per publish), with the registry lookup remembered and
    a stand-in for unregistered names."""
    sender = kwargs.get("sender")
    if sender is None or not isinstance(sender, str):
        return sender  # retry and failure signals send the task object itself
    task = _SENDERS.get(sender)
    if task is None:
        from celery import current_app

        task = current_app.tasks.get(sender) or _UnregisteredTask(sender)
        if len(_SENDERS) < _MAX_SENDERS:
            _SENDERS[sender] = task
    return task


def lean_celery_attributes() -> None:
    from opentelemetry.instrumentation.celery import utils

    # contrib looks these up on the module at every call
    utils.set_attributes_from_context = set_lean_attributes
    utils.retrieve_task_from_sender = task_from_sender


def trace_result_store(app, provider) -> None:
    """One ``store_result/<task>`` CLIENT span (a child of the run span) around the backend's ``store_result``.

    The span is a leaf that loadlab times itself, inside a run span already sampled (the parent-based sampler
    samples it too): it is handed to the span processors as the SDK's ``ReadableSpan`` with the measured times,
    without the SDK's live-span machinery (sampler, locks, bounded attribute copies; its cost is in
    docs/performance.md). A store that raises takes the SDK's span path, so the
    exception is recorded as the SDK records it."""
    try:
        backend_class = type(app.backend)
    except Exception:  # noqa: BLE001 - a backend that cannot be built now fails later, where it is used
        return
    store_result = backend_class.store_result
    if getattr(store_result, "__loadlab_traced__", False):
        return
    from time import time_ns

    from opentelemetry import trace

    tracer = provider.get_tracer("loadlab.result_store")
    current_span = trace.get_current_span
    client = trace.SpanKind.CLIENT
    db_system = result_backend_system(app)
    finished, new_span_id = finished_spans(tracer), tracer.id_generator.generate_span_id
    new_context = new_span_context()  # the parent's trace id and a generated span id: valid

    def traced_store_result(self, task_id, result, state, traceback=None, request=None, **kwargs):
        parent = current_span()
        if not parent.is_recording():  # outside a sampled run span: no span of its own either
            return store_result(self, task_id, result, state, traceback, request, **kwargs)
        name = getattr(request, "task", None) if request is not None else None
        name = f"store_result/{name}" if name else "store_result"
        attributes = {"celery.action": "store_result", "celery.state": state, "messaging.message.id": task_id,
                      "db.system": db_system}
        started = time_ns()
        try:
            stored = store_result(self, task_id, result, state, traceback, request, **kwargs)
        except BaseException as exc:
            span = tracer.start_span(name, kind=client, attributes=attributes, start_time=started)
            span.record_exception(exc)
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
            span.end()
            raise
        ended = time_ns()
        parent_context = parent.get_span_context()
        span_context = new_context(parent_context[0], new_span_id(), False, parent_context[3], parent_context[4])
        finished(name, span_context, parent_context, attributes, client, started, ended)
        return stored

    traced_store_result.__loadlab_traced__ = True
    traced_store_result.__wrapped__ = store_result
    backend_class.store_result = traced_store_result


def finished_spans(tracer):
    """``finished(name, context, parent, attributes, kind, start_ns, end_ns)``: a span that loadlab timed itself,
    handed to the SDK tracer's span processors as the SDK's ``ReadableSpan`` (resource and scope of the tracer), or
    straight to traces.jsonl as one line when that is the tracer's only processor (``traces_file_processor``)."""
    from opentelemetry.sdk.trace import ReadableSpan

    on_end, resource = tracer.span_processor.on_end, tracer.resource
    scope = getattr(tracer, "_instrumentation_scope", None)
    traces_file = traces_file_processor(tracer)
    if traces_file is not None:  # encoded from the fields as they are: no ReadableSpan to build and read back
        from opentelemetry.trace import Status, StatusCode

        prefix, add_line, unset = traces_file.exporter.prefix(resource, scope), traces_file.add_line, Status(
            StatusCode.UNSET)

        def finished_to_file(name, span_context, parent, attributes, kind, start_time, end_time) -> None:
            if span_context.trace_flags.sampled:
                add_line(encode_span_line(prefix, span_context, parent, name, kind, start_time, end_time,
                                          attributes, unset))

        return finished_to_file

    def finished(name, span_context, parent, attributes, kind, start_time, end_time) -> None:
        on_end(ReadableSpan(name=name, context=span_context, parent=parent, resource=resource,
                            attributes=attributes, kind=kind, start_time=start_time, end_time=end_time,
                            instrumentation_scope=scope))

    return finished


def started_spans(tracer):
    """``start(name, parent_context, kind, attributes)``: what the SDK tracer's ``start_span`` returns — a live SDK
    ``Span`` (sampled by the tracer's sampler, its ids and flags, started at the processors) or a
    ``NonRecordingSpan`` — built without ``start_span``'s generic path: no parent lookup through the context, no
    tracer self-metrics (loadlab exports no SDK metrics), and the attributes (already valid: str, bool, int, float)
    put in place instead of cleaned one by one. ``start(..., sampled_remote_parent=span_context)`` with
    ``parent_context`` None, when ``start.decides_sampled_remote``: a child of a sampled parent from a message, whose
    sampling decision is known without the sampler. With only the traces.jsonl processor the span writes itself
    there when it ends (``span_writing_to_file``). The run span stays a full SDK span: contrib's failure and retry
    handlers and the task's own code record onto it. None when this SDK's ``Span`` keeps other fields than the ones
    set here (another SDK version): then ``start_span`` is used."""
    from threading import Lock
    from time import time_ns

    from opentelemetry import trace
    from opentelemetry.attributes import BoundedAttributes
    from opentelemetry.sdk import trace as sdk_trace
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
    from opentelemetry.sdk.util import BoundedList

    span_class = getattr(sdk_trace, "_Span", None)  # the class the SDK's tracer instantiates
    if not isinstance(tracer, sdk_trace.Tracer) or not isinstance(span_class, type):
        return None
    limits, processor, sampler, ids = tracer._span_limits, tracer.span_processor, tracer.sampler, tracer.id_generator
    # the fields every span shares (the SDK's Span.__init__ sets each of them)
    shared = {"_kind": trace.SpanKind.INTERNAL, "_instrumentation_info": tracer.instrumentation_info,
              "_instrumentation_scope": getattr(tracer, "_instrumentation_scope", None), "_end_time": None,
              "_resource": tracer.resource, "_status": trace.Status(trace.StatusCode.UNSET), "_sampler": sampler,
              "_trace_config": None, "_record_exception": True, "_set_status_on_exception": True,
              "_span_processor": processor, "_limits": limits, "_record_end_metrics": None}
    per_span = ("_name", "_context", "_parent", "_start_time", "_lock", "_attributes", "_events", "_links")
    reference = span_class("reference", trace.INVALID_SPAN_CONTEXT, limits=limits)
    probe = BoundedAttributes(1, None, immutable=False)
    if set(vars(reference)) != {*shared, *per_span} or not isinstance(getattr(probe, "_dict", None), dict):
        return None
    max_attributes, max_value_length = limits.max_span_attributes, limits.max_span_attribute_length

    class StartedSpan(span_class):
        def __getattr__(self, name: str):
            """Events and links, made when first used: most run spans have neither."""
            if name == "_events" or name == "_links":
                value = self.__dict__[name] = BoundedList(limits.max_events if name == "_events" else limits.max_links)
                return value
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

        def set_string_attribute(self, key: str, value: str) -> None:
            """``set_attribute`` of a ``str``, without the SDK's checks and lock when they cannot matter: the span
            is open and the value within the limits (a task's state, set once the task has run)."""
            attributes = self._attributes._dict
            if self._end_time is None and (max_value_length is None or len(value) <= max_value_length) and (
                    max_attributes is None or key in attributes or len(attributes) < max_attributes):
                attributes[key] = value
            else:
                self.set_attribute(key, value)

    span_class = StartedSpan
    traces_file = traces_file_processor(tracer)
    if traces_file is not None:
        span_class = span_writing_to_file(span_class, traces_file, tracer.resource, shared["_instrumentation_scope"])
    new_span = object.__new__
    random_flag = getattr(trace.TraceFlags, "RANDOM_TRACE_ID", 0)  # W3C level 2, newer APIs
    get_current_span, SpanContext, TraceFlags = trace.get_current_span, trace.SpanContext, trace.TraceFlags
    new_context = new_span_context()

    # ParentBased with the default delegate for a sampled remote parent (ALWAYS_ON; both --tracing modes): a span
    # whose parent came sampled in the message is recorded and sampled, with the parent's trace state. The SDK's
    # sampler would say so through two context lookups and two result objects per task.
    decides_sampled_remote = (traces_file is not None and isinstance(sampler, ParentBased)
                              and getattr(sampler, "_remote_parent_sampled", None) is ALWAYS_ON)

    def start(name: str, parent_context, kind, attributes: dict, sampled_remote_parent=None):
        if sampled_remote_parent is not None and decides_sampled_remote:
            parent = sampled_remote_parent
            flags = TraceFlags.SAMPLED | (parent.trace_flags & random_flag)
            span_context = new_context(parent[0], ids.generate_span_id(), False, TraceFlags(flags), parent[4])
            given = attributes
        else:
            parent = get_current_span(parent_context).get_span_context()
            if not parent.is_valid:
                parent = None
            trace_id = parent.trace_id if parent is not None else ids.generate_trace_id()
            sampling = sampler.should_sample(parent_context, trace_id, name, kind, attributes)
            flags = TraceFlags.SAMPLED if sampling.decision.is_sampled() else TraceFlags.DEFAULT
            if random_flag and (parent.trace_flags & random_flag if parent is not None else ids.is_trace_id_random()):
                flags |= random_flag
            span_context = SpanContext(trace_id, ids.generate_span_id(), is_remote=False,
                                       trace_flags=TraceFlags(flags), trace_state=sampling.trace_state)
            if not sampling.decision.is_recording():
                return trace.NonRecordingSpan(span_context)
            given = sampling.attributes
        bounded = BoundedAttributes(max_attributes, None, immutable=False, max_value_len=max_value_length)
        if max_value_length is None and (max_attributes is None or len(given) <= max_attributes):
            bounded._dict.update(given)
        else:
            bounded._set_items(given)  # limits to apply: the SDK's own path
        span = new_span(span_class)
        fields = span.__dict__
        fields.update(shared)
        fields.update(_name=name, _context=span_context, _parent=parent, _kind=kind, _start_time=time_ns(),
                      _lock=Lock(), _attributes=bounded)
        if traces_file is None:  # the traces file's processor does nothing at start
            processor.on_start(span, parent_context=parent_context)
        return span

    start.decides_sampled_remote = decides_sampled_remote
    return start


def traces_file_processor(tracer) -> "JsonLinesSpanProcessor | None":
    """The tracer's span processor when it is only loadlab's traces.jsonl writer (``setup`` adds no other), which
    spans loadlab makes itself may skip the SDK's processor chain for; None otherwise."""
    processors = getattr(tracer.span_processor, "_span_processors", None)
    if isinstance(processors, tuple) and len(processors) == 1 and isinstance(processors[0], JsonLinesSpanProcessor):
        return processors[0]
    return None


def span_writing_to_file(span_class, processor: "JsonLinesSpanProcessor", resource, scope):
    """The SDK's span class, but one that writes itself to traces.jsonl when it ends, from its own fields: the SDK's
    ``end`` copies every field into a ``ReadableSpan`` first, for processors that keep spans (not this one)."""
    from time import time_ns

    prefix, add_line = processor.exporter.prefix(resource, scope), processor.add_line

    class SpanWritingToFile(span_class):
        def end(self, end_time: int | None = None) -> None:
            with self._lock:  # as the SDK's end: a span ends once
                if self._start_time is None:
                    raise RuntimeError("Calling end() on a not started span.")
                if self._end_time is not None:
                    log.warning("Calling end() on an ended span.")
                    return
                self._end_time = end_time if end_time is not None else time_ns()
                self._attributes._immutable = True
            fields = self.__dict__
            if self._context.trace_flags.sampled:
                add_line(encode_span_line(
                    prefix, self._context, self._parent, self._name, self._kind, self._start_time, self._end_time,
                    self._attributes._dict, self._status, fields.get("_events", ()), fields.get("_links", ())))

    return SpanWritingToFile


def result_backend_system(app) -> str:
    """``db.system`` of the result backend: the URL's scheme, or the SQL dialect for ``db+<dialect>://``."""
    url = str(app.conf.result_backend or "")
    scheme = url.split("://", 1)[0].lower()
    if scheme.startswith("db+"):
        scheme = scheme[3:].split("+", 1)[0]
    return {"rediss": "redis", "sentinel": "redis", "postgres": "postgresql"}.get(scheme, scheme or "unknown")


def instrument_result_backend(app, provider) -> None:
    """Trace the Redis result backend's clients (the result store), not Redis as a whole. Celery builds one backend
    per thread (the API's thread pool, the threads pool), so every client the backend class creates is instrumented,
    plus the one this thread may already have."""
    try:
        from celery.backends.redis import RedisBackend
    except ImportError:
        return
    if not getattr(RedisBackend._create_client, "__loadlab_traced__", False):
        create_client = RedisBackend._create_client

        def _create_client(self, *args, **kwargs):
            client = create_client(self, *args, **kwargs)
            trace_client_in_traces(client, provider)
            return client

        _create_client.__loadlab_traced__ = True
        RedisBackend._create_client = _create_client
    try:
        backend = app.backend
    except Exception:  # noqa: BLE001 - a backend that cannot be built now fails later, where it is used
        return
    client = backend.__dict__.get("client") if isinstance(backend, RedisBackend) else None
    if client is not None:  # built before the patch
        trace_client_in_traces(client, provider)


def trace_client_in_traces(client, provider) -> None:
    """The contrib Redis instrumentation on one client, used only inside a recording span: a command outside any
    trace (or in an unsampled one) goes straight to Redis instead of through a non-recording span, the tracing
    cost of every unsampled task under ``--tracing sampled``."""
    from opentelemetry import trace
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    if getattr(client, "_is_instrumented_by_opentelemetry", False):
        return
    plain_execute, plain_pipeline = client.execute_command, client.pipeline
    RedisInstrumentor.instrument_client(client, tracer_provider=provider)
    traced_execute, traced_pipeline = client.execute_command, client.pipeline
    current_span = trace.get_current_span

    def execute_command(*args, **kwargs):
        return (traced_execute if current_span().is_recording() else plain_execute)(*args, **kwargs)

    def pipeline(*args, **kwargs):
        return (traced_pipeline if current_span().is_recording() else plain_pipeline)(*args, **kwargs)

    client.execute_command = execute_command
    client.pipeline = pipeline


def instrument_api(api, settings) -> None:
    """Server spans for the producer API's requests (health checks and scrapes left out)."""
    if settings.tracing == "off":
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(api, tracer_provider=_state["provider"], excluded_urls="healthz,metrics",
                                       exclude_spans=["receive", "send"])


# --- worker hooks ------------------------------------------------------------------------------------------------------
def _worker_init(sender=None, **_):
    from celery.concurrency import get_implementation
    from celery.concurrency.prefork import TaskPool

    pool = getattr(sender, "pool_cls", None)
    pool_cls = get_implementation(pool) if isinstance(pool, str) else pool
    if not (isinstance(pool_cls, type) and issubclass(pool_cls, TaskPool)):
        setup(_state["app"], _state["settings"], "loadlab-worker")  # tasks run in this process


def _worker_process_init(**_):
    setup(_state["app"], _state["settings"], "loadlab-worker")


def _flush_on_exit(**_):
    # the child leaves through os._exit right after this signal: export what the batch processor still holds
    provider = _state["provider"]
    if provider is not None:
        provider.force_flush(FLUSH_TIMEOUT_MS)
        provider.shutdown()
        _state["provider"] = None


# --- traces.jsonl --------------------------------------------------------------------------------------------------------
class JsonLinesSpanProcessor:
    """Span processor for ``traces.jsonl``: each finished span is encoded on the thread that ends it and the lines
    are appended in batches (``MAX_LINES`` or ``MAX_DELAY_S``, whichever first; the rest at flush and exit).

    Why not the SDK's BatchSpanProcessor: its export thread encodes hundreds of spans while holding the GIL, and
    every Redis reply the task thread waits for in the meantime must then wait for the GIL too (the convoy effect):
    measured, that made traced tasks markedly slower than the encoding itself. Here the only work off the task thread
    is a timer that writes already-encoded lines of a process gone idle."""

    MAX_LINES = 256
    MAX_DELAY_S = 1.0

    def __init__(self, exporter: "JsonLinesSpanExporter"):
        self.exporter = exporter
        self._lock = threading.Lock()
        self._lines: list[str] = []
        self._first_at: float | None = None
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        self._timer_pid: int | None = None
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._lines, self._first_at = [], None  # the parent's spans are the parent's to write
        self._stop = threading.Event()
        self._timer = None

    def on_start(self, span, parent_context=None) -> None:
        pass

    def _on_ending(self, span) -> None:
        pass

    def on_end(self, span) -> None:
        if span.context.trace_flags.sampled:
            self.add_line(self.exporter.line(span))

    def add_line(self, line: str) -> None:
        """One encoded span (``JsonLinesSpanExporter.line``) into the batch, written by this thread when the batch
        is full; a batch that grows old before (``MAX_DELAY_S``) is the timer's to write."""
        with self._lock:
            lines = self._lines
            lines.append(line)
            if self._first_at is None:
                self._first_at = time.monotonic()
                self._ensure_timer()
            if len(lines) < self.MAX_LINES:
                return
            self._lines, self._first_at = [], None
        self.exporter.write_lines(lines)

    def _ensure_timer(self) -> None:
        if self._timer is not None and self._timer_pid == os.getpid():
            return
        self._timer_pid = os.getpid()
        self._timer = threading.Thread(target=self._flush_stale, name="loadlab-traces-flush", daemon=True)
        self._timer.start()

    def _flush_stale(self) -> None:
        while not self._stop.wait(self.MAX_DELAY_S):
            with self._lock:
                stale = self._first_at is not None and time.monotonic() - self._first_at >= self.MAX_DELAY_S
                lines = self._lines if stale else None
                if stale:
                    self._lines, self._first_at = [], None
            if lines:
                self.exporter.write_lines(lines)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        with self._lock:
            lines, self._lines, self._first_at = self._lines, [], None
        if lines:
            self.exporter.write_lines(lines)
        return True

    def shutdown(self) -> None:
        self._stop.set()
        self.force_flush()
        self.exporter.shutdown()


class JsonLinesSpanExporter:
    """Finished spans as OTLP JSON lines (each line a ``TracesData`` with one span), appended to one file that
    several processes share: one ``write`` on an ``O_APPEND`` descriptor per batch, so lines never interleave."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None
        self._pid: int | None = None
        self._prefixes: dict[tuple[int, int], str] = {}

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked child opens its own
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self._pid = os.getpid()
        return self._fd

    def export(self, spans):
        from opentelemetry.sdk.trace.export import SpanExportResult

        ok = self.write_lines([self.line(span) for span in spans])
        return SpanExportResult.SUCCESS if ok else SpanExportResult.FAILURE

    def write_lines(self, lines: list[str]) -> bool:
        """Appends encoded lines with one write (a batch of lines never interleaves with another process's)."""
        try:
            data = "".join(lines).encode("utf-8")
            fd = self._descriptor()
            written = os.write(fd, data)
            while written < len(data):  # only on a full disk or similar: finish the batch rather than lose it
                written += os.write(fd, data[written:])
        except Exception:  # noqa: BLE001 - a tracing failure must not break the task
            log.exception("could not write spans to %s", self.path)
            return False
        return True

    def prefix(self, resource, scope) -> str:
        """The start of a line up to its span: the resource and the instrumentation scope (the same for every span
        of a tracer, so encoded once per pair)."""
        key = (id(resource), id(scope))
        prefix = self._prefixes.get(key)
        if prefix is None:
            scope_json = {"name": scope.name, "version": scope.version or ""} if scope else {}
            prefix = self._prefixes[key] = (
                '{"resourceSpans":[{"resource":{"attributes":' + _attributes_json(resource.attributes)
                + '},"scopeSpans":[{"scope":' + json.dumps(scope_json, separators=(",", ":")) + ',"spans":[')
        return prefix

    def line(self, span) -> str:
        attributes, events, links = _span_collections(span)
        return encode_span_line(self.prefix(span.resource, span.instrumentation_scope), span.get_span_context(),
                                span.parent, span.name, span.kind, span.start_time, span.end_time, attributes,
                                span.status, events, links)

    def shutdown(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True  # every export is already written


LINE_END = "]}]}]}\n"  # closes what ``JsonLinesSpanExporter.prefix`` opens
_KIND = {"INTERNAL": 1, "SERVER": 2, "CLIENT": 3, "PRODUCER": 4, "CONSUMER": 5}
_STATUS = {"UNSET": 0, "OK": 1, "ERROR": 2}
_quote = json.encoder.encode_basestring_ascii  # the C string encoder: most of a span is short strings
# one %-format for the whole span: a single C call instead of a list of parts (this runs for every span)
_SPAN_JSON = ('{"traceId":"%032x","spanId":"%016x"%s,"name":%s,"kind":%d,"startTimeUnixNano":"%d",'
              '"endTimeUnixNano":"%d","attributes":%s,"status":{"code":%d%s}%s%s}')


@functools.cache
def _enum_codes() -> tuple[dict, dict]:
    """OTLP's integers keyed by the ``id`` of the API's enum members, which are singletons: an enum member's hash
    and ``.name`` are Python-level calls, and this is looked up twice per span."""
    from opentelemetry.trace import SpanKind, StatusCode

    return ({id(kind): _KIND[kind.name] for kind in SpanKind}, {id(code): _STATUS[code.name] for code in StatusCode})


def encode_span_json(span) -> str:
    """One span in OTLP JSON (hex ids, integer enums, nanosecond times as strings), built as text: this runs for
    every span of every traced task, and json.dumps of nested dicts costs several times more."""
    attributes, events, links = _span_collections(span)
    return encode_span_fields(span.get_span_context(), span.parent, span.name, span.kind, span.start_time,
                              span.end_time, attributes, span.status, events, links)


_LINE_TEMPLATES: dict = {}  # (prefix, name, kind, parent?, attribute keys) -> a line's text around its fields
_MAX_LINE_TEMPLATES = 1024  # a process's spans come in a few shapes: publish, run and store of each task name
_IDS = '{"traceId":"%032x","spanId":"%016x"'
_IDS_AND_PARENT = _IDS + ',"parentSpanId":"%016x"'
_TIMES = '%d","endTimeUnixNano":"%d'


def encode_span_line(prefix: str, context, parent, name: str, kind, start_time: int, end_time: int, attributes,
                     status, events=(), links=()) -> str:
    """One line of traces.jsonl: ``prefix`` (``JsonLinesSpanExporter.prefix``), the span, ``LINE_END``.

    Most spans have the same shape as many before them: the same name, kind and attribute keys, string values, no
    events, links or status. Their line is the text of their shape, made once, joined with the ids, the times and
    the quoted values (one ``join``: a %-format scans its whole template, about 1 kB here, character by character)."""
    if attributes and not events and not links:
        kinds, codes = _enum_codes()
        values = tuple(attributes.values())
        if set(map(type, values)) == _STR_ONLY and codes.get(id(status._status_code)) == 0:  # UNSET: no message
            shape = (prefix, name, id(kind), parent is None, *attributes)
            template = _LINE_TEMPLATES.get(shape)
            if template is None:
                if len(_LINE_TEMPLATES) >= _MAX_LINE_TEMPLATES:
                    _LINE_TEMPLATES.clear()
                template = _LINE_TEMPLATES[shape] = _line_template(prefix, name, kinds.get(id(kind), 0),
                                                                   tuple(attributes))
            parts = list(template)
            parts[1::2] = (_IDS % (context[0], context[1]) if parent is None else
                           _IDS_AND_PARENT % (context[0], context[1], parent[1]),
                           _TIMES % (start_time, end_time), *map(_quote, values))
            return "".join(parts)
    return prefix + encode_span_fields(context, parent, name, kind, start_time, end_time, attributes, status, events,
                                       links) + LINE_END


def _line_template(prefix: str, name: str, kind_code: int, keys: tuple) -> tuple:
    """``encode_span_line``'s text of one shape, what ``_SPAN_JSON`` makes of it: the literal parts, with a None
    between each two where the ids, the times and each attribute's quoted value go."""
    parts = [prefix, None, ',"name":' + _quote(name) + ',"kind":' + str(kind_code) + ',"startTimeUnixNano":"', None,
             '","attributes":[']
    for index, key in enumerate(keys):
        parts[-1] += ("," if index else "") + '{"key":' + _quote(key) + ',"value":{"stringValue":'
        parts += [None, "}}"]
    parts[-1] += '],"status":{"code":0}}' + LINE_END
    return tuple(parts)


def encode_span_fields(context, parent, name: str, kind, start_time: int, end_time: int, attributes, status,
                       events=(), links=()) -> str:
    """``encode_span_json`` from a span's fields: spans that loadlab times itself are encoded without first being
    made into the SDK's ``ReadableSpan``."""
    kinds, codes = _enum_codes()
    return _SPAN_JSON % (
        context.trace_id, context.span_id,
        ',"parentSpanId":"%016x"' % parent.span_id if parent is not None else "",
        _quote(name), kinds.get(id(kind), 0), start_time, end_time,
        _attributes_json(attributes), codes.get(id(status.status_code), 0),
        ',"message":' + _quote(status.description) if status.description else "",
        ',"events":[' + ",".join(
            '{"name":' + _quote(e.name) + ',"timeUnixNano":"' + str(e.timestamp) + '","attributes":'
            + _attributes_json(e.attributes) + "}" for e in events) + "]" if events else "",
        ',"links":[' + ",".join(
            '{"traceId":"' + format(link.context.trace_id, "032x") + '","spanId":"'
            + format(link.context.span_id, "016x") + '","attributes":' + _attributes_json(link.attributes) + "}"
            for link in links) + "]" if links else "")


@functools.cache
def _bounded_types() -> tuple:
    from opentelemetry.attributes import BoundedAttributes
    from opentelemetry.sdk.util import BoundedList

    return BoundedAttributes, BoundedList


def _span_collections(span) -> tuple:
    """A finished span's attributes (a dict), events and links. The SDK's public properties copy each of them on
    every access (a tuple of the events under a lock, a MappingProxy whose items() runs per key in Python); the
    SDK's own fields are read directly when they are what this SDK version keeps, the properties otherwise."""
    BoundedAttributes, BoundedList = _bounded_types()
    attributes, events, links = (getattr(span, "_attributes", None), getattr(span, "_events", None),
                                 getattr(span, "_links", None))
    if isinstance(attributes, BoundedAttributes) and isinstance(getattr(attributes, "_dict", None), dict):
        attributes = attributes._dict
    elif not isinstance(attributes, dict):  # loadlab's own finished spans keep the dict they were given
        attributes = span.attributes
    events = events if isinstance(events, BoundedList) and not events else span.events
    links = links if isinstance(links, (tuple, BoundedList)) and not links else span.links
    return attributes, events, links


_FRAGMENTS: dict = {}       # (key, str value) -> encoded attribute: most values repeat (task names, states, hosts)
_MAX_FRAGMENTS = 4096       # unique values (message ids) pass through; the cache is emptied when full


_STR_ONLY = {str}


def _attributes_json(attributes) -> str:
    if not attributes:
        return "[]"
    fragments = _FRAGMENTS
    parts = []
    for item in attributes.items():
        if item[1].__class__ is not str:  # only strings: True, 1 and 1.0 are equal keys but encode differently
            parts.append(_attribute_json(*item))
            continue
        fragment = fragments.get(item)
        if fragment is None:
            fragment = _attribute_json(*item)
            if len(fragments) >= _MAX_FRAGMENTS:
                fragments.clear()
            fragments[item] = fragment
        parts.append(fragment)
    return "[" + ",".join(parts) + "]"


def _attribute_json(key, value) -> str:
    return '{"key":' + _quote(key) + ',"value":' + _any_value_json(value) + "}"


def _any_value_json(value) -> str:
    if isinstance(value, str):
        return '{"stringValue":' + _quote(value) + "}"
    if isinstance(value, bool):
        return '{"boolValue":' + ("true" if value else "false") + "}"
    if isinstance(value, int):
        return '{"intValue":"' + str(value) + '"}'
    if isinstance(value, float):
        return '{"doubleValue":' + (json.dumps(value) if value == value and abs(value) != float("inf")
                                     else '"' + str(value) + '"') + "}"
    if isinstance(value, (list, tuple)):
        return '{"arrayValue":{"values":[' + ",".join(_any_value_json(v) for v in value) + "]}}"
    return '{"stringValue":' + _quote(str(value)) + "}"
