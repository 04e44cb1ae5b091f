"""The load generator's metrics (the process that runs Locust and the run recorder): end-to-end latency of every
finished task, tasks in flight, and what its Celery producer counted (sent, encode-side serialization). Served on
``metrics_host`` (a free port unless ``metrics_port`` is set) and registered as ``ports/loadgen.json``."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily

from loadlab.exporters.api_metrics import register_store
from loadlab.exporters.metrics import INSTRUMENTS, TASKS_IN_FLIGHT

log = logging.getLogger("loadlab.metrics")

Listener = Callable[[str, str, float | None], None]
_served: dict = {"server": None, "in_flight": None}


class _InFlight:
    """``loadlab_tasks_in_flight`` read from the recorder at scrape time."""

    def __init__(self, recorder):
        self.recorder = recorder

    def describe(self):
        return []

    def collect(self):
        if self.recorder is not None:  # a Locust worker (or a master before its first test) follows no ledger
            yield GaugeMetricFamily(TASKS_IN_FLIGHT.name, TASKS_IN_FLIGHT.help, value=self.recorder.outstanding)


def observe_completions(settings, listener: Listener | None = None) -> Listener | None:
    """A recorder completion listener that also feeds ``loadlab_task_end_to_end_seconds`` (metrics on)."""
    if settings.metrics != "on":
        return listener
    end_to_end = INSTRUMENTS.end_to_end

    def on_completion(task: str, state: str, end_to_end_s: float | None) -> None:
        if end_to_end_s is not None:
            end_to_end.labels(task, state).observe(end_to_end_s)
        if listener is not None:
            listener(task, state, end_to_end_s)

    return on_completion


def serve(settings, recorder=None, *, register: bool = True) -> str | None:
    """Expose this process's metrics (and the recorder's in-flight count, when it follows the ledger); returns the
    /metrics URL. Called again with a recorder, it follows that one. ``register=False`` (Locust worker processes,
    stopped before a run's final scrape) leaves out ``ports/loadgen.json``: they are scraped live, by Prometheus."""
    if settings.metrics != "on":
        return None
    register_store()
    if _served["in_flight"] is None:
        _served["in_flight"] = _InFlight(recorder)
        REGISTRY.register(_served["in_flight"])
    _served["in_flight"].recorder = recorder  # one collector per process, following the current run
    server = _served["server"]
    if server is None:
        from prometheus_client import start_http_server

        try:
            server, _thread = start_http_server(settings.metrics_port, addr=settings.metrics_host)
        except OSError as exc:
            log.warning("could not serve the load generator's /metrics (%s); the final scrape is still written", exc)
            return None
        _served["server"] = server
    from loadlab.exporters.worker_metrics import write_port_file

    if settings.run_dir and register:
        write_port_file(Path(settings.run_dir), "loadgen", "loadgen", server.server_port, settings.metrics_host)
    host = "127.0.0.1" if settings.metrics_host in ("", "0.0.0.0", "::") else settings.metrics_host
    return f"http://{host}:{server.server_port}/metrics"


def is_serving() -> bool:
    """Whether this process exposes load-generator metrics (``serve`` ran with metrics on)."""
    return _served["in_flight"] is not None
