"""Every access loadlab makes to a private name of opentelemetry-sdk, opentelemetry-instrumentation-celery or
Celery, in one place, each behind a probe of the installed version with the public API as its fallback.

Why they exist at all: a traced task's cost is mostly the SDK's and contrib's generic machinery (locks, bounded
copies, per-attribute validation, context lookups), measured in docs/performance.md. The fast paths build the same
spans (ids, flags, parents, attributes, the same OTLP lines) without it. Each one is used only when

- fast paths are on (``Settings.otel_fast_paths``; ``--no-otel-fast-paths`` or ``LOADLAB_OTEL_FAST_PATHS=false``
  turns every one of them off: the public API only), and
- its probe finds the private layout it relies on in the installed version (a probe that fails returns None, and
  the caller takes the public path: a new SDK release degrades to slower, never to wrong).

Nothing outside this module reads or writes a private name of those libraries (tests/test_layout.py checks it).
"""
from __future__ import annotations

import functools
import inspect
import threading

_switch: dict = {"fast_paths": None}  # None: not decided yet (Settings, from the environment, on first use)


def use_fast_paths(enabled: bool) -> None:
    """Set by ``tracing.setup`` from the process's Settings (and by tests that exercise one path or the other)."""
    _switch["fast_paths"] = bool(enabled)


def fast_paths() -> bool:
    if _switch["fast_paths"] is None:
        from loadlab.config.settings import Settings

        _switch["fast_paths"] = Settings().otel_fast_paths
    return _switch["fast_paths"]


# --- API: SpanContext ------------------------------------------------------------------------------------------------
def new_span_context():
    """``new(trace_id, span_id, is_remote, trace_flags, trace_state=None)``: the API's ``SpanContext`` for ids known
    valid (non-zero, 128 and 64 bits). The fast path builds it as the tuple it is (``tuple.__new__``), without its
    constructor's keyword handling and checks: three of them per traced task."""
    from opentelemetry.trace import SpanContext

    def public(trace_id: int, span_id: int, is_remote: bool, trace_flags, trace_state=None):
        return SpanContext(trace_id, span_id, is_remote, trace_flags, trace_state)

    if not fast_paths():
        return public
    return _tuple_span_context() or public


@functools.cache
def _tuple_span_context():
    from opentelemetry.trace import SpanContext, TraceFlags
    from opentelemetry.trace.span import DEFAULT_TRACE_STATE

    new_tuple = tuple.__new__

    def new(trace_id: int, span_id: int, is_remote: bool, trace_flags, trace_state=None):
        return new_tuple(SpanContext, (trace_id, span_id, is_remote, trace_flags,
                                       DEFAULT_TRACE_STATE if trace_state is None else trace_state, True))

    probe = (0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True, TraceFlags(1))
    reference = SpanContext(*probe)
    try:
        made = new(*probe)
    except TypeError:
        return None
    if type(made) is not type(reference) or made != reference or not made.is_valid or made.trace_state != (
            reference.trace_state):
        return None
    return new


# --- SDK: the tracer's processors, scope and sampler ------------------------------------------------------------------
def only_span_processor(tracer):
    """The tracer's one span processor, when it has exactly one (the SDK keeps them in a private tuple); None when
    it has several, or this SDK keeps them otherwise, or fast paths are off."""
    if not fast_paths():
        return None
    processors = getattr(getattr(tracer, "span_processor", None), "_span_processors", None)
    if isinstance(processors, tuple) and len(processors) == 1:
        return processors[0]
    return None


def tracer_scope(tracer):
    """The tracer's ``InstrumentationScope`` (a private field of the SDK's Tracer; public: a tracer's name and
    version as the deprecated ``instrumentation_info``)."""
    scope = getattr(tracer, "_instrumentation_scope", None)
    if scope is not None:
        return scope
    info = getattr(tracer, "instrumentation_info", None)
    if info is None:
        return None
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    return InstrumentationScope(info.name, info.version, getattr(info, "schema_url", None))


def parent_based_delegate(sampler, which: str):
    """A ``ParentBased`` sampler's delegate (``"root"`` or ``"remote_parent_sampled"``), or None (another sampler,
    another SDK layout, fast paths off): then the sampler is asked, as the SDK asks it."""
    from opentelemetry.sdk.trace.sampling import ParentBased

    if not fast_paths() or not isinstance(sampler, ParentBased):
        return None
    return getattr(sampler, "_" + which, None)


def always_on():
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    return ALWAYS_ON


# --- SDK: finished spans ---------------------------------------------------------------------------------------------
def finished_spans(tracer, write_span=None):
    """``finished(name, context, parent, attributes, kind, start_ns, end_ns)``: a span that loadlab timed itself,
    handed to the tracer's span processors as the SDK's ``ReadableSpan`` (the tracer's resource and scope), or to
    ``write_span`` (loadlab's traces.jsonl encoder) when that is given. None when fast paths are off or the tracer
    is not the SDK's: the caller then makes the span with ``start_span`` and ``end``."""
    from opentelemetry.sdk import trace as sdk_trace

    if not fast_paths() or not isinstance(tracer, sdk_trace.Tracer):
        return None
    processor = getattr(tracer, "span_processor", None)
    if write_span is not None:
        from opentelemetry.trace import Status, StatusCode

        unset = Status(StatusCode.UNSET)

        def finished_to_file(name, span_context, parent, attributes, kind, start_time, end_time) -> None:
            if span_context.trace_flags.sampled:
                write_span(span_context, parent, name, kind, start_time, end_time, attributes, unset)

        return finished_to_file
    if processor is None:
        return None
    on_end, resource, scope = processor.on_end, tracer.resource, tracer_scope(tracer)
    ReadableSpan = sdk_trace.ReadableSpan

    def finished(name, span_context, parent, attributes, kind, start_time, end_time) -> None:
        on_end(ReadableSpan(name=name, context=span_context, parent=parent, resource=resource,
                            attributes=attributes, kind=kind, start_time=start_time, end_time=end_time,
                            instrumentation_scope=scope))

    return finished


# --- SDK: live spans built without start_span ------------------------------------------------------------------------
def started_spans(tracer, write_span=None):
    """``start(name, parent_context, kind, attributes)``: what the SDK tracer's ``start_span`` returns — a live SDK
    ``Span`` (sampled by the tracer's sampler, its ids and flags, started at the processors) or a
    ``NonRecordingSpan`` — built without ``start_span``'s generic path: no parent lookup through the context, no
    tracer self-metrics (loadlab exports no SDK metrics), and the attributes (already valid: str, bool, int, float)
    put in place instead of cleaned one by one. ``start(..., sampled_remote_parent=span_context)`` with
    ``parent_context`` None, when ``start.decides_sampled_remote``: a child of a sampled parent from a message, whose
    sampling decision is known without the sampler. With ``write_span`` (the tracer's only processor is loadlab's
    traces.jsonl writer) the span writes itself there when it ends. The run span stays a full SDK span: contrib's
    failure and retry handlers and the task's own code record onto it.

    None when fast paths are off, or this SDK's ``Span`` keeps other fields than the ones set here (another SDK
    version): then ``start_span`` is used."""
    from threading import Lock
    from time import time_ns

    from opentelemetry import trace
    from opentelemetry.attributes import BoundedAttributes
    from opentelemetry.sdk import trace as sdk_trace
    from opentelemetry.sdk.util import BoundedList

    span_class = getattr(sdk_trace, "_Span", None)  # the class the SDK's tracer instantiates
    if not fast_paths() or not isinstance(tracer, sdk_trace.Tracer) or not isinstance(span_class, type):
        return None
    limits = getattr(tracer, "_span_limits", None)
    processor, sampler, ids = tracer.span_processor, tracer.sampler, tracer.id_generator
    if limits is None:
        return None
    # the fields every span shares (the SDK's Span.__init__ sets each of them)
    shared = {"_kind": trace.SpanKind.INTERNAL, "_instrumentation_info": tracer.instrumentation_info,
              "_instrumentation_scope": getattr(tracer, "_instrumentation_scope", None), "_end_time": None,
              "_resource": tracer.resource, "_status": trace.Status(trace.StatusCode.UNSET), "_sampler": sampler,
              "_trace_config": None, "_record_exception": True, "_set_status_on_exception": True,
              "_span_processor": processor, "_limits": limits, "_record_end_metrics": None}
    per_span = ("_name", "_context", "_parent", "_start_time", "_lock", "_attributes", "_events", "_links")
    try:
        reference = span_class("reference", trace.INVALID_SPAN_CONTEXT, limits=limits)
        probe = BoundedAttributes(1, None, immutable=False)
    except TypeError:
        return None
    # fields an SDK release added that this one lacks (``_record_end_metrics`` arrived after 1.30) are left out
    shared = {name: value for name, value in shared.items() if name in vars(reference)}
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
    if write_span is not None:
        span_class = _span_writing_itself(span_class, write_span)
    new_span = object.__new__
    random_flag = getattr(trace.TraceFlags, "RANDOM_TRACE_ID", 0)  # W3C level 2, newer APIs
    get_current_span, SpanContext, TraceFlags = trace.get_current_span, trace.SpanContext, trace.TraceFlags
    new_context = new_span_context()

    # ParentBased with the default delegate for a sampled remote parent (ALWAYS_ON; both --tracing modes): a span
    # whose parent came sampled in the message is recorded and sampled, with the parent's trace state. The SDK's
    # sampler would say so through two context lookups and two result objects per task.
    decides_sampled_remote = (write_span is not None
                              and parent_based_delegate(sampler, "remote_parent_sampled") is always_on())

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
            bounded.update(given)  # limits to apply: the mapping's own checks, one item at a time
        span = new_span(span_class)
        fields = span.__dict__
        fields.update(shared)
        fields.update(_name=name, _context=span_context, _parent=parent, _kind=kind, _start_time=time_ns(),
                      _lock=Lock(), _attributes=bounded)
        if write_span is None:  # the traces file's processor does nothing at start
            processor.on_start(span, parent_context=parent_context)
        return span

    start.decides_sampled_remote = decides_sampled_remote
    return start


def _span_writing_itself(span_class, write_span):
    """The SDK's span class, but one that writes itself with ``write_span`` when it ends, from its own fields: the
    SDK's ``end`` copies every field into a ``ReadableSpan`` first, for processors that keep spans."""
    import logging
    from time import time_ns

    log = logging.getLogger("loadlab.tracing")

    class SpanWritingItself(span_class):
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
                write_span(self._context, self._parent, self._name, self._kind, self._start_time, self._end_time,
                           self._attributes._dict, self._status, fields.get("_events", ()), fields.get("_links", ()))

    return SpanWritingItself


# --- opentelemetry-instrumentation-celery ----------------------------------------------------------------------------
class ContribCelery:
    """contrib Celery's internals that the lean path uses: its per-task span store (``utils.attach_context`` and
    friends), its four per-task receivers (``_trace_before_publish``…), its tracer, and the module-level helpers it
    looks up at every call (``utils.set_attributes_from_context``, ``utils.retrieve_task_from_sender``)."""

    RECEIVERS = ("_trace_before_publish", "_trace_after_publish", "_trace_prerun", "_trace_postrun")

    def __init__(self, utils):
        self.utils = utils
        # contrib's per-task store (on the task object): hold a span with its activation and context token, find
        # it again, let it go
        self.hold_span, self.held_span, self.release_span = (utils.attach_context, utils.retrieve_context,
                                                             utils.detach_context)

    @staticmethod
    def receivers(instrumentor) -> tuple:
        """The instrumentor's receivers of before_task_publish, after_task_publish, task_prerun, task_postrun."""
        return tuple(getattr(instrumentor, name) for name in ContribCelery.RECEIVERS)

    @staticmethod
    def tracer(instrumentor):
        return getattr(instrumentor, "_tracer", None)

    def replace_attribute_setter(self, set_attributes_from_context) -> None:
        self.utils.set_attributes_from_context = set_attributes_from_context

    def replace_task_lookup(self, retrieve_task_from_sender) -> None:
        self.utils.retrieve_task_from_sender = retrieve_task_from_sender


@functools.cache
def _contrib_celery() -> ContribCelery | None:
    try:
        import opentelemetry.instrumentation.celery as contrib
        from opentelemetry.instrumentation.celery import CeleryInstrumentor, utils
    except ImportError:
        return None
    needed = ("attach_context", "retrieve_context", "detach_context", "retrieve_task_from_sender",
              "set_attributes_from_context")
    if not all(callable(getattr(utils, name, None)) for name in needed):
        return None
    if not all(callable(getattr(CeleryInstrumentor, name, None)) for name in ContribCelery.RECEIVERS):
        return None
    try:
        attach = inspect.signature(utils.attach_context).parameters
        source = inspect.getsource(contrib)
    except (TypeError, ValueError, OSError):
        return None
    if list(attach)[:5] != ["task", "task_id", "span", "activation", "token"] or "is_publish" not in attach:
        return None
    # the helpers are replaced on the module: only worth it while contrib looks them up there at every call
    if "utils.set_attributes_from_context(" not in source or "utils.retrieve_task_from_sender(" not in source:
        return None
    return ContribCelery(utils)


def contrib_celery() -> ContribCelery | None:
    """contrib Celery's internals for the lean path: when fast paths are on and this version has them as probed;
    None otherwise (then contrib's ``CeleryInstrumentor`` runs as published)."""
    return _contrib_celery() if fast_paths() else None


def contrib_celery_helpers() -> ContribCelery | None:
    """The same internals whatever the switch says, for what is a fix rather than a fast path (contrib's task lookup,
    which loses the publish span of a task this process does not register); None when the probe fails."""
    return _contrib_celery()


# --- Celery: the Redis result backend's clients ----------------------------------------------------------------------
_patch_lock = threading.Lock()


def on_redis_backend_clients(backend_class, on_client) -> bool:
    """Call ``on_client(client)`` for every Redis client the backend class creates from now on (Celery builds one
    backend, and so one client, per thread). It wraps ``RedisBackend._create_client``, Celery's private factory:
    not a fast path but the only hook there is, so the switch leaves it on. False when Celery has no such factory
    (the caller then instruments only the client of the backend it holds)."""
    create_client = getattr(backend_class, "_create_client", None)
    if not callable(create_client):
        return False
    with _patch_lock:
        if getattr(create_client, "__loadlab_traced__", False):
            return True

        def _create_client(self, *args, **kwargs):
            client = create_client(self, *args, **kwargs)
            on_client(client)
            return client

        _create_client.__loadlab_traced__ = True
        backend_class._create_client = _create_client
    return True
