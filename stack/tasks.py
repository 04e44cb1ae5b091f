"""The reference tasks and their argument models, defined once: the API validates with these models, scenarios
build kwargs with them, and workers register the tasks from ``register_tasks``."""
from __future__ import annotations

import functools
import random
import time

from pydantic import BaseModel, ConfigDict, Field

from loadlab.exporters.ledger_hooks import body_finished
from loadlab.stack.payloads import PayloadShape, make_body

TASK_PREFIX = "loadlab."


class FlakyError(Exception):
    """Raised by the ``flaky`` task on purpose; retried by ``autoretry_for``."""


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def call_kwargs(self) -> dict:
        return self.model_dump()


class NoopArgs(_Args):
    pass


class CpuArgs(_Args):
    ms: float = Field(5.0, ge=0, le=60_000, description="CPU time to burn, milliseconds")


class IoArgs(_Args):
    ms: float = Field(20.0, ge=0, le=60_000, description="Time to sleep, milliseconds")


class FlakyArgs(_Args):
    p: float = Field(0.2, ge=0, le=1, description="Probability that an attempt fails")


class PayloadArgs(_Args):
    size_bytes: int = Field(1024, ge=0, le=8 * 1024 * 1024, description="Body size (JSON bytes)")
    shape: PayloadShape = "flat_strings"

    def call_kwargs(self) -> dict:
        return {"body": make_body(self.shape, self.size_bytes)}


TASK_ARGS: dict[str, type[_Args]] = {
    "noop": NoopArgs,
    "cpu": CpuArgs,
    "io": IoArgs,
    "flaky": FlakyArgs,
    "payload": PayloadArgs,
}
TASK_NAMES = tuple(TASK_ARGS)


def full_name(short: str) -> str:
    return TASK_PREFIX + short


def short_name(name: str) -> str:
    return name.removeprefix(TASK_PREFIX)


def _timed(body):
    """Mark the moment the body returns (or raises), so execution time excludes the result store."""

    @functools.wraps(body)
    def run(*args, **kwargs):
        try:
            return body(*args, **kwargs)
        finally:
            body_finished()

    return run


def register_tasks(app, settings) -> dict:
    """Register the reference tasks on ``app`` with the retry policy from ``settings``. Not shared: Celery would
    add a shared task to every app made later in the process, so the next app (a sweep's next point, another
    stack) would run this app's callables, with this app's settings."""

    @app.task(name=full_name("noop"), shared=False)
    @_timed
    def noop():
        return None

    @app.task(name=full_name("cpu"), shared=False)
    @_timed
    def cpu(ms: float = 5.0):
        deadline = time.thread_time() + ms / 1000.0
        spins = 0
        while time.thread_time() < deadline:
            spins += 1
        return spins

    @app.task(name=full_name("io"), shared=False)
    @_timed
    def io(ms: float = 20.0):
        time.sleep(ms / 1000.0)
        return ms

    @app.task(
        name=full_name("flaky"),
        shared=False,
        bind=True,
        autoretry_for=(FlakyError,),
        max_retries=settings.retry_max_retries,
        retry_backoff=settings.retry_backoff_s,
        retry_backoff_max=settings.retry_backoff_max_s,
        retry_jitter=settings.retry_jitter,
        default_retry_delay=0,  # used when retry_backoff_s is 0: retry at once
    )
    @_timed
    def flaky(self, p: float = 0.2):
        if random.random() < p:
            raise FlakyError(f"attempt {self.request.retries + 1} failed on purpose (p={p})")
        return self.request.retries

    @app.task(name=full_name("payload"), shared=False)
    @_timed
    def payload(body=None):
        return body

    return {"noop": noop, "cpu": cpu, "io": io, "flaky": flaky, "payload": payload}


def retry_limits(app) -> dict[str, int | None]:
    """Each registered task's ``max_retries`` (Celery's own tasks left out), by name: a task that failed after this
    many retries used them up. A user's app declares its own; None retries for ever."""
    return {name: task.max_retries for name, task in app.tasks.items() if not name.startswith("celery.")}


def declared_retry_policies(app) -> dict[str, dict]:
    """The retry policy of each task that retries by itself (``autoretry_for``), by name, as the report shows it."""
    policies = {}
    for name, task in sorted(app.tasks.items()):
        if name.startswith("celery.") or not getattr(task, "autoretry_for", None):
            continue
        backoff = getattr(task, "retry_backoff", False)
        policies[name] = {
            "max_retries": task.max_retries,
            # Celery's autoretry takes True as a factor of 1 and rounds a number to an integer >= 1
            "backoff_factor_s": max(1, int(backoff)) if backoff else 0,
            "backoff_max_s": getattr(task, "retry_backoff_max", None) if backoff else None,
            "jitter": getattr(task, "retry_jitter", None) if backoff else None,
            "delay_s": None if backoff else task.default_retry_delay,
        }
    return policies


def retry_policy(settings) -> dict:
    """The flaky task's backoff policy as the report shows it."""
    return {
        "max_retries": settings.retry_max_retries,
        # Celery's autoretry rounds the factor to an integer >= 1; 0 disables backoff (immediate retries)
        "backoff_factor_s": max(1, settings.retry_backoff_s) if settings.retry_backoff_s else 0,
        "backoff_max_s": settings.retry_backoff_max_s,
        "jitter": settings.retry_jitter,
    }
