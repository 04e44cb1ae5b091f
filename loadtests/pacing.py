"""How Locust users pace their sends. Locust's ``constant_throughput`` keeps each user on the phase it spawned at,
so users spawned together fire together every cycle: a thundering herd no real producer makes. Here each closed-loop
user runs at a random phase of its cycle, and open-model users draw Poisson arrivals."""
from __future__ import annotations

import random
import time
from typing import Callable

_DUE = "_loadlab_pacing_due"  # the user's next send time (monotonic seconds)


def constant_throughput_random_phase(task_runs_per_second: float) -> Callable[[object], float]:
    """``constant_throughput`` (one task per cycle of 1/rate seconds, no catching up after a late task) with each
    user's cycle shifted by a random phase drawn uniformly in [0, cycle) after its first task."""
    if task_runs_per_second <= 0:
        raise ValueError(f"constant_throughput_random_phase() requires a positive rate, got: {task_runs_per_second}")
    cycle_s = 1.0 / task_runs_per_second

    def wait_time(user) -> float:
        now = time.monotonic()
        due = user.__dict__.get(_DUE)
        # a task that overran its cycle starts the next one at once, as constant_throughput does
        due = now + random.uniform(0.0, cycle_s) if due is None else max(due + cycle_s, now)
        user.__dict__[_DUE] = due
        return due - now

    wait_time.cycle_s = cycle_s
    return wait_time


def poisson_gap(mean_interval_s: float) -> float:
    """The time to a user's next arrival in a Poisson process of rate 1/mean_interval_s (exponential gaps: the
    superposition of the users' arrivals is Poisson too)."""
    return random.expovariate(1.0 / mean_interval_s)
