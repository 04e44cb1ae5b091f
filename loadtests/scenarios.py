"""Scenarios: named mixes of reference tasks, user counts and load durations. Defined once; ``loadlab scenarios``,
the CLI, the locustfile and the web UI all read this table."""
from __future__ import annotations

from dataclasses import dataclass, field

from stack.settings import SettingsError


@dataclass(frozen=True)
class TaskChoice:
    task: str            # short reference task name (stack.tasks.TASK_NAMES)
    weight: int
    kwargs: dict = field(default_factory=dict)  # API-level arguments (stack.tasks.TASK_ARGS models)


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    users: int
    spawn_rate: float
    duration_s: float
    rate_per_user: float          # tasks per second each user submits (Locust constant_throughput)
    mix: tuple[TaskChoice, ...]
    api_share: float = 0.0        # fraction of users that go through the HTTP API instead of apply_async


SMOKE_MIX = (
    TaskChoice("noop", 4),
    TaskChoice("cpu", 2, {"ms": 5}),
    TaskChoice("io", 2, {"ms": 20}),
    TaskChoice("flaky", 1, {"p": 0.2}),
    TaskChoice("payload", 1, {"size_bytes": 1024, "shape": "nested_dicts"}),
)

SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("smoke", "A short mixed load (noop, cpu, io, flaky, payload) through apply_async and the HTTP API.",
             users=10, spawn_rate=10, duration_s=30, rate_per_user=8, mix=SMOKE_MIX, api_share=0.2),
    Scenario("saturate", "More cpu tasks (5 ms) than the workers can take: measures capacity; used by sweeps.",
             users=10, spawn_rate=10, duration_s=20, rate_per_user=20, mix=(TaskChoice("cpu", 1, {"ms": 5}),)),
    Scenario("retry-storm", "Flaky tasks failing 60 % of attempts: exercises autoretry, backoff and exhaustion.",
             users=5, spawn_rate=5, duration_s=30, rate_per_user=4,
             mix=(TaskChoice("flaky", 1, {"p": 0.6}),)),
)}


def get_scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise SettingsError(f"scenario {name!r} is not known; use one of {', '.join(SCENARIOS)}.") from None
