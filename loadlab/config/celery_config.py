"""Celery's settings (Celery's own names) derived from loadlab's settings: read by the app factory and by every
process that talks to the broker without running tasks (the exporter service)."""
from __future__ import annotations

import os

from loadlab.config.settings import Settings, mask_url


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
    pin_url_variables(settings.broker, settings.backend)
    if settings.broker:
        app.conf.broker_url = settings.broker
    if settings.backend:
        app.conf.result_backend = settings.backend


def pin_url_variables(broker: str | None, backend: str | None) -> None:
    """Celery reads CELERY_BROKER_URL (and its READ/WRITE variants) and CELERY_RESULT_BACKEND from the environment
    before any app's configuration: a user's shell or container that sets them would send loadlab's apps to that
    broker. Where the environment has them, they are set to the run's URLs, in this process and the ones it
    starts."""
    for variable, url in (("CELERY_BROKER_URL", broker), ("CELERY_BROKER_READ_URL", broker),
                          ("CELERY_BROKER_WRITE_URL", broker), ("CELERY_RESULT_BACKEND", backend)):
        if url and variable in os.environ:
            os.environ[variable] = url


# A loadlab setting given explicitly -> the Celery settings it sets over a user's app (``--app``); a setting left at
# loadlab's default leaves the app's own value alone. ``broker_transport_options.visibility_timeout``: one key of it.
OVER_APP = {
    "serializer": ("task_serializer", "result_serializer", "accept_content", "result_accept_content"),
    "compression": ("task_compression", "result_compression"),
    "prefetch_multiplier": ("worker_prefetch_multiplier",),
    "acks_late": ("task_acks_late", "task_reject_on_worker_lost"),
    "max_tasks_per_child": ("worker_max_tasks_per_child",),
    "queue": ("task_default_queue",),
    "visibility_timeout_s": ("broker_transport_options.visibility_timeout",),
}
_originals: dict[int, dict] = {}  # id(app) -> the app's own values, as it came (before loadlab set anything)


def _read(conf, key: str):
    if "." in key:
        outer, inner = key.split(".", 1)
        return (conf.get(outer) or {}).get(inner)
    return conf.get(key)


def _own_values(app) -> dict:
    from celery.app.defaults import DEFAULTS

    values = _originals.get(id(app))
    if values is None:
        values = _originals[id(app)] = {
            "broker_url": app.conf.broker_url, "result_backend": app.conf.result_backend,
            **{key: _read(app.conf, key) for keys in OVER_APP.values() for key in keys}}
        values["defaults"] = {key: DEFAULTS.get(key) for keys in OVER_APP.values() for key in keys}
    return values


def over_app(app, settings: Settings) -> dict:
    """What loadlab does to a user's app: each Celery setting loadlab can set with the app's own value, loadlab's
    (None: left alone) and the one in effect; the URLs it replaced; the flags the app's configuration contradicts."""
    own = _own_values(app)
    ours = celery_config(settings)
    rows, contradicted = [], []
    for field, keys in OVER_APP.items():
        given = field in settings.explicit
        for key in keys:
            app_value = own[key]
            loadlab_value = _read(ours, key) if given else None
            app_set = app_value != own["defaults"].get(key)
            rows.append({"setting": key, "app": app_value, "loadlab": loadlab_value,
                         "effective": loadlab_value if given else app_value,
                         "by": f"--{field.replace('_', '-')}" if given else ("app" if app_set else "Celery default")})
            if given and app_set and app_value != loadlab_value:
                contradicted.append(f"--{field.replace('_', '-')} sets {key} to {loadlab_value!r} over the app's "
                                    f"{app_value!r}")
    replaced = {}
    for key, run_value in (("broker_url", settings.broker), ("result_backend", settings.backend)):
        if run_value and own[key] != run_value:
            replaced[key] = {"app": mask_url(own[key]), "run": mask_url(run_value)}
    return {"app": settings.app, "settings": rows, "replaced": replaced, "contradicted": contradicted}


def apply_over_app(app, settings: Settings) -> dict:
    """The stack's URLs and every explicitly given loadlab setting over a user's app; returns ``over_app``."""
    description = over_app(app, settings)  # first: it keeps the app's own values
    use_stack_urls(app, settings)
    ours = celery_config(settings)
    for field, keys in OVER_APP.items():
        if field not in settings.explicit:
            continue
        for key in keys:
            if "." in key:
                outer, inner = key.split(".", 1)
                app.conf[outer] = {**(app.conf.get(outer) or {}), inner: _read(ours, key)}
            else:
                app.conf[key] = ours[key]
    return description
