"""Celery app factory: every loadlab process (worker, API, Locust, supervisor) builds its app here from Settings."""
from __future__ import annotations

import os
import sys

from celery import Celery
from celery.utils.imports import symbol_by_name

from loadlab.config.celery_config import celery_config, use_stack_urls
from loadlab.config.settings import Settings, SettingsError
from loadlab.exporters import ledger_hooks
from loadlab.stack.tasks import register_tasks


def import_user_app(ref: str) -> Celery:
    """The user's Celery app named by ``--app module:attr``, importable from the working directory (the user's
    project) as ``celery -A`` finds it. Raises SettingsError with the sentence."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)  # last: the project's own packages never shadow an installed one
    try:
        app = symbol_by_name(ref)
    except Exception as exc:  # noqa: BLE001 - any import-time error of the user's code is reported the same way
        raise SettingsError(f"--app {ref!r} cannot be imported ({type(exc).__name__}: {exc}); give module:attr of "
                            f"your Celery app, importable from {cwd}.") from None
    if not isinstance(app, Celery):
        raise SettingsError(f"--app {ref!r} is a {type(app).__name__}, not a Celery app; give module:attr of your "
                            "Celery app, e.g. myproject.celery:app.")
    return app


def registered_tasks(settings: Settings) -> dict:
    """Task name -> task of the app the workers run (the user's ``--app`` with its task modules imported, or the
    reference tasks), without Celery's own ``celery.*`` tasks; nothing is connected or instrumented."""
    if settings.app:
        app = import_user_app(settings.app)
        app.loader.import_default_modules()  # the app's include/imports and autodiscover_tasks, as a worker does
    else:
        app = Celery("loadlab-registry", set_as_current=False)
        register_tasks(app, settings)
    return {name: task for name, task in sorted(app.tasks.items()) if not name.startswith("celery.")}


def make_app(settings: Settings | None = None, role: str = "producer") -> Celery:
    """The reference app (or the user's ``--app``), configured and with the ledger hooks installed; with
    ``--metrics on`` the metric hooks and timed serializers, with ``--tracing`` the tracing of this process
    (``role="worker"``: of every process that runs tasks, set up by worker signals)."""
    settings = settings or Settings.from_env()
    if settings.app:
        app = import_user_app(settings.app)
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
