"""Celery app factory: every loadlab process (worker, API, Locust, supervisor) builds its app here from Settings."""
from __future__ import annotations

from celery import Celery
from celery.utils.imports import symbol_by_name

from reports import task_hooks
from stack.settings import Settings
from stack.tasks import register_tasks


def celery_config(settings: Settings) -> dict:
    """Celery settings (Celery's own names) derived from loadlab's settings."""
    compression = None if settings.compression == "none" else settings.compression
    return {
        "task_serializer": settings.serializer,
        "result_serializer": settings.serializer,
        "accept_content": settings.accept_content,
        "result_accept_content": settings.accept_content,
        "task_compression": compression,
        "result_compression": compression,
        "worker_prefetch_multiplier": settings.prefetch_multiplier,
        "task_acks_late": settings.acks_late,
        # with acks_late a task whose worker died is redelivered instead of being marked failed
        "task_reject_on_worker_lost": settings.acks_late,
        "worker_max_tasks_per_child": settings.max_tasks_per_child or None,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "broker_connection_retry_on_startup": True,
        # fail fast rather than hang when the broker is gone: the API turns this into a 503
        "broker_connection_timeout": 2.0,
        "broker_transport_options": {"socket_connect_timeout": 2, "socket_timeout": 10, "max_retries": 1,
                                     "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5,
                                     "visibility_timeout": settings.visibility_timeout_s,
                                     # kombu sweeps for unacknowledged tasks every interval x throttle seconds
                                     # (10 x 10 by default): with a short visibility timeout a dead worker's tasks
                                     # would otherwise wait 100 s; a sweep is one ZRANGE on a small sorted set
                                     "unacked_restore_interval": restore_sweep_interval_s(settings),
                                     "unacked_restore_throttle": 1},
        "redis_socket_connect_timeout": 2,
        "redis_socket_timeout": 10,
        "result_backend_transport_options": {"retry_policy": {"timeout": 2.0}},
        "result_extended": True,
        "result_expires": 3600,
        "task_default_queue": settings.queue,
        "broker_pool_limit": 64,
        "database_engine_options": {"pool_pre_ping": True},
    }


def restore_sweep_interval_s(settings: Settings) -> int:
    """Seconds between kombu's sweeps for unacknowledged Redis messages: a quarter of the visibility timeout, 1..10 s,
    so a task left by a killed worker is redelivered at most ~1.25 visibility timeouts after its delivery."""
    return max(1, min(10, settings.visibility_timeout_s // 4))


def make_app(settings: Settings | None = None, role: str = "producer") -> Celery:
    """The reference app (or the user's ``--app``), configured and with the ledger hooks installed; with
    ``--metrics on`` the metric hooks and timed serializers, with ``--tracing`` the tracing of this process
    (``role="worker"``: of every process that runs tasks, set up by worker signals)."""
    settings = settings or Settings.from_env()
    if settings.app:
        app = symbol_by_name(settings.app)
    else:
        app = Celery("loadlab", broker=settings.broker, backend=settings.backend, set_as_current=True)
        app.conf.update(celery_config(settings))
        register_tasks(app, settings)
    task_hooks.install(settings.ledger_url, settings.run_id)
    if settings.metrics == "on":
        from exporters import serializers, worker_metrics

        serializers.install()  # before the result backend exists: backends copy the encoder when built
        worker_metrics.install(settings)
    if settings.tracing != "off":
        from exporters import tracing

        tracing.install(app, settings, role)
    return app
