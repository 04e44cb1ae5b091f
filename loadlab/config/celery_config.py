"""Celery's settings (Celery's own names) derived from loadlab's settings: read by the app factory and by every
process that talks to the broker without running tasks (the exporter service)."""
from __future__ import annotations

from loadlab.config.settings import Settings


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


def use_stack_urls(app, settings: Settings) -> None:
    """Point a user's app (``--app``) at the stack's broker and result backend (the embedded ones unless
    --broker/--backend): with its own URLs the load would go where the harness does not watch."""
    if settings.broker:
        app.conf.broker_url = settings.broker
    if settings.backend:
        app.conf.result_backend = settings.backend
