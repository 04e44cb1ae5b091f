"""loadlab's own Locust users. ``MixUser`` and its variants publish a scenario's (or a task-mix file's) tasks through
the public ``CeleryUser.publish`` (:mod:`loadlab.loadtests.api`: ``send_task``, the producer as a library, and a
``publish`` request event; ``end_to_end`` events come from the run's recorder as tasks finish, so the task loop never
blocks on results). ``ApiUser`` submits through the producer API and polls the status URL like an HTTP client
would."""
from __future__ import annotations

import random
import time

import gevent
from locust import FastHttpUser, User, task

from loadlab.config.settings import Settings
from loadlab.exporters.ledger import HEADER_INTENDED_AT
from loadlab.loadtests.api import CeleryUser
from loadlab.loadtests.pacing import constant_throughput_random_phase, poisson_gap
from loadlab.loadtests.scenarios import Scenario
from loadlab.loadtests.task_mix import MixTask, TaskMix, load_task_mix
from loadlab.stack.tasks import TASK_ARGS, PayloadArgs, full_name

class _Mix:
    def __init__(self, scenario: Scenario, task_mix: TaskMix | None = None):
        if task_mix is not None:  # the app's own tasks (--tasks): an entry is the args of its publish
            self.choices = [(entry.name, entry) for entry in task_mix.tasks]
            self.weights = [entry.weight for entry in task_mix.tasks]
            return
        self.choices = [(c.task, TASK_ARGS[c.task].model_validate(c.kwargs)) for c in scenario.mix]
        self.weights = [c.weight for c in scenario.mix]

    def pick(self):
        """(name, arguments spec) of the next submission: a task-mix entry, or a reference task's arguments."""
        return random.choices(self.choices, weights=self.weights, k=1)[0]

    def next_publish(self) -> tuple[str, list | tuple, dict, dict]:
        """``CeleryUser.publish``'s task name, args, kwargs and options for the next submission, made before the
        publish is timed."""
        name, spec = self.pick()
        if isinstance(spec, MixTask):  # a task-mix entry: the app's own task under its registered name
            args, kwargs = spec.arguments()
            return name, args, kwargs, spec.options
        return full_name(name), (), spec.call_kwargs(), {}


class MixUser(CeleryUser):
    """Publishes the scenario's mix (or the --tasks mix) through the public ``CeleryUser.publish``."""

    abstract = True
    mix: _Mix

    @task
    def submit(self):
        self.submit_next()

    def submit_next(self) -> None:
        """One submission; subclasses change what and when (the Locust task itself stays the same one)."""
        name, args, kwargs, options = self.mix.next_publish()
        self.publish(name, args, kwargs, **options)


class OpenCeleryUser(MixUser):
    """Open model: each user publishes at Poisson arrivals (mean gap interval_s) whatever happened before. A late
    publish keeps its scheduled time in a header, and latency counts from there (coordinated omission corrected)."""

    abstract = True
    interval_s = 0.1

    def on_start(self):
        self._next_intended = time.time() + poisson_gap(self.interval_s)

    def wait_time(self):
        return max(0.0, self._next_intended - time.time())

    def submit_next(self) -> None:
        intended = self._next_intended
        self._next_intended += poisson_gap(self.interval_s)
        name, args, kwargs, options = self.mix.next_publish()
        self.publish(name, args, kwargs, headers={HEADER_INTENDED_AT: intended}, **options)


class StagedPayloadUser(MixUser):
    """Payload bodies step through sizes as the run goes on (payload-sweep)."""

    abstract = True
    stages: tuple[int, ...] = ()
    stage_s = 10.0
    shape = "nested_dicts"
    _started_at: float | None = None

    def submit_next(self) -> None:
        cls = type(self)
        if cls._started_at is None:
            cls._started_at = time.time()
        index = min(len(self.stages) - 1, int((time.time() - cls._started_at) / self.stage_s))
        arguments = PayloadArgs(size_bytes=self.stages[index], shape=self.shape).call_kwargs()
        self.publish(full_name("payload"), kwargs=arguments)


class ApiUser(FastHttpUser):
    abstract = True
    settings: Settings
    mix: _Mix
    poll_interval_s = 0.05
    poll_deadline_s = 60.0

    @task
    def submit_and_poll(self):
        name, args = self.mix.pick()
        with self.client.post(f"/tasks/{name}", json=args.model_dump(), name=f"/tasks/{name}",
                              catch_response=True) as response:
            if response.status_code != 202:
                response.failure(f"submit answered {response.status_code}")
                return
            status_url = response.json()["status_url"]
        deadline = time.monotonic() + self.poll_deadline_s
        while time.monotonic() < deadline:
            with self.client.get(status_url, name="/tasks/[id]", catch_response=True) as response:
                if response.status_code != 200:
                    response.failure(f"status answered {response.status_code}")
                    return
                if response.json()["state"] in ("SUCCESS", "FAILURE", "REVOKED"):
                    return
            gevent.sleep(self.poll_interval_s)


def build_user_classes(settings: Settings, scenario: Scenario, prefix: str = "") -> list[type[User]]:
    """Concrete user classes for a scenario, carrying the settings (no second source of defaults)."""
    task_mix = load_task_mix(settings)
    mix = _Mix(scenario, task_mix)
    rate = scenario.rate_per_user
    duration_s = settings.duration or scenario.duration_s
    classes: list[type[User]] = []
    celery_weight = round((1 - scenario.api_share) * 100)
    api_weight = 100 - celery_weight
    if task_mix is not None:  # the producer API publishes the reference tasks only
        celery_weight, api_weight = 100, 0
    if celery_weight:
        attrs = {"abstract": False, "settings": settings, "mix": mix, "weight": celery_weight,
                 "__module__": __name__}
        if scenario.open_arrivals:
            base, attrs["interval_s"] = OpenCeleryUser, 1.0 / rate
        elif scenario.payload_stages:
            base = StagedPayloadUser
            attrs.update(stages=scenario.payload_stages, stage_s=duration_s / len(scenario.payload_stages),
                         wait_time=constant_throughput_random_phase(rate))
        else:
            base, attrs["wait_time"] = MixUser, constant_throughput_random_phase(rate)
        classes.append(type(f"{prefix}CeleryTaskUser", (base,), attrs))
    if api_weight and settings.api_url:
        classes.append(type(f"{prefix}ApiTaskUser", (ApiUser,), {
            "abstract": False, "settings": settings, "mix": mix, "weight": api_weight, "host": settings.api_url,
            "wait_time": constant_throughput_random_phase(rate), "__module__": __name__}))
    return classes
