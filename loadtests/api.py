"""The public API for writing your own locustfile against your Celery app; run it with loadlab's stack, ledger and
report by ``loadlab run --app pkg.celery:app --locustfile my_locustfile.py`` (or from the web UI, each swarm with its
report, by ``loadlab ui`` with the same two options)::

    from locust import between, task

    from loadlab.loadtests.api import CeleryUser


    class Shopper(CeleryUser):
        wait_time = between(0.05, 0.2)

        @task(3)
        def checkout(self):
            self.publish("shop.tasks.checkout", kwargs={"order_id": 17})

        @task
        def charge(self):
            self.publish("shop.tasks.charge", args=(17, 9.5), queue="billing", countdown=1)

The contract (this module's names are stable; anything else under ``loadlab.*`` may change):

- ``CeleryUser`` is an abstract Locust ``User``: subclass it and write ``@task`` methods as for any Locust user.
  Every concrete ``User`` subclass the locustfile defines (or imports) is run, with Locust's own ``weight`` and
  ``wait_time``; the run's users, spawn rate and duration come from ``loadlab run`` (scenario, ``--users``,
  ``--duration``).
- ``self.publish(task_name, args=(), kwargs=None, **options)`` sends one task by its registered name (the name
  ``loadlab tasks --app …`` lists) with Celery's ``send_task``; ``options`` are ``apply_async``'s (``queue``,
  ``countdown``, ``eta``, ``expires``, ``priority``, ``headers``, …), so the app's own ``task_routes`` apply when no
  ``queue`` is given. It returns the task id, or None when the publish raised (the error is Locust's, below).
- Each publish is counted in the run's ledger: the task is submitted, its phases (publish, queue wait, execution)
  and end-to-end latency, retries and final state are recorded by loadlab's instrumentation of the producing app
  and of the workers, and the report accounts for it (submitted = succeeded + failed + revoked + lost).
- Locust's statistics get one ``publish <task name>`` request per publish (its time: the publish alone, a failure
  when it raised) and one ``end_to_end <task name>`` request per finished task (its time: first publish to the
  result stored, a failure when the task did not succeed), fired by the run's ledger: never wait on a result in a
  user (``AsyncResult.get``) — it would stall the user and the ledger measures it anyway. (loadlab's reference
  tasks are named there without their ``loadlab.`` prefix.)
- Listeners the locustfile adds to ``locust.events`` are called as under the ``locust`` command. ``on_start`` and
  ``on_stop`` are Locust's; an ``on_stop`` of yours calls ``super().on_stop()`` (it gives the user's connection
  back to the pool).
- ``self.settings`` is the run's ``loadlab.config.settings.Settings`` and ``self.app`` the producing Celery app
  (your ``--app``, pointed at the run's broker and instrumented); both are set by the run, not by the locustfile.
"""
from __future__ import annotations

import time

from gevent.lock import Semaphore
from locust import User

from loadlab.config.settings import Settings
from loadlab.loadtests.publisher import HeldProducerPublisher
from loadlab.stack.tasks import short_name

__all__ = ["CeleryUser"]

_celery_apps: dict[int, object] = {}
_celery_apps_lock = Semaphore()


def celery_client(settings: Settings):
    """One Celery app per Locust process and stack, created on first use (after any fork), with a connection pool
    large enough for many greenlets publishing at once."""
    key = id(settings)
    app = _celery_apps.get(key)
    if app is None:
        # building the app yields to other greenlets: without the lock every user that starts meanwhile would
        # build (and instrument) an app of its own
        with _celery_apps_lock:
            app = _celery_apps.get(key)
            if app is None:
                from loadlab.stack.app import make_app

                app = make_app(settings)
                app.conf.broker_pool_limit = max(64, (settings.users or 0) * 2)
                _celery_apps[key] = app
    return app


class CeleryUser(User):
    """A Locust user that publishes tasks of the run's Celery app through loadlab's ledger (see the module's
    docstring for the contract). The built-in users of loadlab's scenarios and task mixes are subclasses too."""

    abstract = True
    settings: Settings  # set by the run on the classes it runs

    _publisher: HeldProducerPublisher | None = None

    @property
    def app(self):
        """The producing Celery app: the run's ``--app`` (or loadlab's reference app), instrumented."""
        return celery_client(self.settings)

    def on_stop(self):
        """Gives the user's held producer back to the pool: a locustfile's own ``on_stop`` calls
        ``super().on_stop()``."""
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.release()

    def publish(self, task_name: str, args=(), kwargs: dict | None = None, **options) -> str | None:
        """Send the task ``task_name`` (its registered name) with ``args``, ``kwargs`` and ``apply_async``'s
        ``options``; the task id, or None when the publish raised (reported to Locust as a failed publish)."""
        publisher = self._publisher
        if publisher is None:
            publisher = self._publisher = HeldProducerPublisher(self.app)
        headers = options.pop("headers", None)
        started = time.perf_counter()
        exception = task_id = None
        try:
            task_id = publisher.send(task_name, args, kwargs, headers, **options)
        except Exception as exc:  # noqa: BLE001 - reported to Locust as a failed publish
            exception = exc
        self.environment.events.request.fire(
            request_type="celery", name=f"publish {short_name(task_name)}",
            response_time=(time.perf_counter() - started) * 1000, response_length=0, exception=exception, context={})
        return task_id
