"""Celery app factory: every loadlab process (worker, API, Locust, supervisor) builds its app here from Settings."""
from __future__ import annotations

from celery import Celery
from celery.utils.imports import symbol_by_name

from loadlab.config.celery_config import celery_config, use_stack_urls
from loadlab.config.settings import Settings
from loadlab.exporters import ledger_hooks
from loadlab.stack.tasks import register_tasks


def make_app(settings: Settings | None = None, role: str = "producer") -> Celery:
    """The reference app (or the user's ``--app``), configured and with the ledger hooks installed; with
    ``--metrics on`` the metric hooks and timed serializers, with ``--tracing`` the tracing of this process
    (``role="worker"``: of every process that runs tasks, set up by worker signals)."""
    settings = settings or Settings.from_env()
    if settings.app:
        app = symbol_by_name(settings.app)
        use_stack_urls(app, settings)
    else:
        app = Celery("loadlab", broker=settings.broker, backend=settings.backend, set_as_current=True)
        app.conf.update(celery_config(settings))
        register_tasks(app, settings)
    ledger_hooks.install(settings.ledger_url, settings.run_id)
    if settings.metrics == "on":
        from loadlab.exporters import serializers, worker_metrics

        serializers.install()  # before the result backend exists: backends copy the encoder when built
        worker_metrics.install(settings)
    if settings.tracing != "off":
        from loadlab.exporters import tracing

        tracing.install(app, settings, role)
    return app
