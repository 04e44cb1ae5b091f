"""OpenTelemetry tracing of the stack: one trace per submitted task, API request -> publish -> run -> result store.

The contrib instrumentations do the spans: Celery (publish and run, context in the message headers), FastAPI (the
API request) and Redis — on the API's result backend client only, so a status lookup shows up inside its request
span while the broker's polling and the harness's own ledger pushes stay out of the traces.

What this module does is set up: per pool child, the provider, the span processor's thread and the Celery
instrumentation are set up in ``worker_process_init`` (never in the prefork MainProcess, which runs no task and must
not fork with a live exporter thread); threads/solo/gevent pools set up in the MainProcess at ``worker_init``; a
child that exits (``max_tasks_per_child`` recycling included) leaves through ``os._exit``, so no atexit handler runs
and the batch processor's queued spans would be lost: ``worker_process_shutdown`` flushes them. The spans themselves:
``celery_spans`` (publish and run), ``result_store_spans`` (the result store), ``traces_file`` (traces.jsonl);
every private name of the libraries they use is reached through ``otel_compat``.

``--tracing all`` samples every trace, ``sampled`` keeps ``trace_sample_ratio`` of new traces (parent-based: a task
follows the decision of whoever published it). Spans go over OTLP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set
(``OTEL_EXPORTER_OTLP_PROTOCOL`` grpc or http/protobuf), otherwise to ``<run_dir>/traces.jsonl``: one finished span
per line, as an OTLP JSON ``TracesData`` document, appended with one ``O_APPEND`` write per batch so that lines from
several processes never interleave.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from celery import signals

from loadlab.exporters import otel_compat
from loadlab.exporters.celery_spans import celery_instrumentor_class, patch_contrib_helpers, preset_trace_ids
from loadlab.exporters.result_store_spans import instrument_result_backend, trace_result_store
from loadlab.exporters.traces_file import TRACES_FILE, JsonLinesSpanExporter, JsonLinesSpanProcessor

log = logging.getLogger("loadlab.tracing")

__all__ = ["TRACES_FILE", "install", "instrument_api", "sampler", "setup"]
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

    otel_compat.use_fast_paths(settings.otel_fast_paths)
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
    patch_contrib_helpers()
    instrumentor = celery_instrumentor_class()()
    if hasattr(instrumentor, "lean_path"):  # loadlab's: contrib's internals as probed
        instrumentor.instrument(tracer_provider=provider, unsampled_fast_path=settings.tracing == "sampled")
    else:
        instrumentor.instrument(tracer_provider=provider)
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


