"""Locust load shapes of the scenarios. Each is scaled to the run's peak users and duration."""
from __future__ import annotations

from locust import LoadTestShape


class ScaledShape(LoadTestShape):
    """A shape over [0, duration] that the runner gives its peak users and duration."""

    abstract = True
    peak_users = 10
    duration_s = 30.0
    spawn_rate = 10.0

    def fraction(self, progress: float) -> float:  # pragma: no cover - overridden
        raise NotImplementedError

    def tick(self):
        elapsed = self.get_run_time()
        if elapsed >= self.duration_s:
            return None
        users = max(1, round(self.peak_users * self.fraction(elapsed / self.duration_s)))
        return users, self.spawn_rate


class StepShape(ScaledShape):
    """Users rise in five equal steps: where does latency bend?"""

    steps = 5

    def fraction(self, progress: float) -> float:
        return (min(self.steps - 1, int(progress * self.steps)) + 1) / self.steps


class SpikeShape(ScaledShape):
    """A fifth of the users, then all of them for the middle fifth, then a fifth again: does the backlog clear?"""

    def fraction(self, progress: float) -> float:
        return 1.0 if 0.4 <= progress < 0.6 else 0.2


SHAPES = {"step": StepShape, "spike": SpikeShape}


def shape_for(name: str, peak_users: int, duration_s: float, spawn_rate: float) -> LoadTestShape:
    cls = type(f"{name.title()}Shape", (SHAPES[name],), {"abstract": False, "peak_users": peak_users,
                                                         "duration_s": duration_s, "spawn_rate": spawn_rate})
    return cls()
