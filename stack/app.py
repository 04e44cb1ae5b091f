"""Celery app factory: every loadlab process (worker, API, Locust, supervisor) builds its app here from Settings."""
from __future__ import annotations

import os
import sys

from celery import Celery
from celery.utils.imports import symbol_by_name

from loadlab.config.celery_config import apply_over_app, celery_config, pin_url_variables
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
        apply_over_app(app, settings)  # the stack's URLs, and the loadlab settings given, over the app's own
    else:
        pin_url_variables(settings.broker, settings.backend)
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


def app_queues(settings: Settings) -> list[str]:
    """The queues a user's app declares (task_queues), routes its tasks to (task_routes, a task's own queue) and
    defaults to (task_default_queue, or --queue when given)."""
    app = import_user_app(settings.app)
    tasks = registered_tasks(settings)
    default = settings.queue if "queue" in settings.explicit else (app.conf.task_default_queue or settings.queue)
    names = [default]
    for queue in app.conf.task_queues or ():
        names.append(getattr(queue, "name", None) or (queue.get("name") if isinstance(queue, dict) else str(queue)))
    router = app.amqp.router
    for name, task in tasks.items():
        if getattr(task, "queue", None):
            names.append(getattr(task.queue, "name", task.queue))
        try:
            routed = router.route({}, name, args=(), kwargs={})
        except Exception:  # noqa: BLE001 - a router of the user's that needs real arguments: that task is skipped
            continue
        queue = routed.get("queue")
        names.append(getattr(queue, "name", queue))
    return [n for n in dict.fromkeys(names) if n]
