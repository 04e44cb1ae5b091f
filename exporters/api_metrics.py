"""The producer API's /metrics: request count and latency from prometheus-fastapi-instrumentator (the FastAPI
ecosystem's standard: ``http_requests_total{handler,method,status}``, ``http_request_duration_seconds{handler,method}``,
with templated paths so task ids never become labels), plus this process's task metrics (``celery_task_sent_total``,
encode-side serialization) from the metric store."""
from __future__ import annotations

from pathlib import Path

from prometheus_client import REGISTRY

from loadlab.exporters.metrics import STORE

_registered: set[int] = set()


def register_store(registry=REGISTRY) -> None:
    """Expose this process's metric store through ``registry`` (once)."""
    if id(registry) in _registered:
        return
    registry.register(STORE.collector())
    _registered.add(id(registry))


def instrument_api(api, settings) -> None:
    if settings.metrics != "on":
        return
    from prometheus_fastapi_instrumentator import Instrumentator

    Instrumentator(excluded_handlers=["/metrics"], should_group_status_codes=False).instrument(api).expose(
        api, endpoint="/metrics", include_in_schema=False)
    register_store()
    if settings.run_dir and settings.api_port:
        from loadlab.exporters.worker_metrics import write_port_file

        write_port_file(Path(settings.run_dir), "api", "api", settings.api_port, "127.0.0.1")
