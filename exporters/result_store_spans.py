"""The result store's spans: one ``store_result/<task>`` span per store in processes that run tasks (every backend:
Redis, SQL, …), and contrib Redis spans for the producer API's result reads, on its result backend's clients only.

On Redis the contrib instrumentation made two spans of a store (the ``GET`` Celery reads first and the
``SETEX``+``PUBLISH`` pipeline) and was the costliest part of a traced task; SQL backends had no span at all.
"""
from __future__ import annotations

from loadlab.exporters import otel_compat
from loadlab.exporters.traces_file import span_writer_for


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
    finished = otel_compat.finished_spans(tracer, span_writer_for(tracer))
    new_span_id = tracer.id_generator.generate_span_id if finished is not None else None
    new_context = otel_compat.new_span_context()  # the parent's trace id and a generated span id: valid

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
        if finished is None:  # the public API: the same span, started and ended at the measured times
            tracer.start_span(name, kind=client, attributes=attributes, start_time=started).end(end_time=ended)
            return stored
        parent_context = parent.get_span_context()
        span_context = new_context(parent_context[0], new_span_id(), False, parent_context[3], parent_context[4])
        finished(name, span_context, parent_context, attributes, client, started, ended)
        return stored

    traced_store_result.__loadlab_traced__ = True
    traced_store_result.__wrapped__ = store_result
    backend_class.store_result = traced_store_result



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
    every_client = otel_compat.on_redis_backend_clients(RedisBackend,
                                                        lambda client: trace_client_in_traces(client, provider))
    try:
        backend = app.backend
    except Exception:  # noqa: BLE001 - a backend that cannot be built now fails later, where it is used
        return
    if not isinstance(backend, RedisBackend):
        return
    client = backend.__dict__.get("client") if every_client else backend.client  # (a cached property)
    if client is not None:  # built before the patch
        trace_client_in_traces(client, provider)


def trace_client_in_traces(client, provider) -> None:
    """The contrib Redis instrumentation on one client, used only inside a recording span: a command outside any
    trace (or in an unsampled one) goes straight to Redis instead of through a non-recording span, the tracing
    cost of every unsampled task under ``--tracing sampled``."""
    from opentelemetry import trace
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    if getattr(client, "__loadlab_traced__", False):
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
    client.__loadlab_traced__ = True


