"""Celery's spans: contrib's Celery instrumentation, with a lean path for what it does per task.

Where the contrib code costs more than the stack it watches, this module fills in (every private name of contrib or
the SDK it relies on is reached through ``loadlab.exporters.otel_compat``, which falls back to contrib as published):
- contrib Celery's ``set_attributes_from_context`` sets up to 19 attributes per span one by one, some of them the
  ``str()`` of a dict (``delivery_info``). It is replaced by one ``set_attributes`` call with the attributes people
  query: message id, destination, hostname, state, retries, eta, countdown and expires;
- contrib connects its publish and run handlers as Celery receivers of their own, and Celery unpacks a signal's
  keywords again for each receiver: here they are hooks of loadlab's one receiver per signal
  (``loadlab.exporters.task_signals``), with the ledger's and the metrics', and share one lookup of the task's request;
- unsampled tasks skip contrib's non-recording spans; traced tasks get the same spans built in one call each
  (``LoadlabCeleryInstrumentor`` below).
"""
from __future__ import annotations

import functools
import os
import threading

from celery import signals

from loadlab.exporters import otel_compat, task_signals
from loadlab.exporters.traces_file import span_writer_for


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


def celery_instrumentor_class():
    """loadlab's Celery instrumentor when contrib's internals are as probed (``otel_compat.contrib_celery``) and
    fast paths are on; contrib's ``CeleryInstrumentor`` as published otherwise."""
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    contrib = otel_compat.contrib_celery()
    return CeleryInstrumentor if contrib is None else _lean_instrumentor_class(contrib)


@functools.cache  # one class: contrib's instrumentors are singletons per class
def _lean_instrumentor_class(contrib):
    from time import time_ns

    from opentelemetry import baggage, context, trace
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.sdk.trace import Tracer as SdkTracer
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

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

        lean_path = True  # read by tracing.setup: this instrumentor takes ``unsampled_fast_path``

        def _instrument(self, **kwargs):
            fast = kwargs.pop("unsampled_fast_path", False) and fast_path_possible()
            provider = kwargs.get("tracer_provider")
            self._fast_path = fast
            self._lean = fast_path_possible()
            self._sampler = getattr(provider, "sampler", None)
            # ParentBased(ALWAYS_ON), --tracing all: every root is recorded and sampled, with no trace state
            self._samples_roots = otel_compat.parent_based_delegate(self._sampler, "root") is ALWAYS_ON
            self._ids = getattr(provider, "id_generator", None)
            self._finished = None  # publish spans handed to the processors once sent (an SDK tracer only)
            self._unsampled_runs: dict[str, object] = {}  # task id -> context token
            self._unsampled_publishes: set[str] = set()    # task ids published by the fast path, until after_publish
            if not hasattr(self._ids, "preset"):
                self._fast_path = False
            super()._instrument(**kwargs)
            self._contrib_receivers = contrib.receivers(self)
            (self._contrib_before_publish, self._contrib_after_publish, self._contrib_prerun,
             self._contrib_postrun) = self._contrib_receivers
            tracer = contrib.tracer(self)
            # the per-task handlers run as hooks of loadlab's one receiver per signal (loadlab.exporters.task_signals), not as
            # receivers of their own: Celery unpacks a signal's keywords again for every receiver
            for signal, receiver, hook in self._per_task_hooks():
                signal.disconnect(receiver)
                task_signals.connect(signal, hook)
            self._start_run = None  # run spans built without start_span's generic path (an SDK tracer only)
            self._run_tracer = tracer
            if isinstance(tracer, SdkTracer) and self._sampler is not None and self._ids is not None:
                write_span = span_writer_for(tracer)  # contrib's tracer: its processors and scope
                self._finished = otel_compat.finished_spans(tracer, write_span)
                self._start_run = otel_compat.started_spans(tracer, write_span)

        def _per_task_hooks(self):
            return zip((signals.before_task_publish, signals.after_task_publish, signals.task_prerun,
                        signals.task_postrun), self._contrib_receivers,
                       (self._before_publish_hook, self._after_publish_hook, self._prerun_hook, self._postrun_hook))

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
            self._contrib_before_publish(**arguments)

        def _after_publish_hook(self, arguments):
            headers = arguments.get("headers")
            if self._fast_path and headers is not None and headers.get("id") in self._unsampled_publishes:
                self._unsampled_publishes.discard(headers["id"])
                return
            if self._lean and headers:
                task = task_from_sender(arguments)
                task_id = headers.get("id")
                held = contrib.held_span(task, task_id, is_publish=True)
                if held is not None and held[1] is _LEAN:
                    published, _, token = held
                    contrib.release_span(task, task_id, is_publish=True)
                    context.detach(token)
                    if published is not None:
                        name, span_context, parent, attributes, started = published
                        self._finished(name, span_context, parent, attributes, producer, started, time_ns())
                    return
            self._contrib_after_publish(**arguments)

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
            task = task_from_sender(kwargs)
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
                span_context = otel_compat.new_span_context()(trace_id, self._ids.generate_span_id(), False, TraceFlags(flags))
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
            contrib.hold_span(task, task_id, published, _LEAN, token, is_publish=True)
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
                        return self._contrib_prerun(**arguments)  # a header only contrib's extract reads
                    if self._fast_path and not parent.trace_flags.sampled:
                        self._unsampled_runs[task_id] = context.attach(
                            set_span_in_context(trace.NonRecordingSpan(parent)))
                        return
                if self._lean:
                    return self._run_traced(task, task_id, request, parent)
            self._contrib_prerun(**arguments)

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
                contrib.hold_span(task, task_id, span, _LEAN, token)
                return
            parent_context = set_span_in_context(trace.NonRecordingSpan(parent)) if parent is not None else None
            if start_run is not None:
                span = start_run(f"run/{task.name}", parent_context, consumer, attributes)
            else:
                span = self._run_tracer.start_span(f"run/{task.name}", context=parent_context, kind=consumer,
                                               attributes=attributes)
            token = context.attach(set_span_in_context(span, parent_context))
            contrib.hold_span(task, task_id, span, _LEAN, token)

        def _postrun_hook(self, arguments):
            task_id = arguments.get("task_id")
            token = self._unsampled_runs.pop(task_id, None) if self._fast_path else None
            if token is not None:
                context.detach(token)
                return
            task = arguments.get("task")
            held = contrib.held_span(task, task_id) if self._lean and task_id is not None else None
            if held is not None and held[1] is _LEAN:
                span, _, token = held
                state = arguments.get("state")
                if state and isinstance(state, str):
                    set_string = getattr(span, "set_string_attribute", None)  # a span of ``started_spans``
                    (set_string or span.set_attribute)("celery.state", state)
                span.end()
                contrib.release_span(task, task_id)
                context.detach(token)
                return
            self._contrib_postrun(**arguments)

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
    return otel_compat.new_span_context()(trace_id, span_id, True, trace.TraceFlags(flags))




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


def patch_contrib_helpers() -> None:
    # contrib looks these up on the module at every call
    helpers = otel_compat.contrib_celery_helpers()
    if helpers is None:
        return
    helpers.replace_task_lookup(task_from_sender)  # a fix: a task only known by name keeps its publish span
    if otel_compat.fast_paths():
        helpers.replace_attribute_setter(set_lean_attributes)


