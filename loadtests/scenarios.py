"""Scenarios: named mixes of reference tasks, user counts and load durations. Defined once; ``loadlab scenarios``,
the CLI, the locustfile and the web UI all read this table."""
from __future__ import annotations

from dataclasses import dataclass, field

from loadlab.config.settings import SettingsError


@dataclass(frozen=True)
class TaskChoice:
    task: str            # short reference task name (loadlab.stack.tasks.TASK_NAMES)
    weight: int
    kwargs: dict = field(default_factory=dict)  # API-level arguments (loadlab.stack.tasks.TASK_ARGS models)


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
    shape: str | None = None      # loadlab.loadtests.shapes.SHAPES key: users change over the run
    open_arrivals: bool = False   # constant arrival rate, latency measured from each intended send time
    payload_stages: tuple[int, ...] = ()  # payload sizes stepped through over the run (payload-sweep)
    chaos: str | None = None      # default --chaos plan of the scenario


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
    Scenario("capacity", "io tasks of a fixed 100 ms offered at 80/s: a stack of known capacity (N pool slots / "
             "100 ms, saturated up to 7 slots) to check what a sweep measures.",
             users=8, spawn_rate=8, duration_s=20, rate_per_user=10, mix=(TaskChoice("io", 1, {"ms": 100}),)),
    Scenario("step", "Users rise in five steps to the peak: find where latency bends.",
             users=20, spawn_rate=20, duration_s=60, rate_per_user=5, mix=SMOKE_MIX, shape="step"),
    Scenario("spike", "A sudden five-fold burst in the middle fifth of the run: does the backlog clear after it?",
             users=25, spawn_rate=50, duration_s=60, rate_per_user=5, mix=SMOKE_MIX, shape="spike"),
    Scenario("soak", "A steady moderate load for a long time (10 min): leaks, drift, recycling.",
             users=5, spawn_rate=5, duration_s=600, rate_per_user=5, mix=SMOKE_MIX),
    Scenario("open", "Constant arrival rate independent of completions; latency from each intended send time "
             "(coordinated omission corrected).",
             users=10, spawn_rate=10, duration_s=30, rate_per_user=5, mix=SMOKE_MIX, open_arrivals=True),
    Scenario("payload-sweep", "Payload task bodies stepping 1 KB → 10 KB → 100 KB → 500 KB: size against cost.",
             users=4, spawn_rate=4, duration_s=40, rate_per_user=5,
             mix=(TaskChoice("payload", 1, {"size_bytes": 1024, "shape": "nested_dicts"}),),
             payload_stages=(1024, 10_240, 102_400, 512_000)),
    Scenario("chaos", "The smoke mix under faults (see --chaos): a pool process and a worker killed, the broker and "
             "the API restarted; the report accounts for every task.",
             users=8, spawn_rate=8, duration_s=40, rate_per_user=5, mix=SMOKE_MIX,
             chaos="kill-worker-child@6s,kill-worker@12s,restart-api@20s,kill-exporter@24s,restart-broker@30s"),
    Scenario("retry-storm", "Flaky tasks failing 60 % of attempts: exercises autoretry, backoff and exhaustion.",
             users=5, spawn_rate=5, duration_s=30, rate_per_user=4,
             mix=(TaskChoice("flaky", 1, {"p": 0.6}),)),
)}


def get_scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise SettingsError(f"scenario {name!r} is not known; use one of {', '.join(SCENARIOS)}.") from None
