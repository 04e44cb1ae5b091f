"""How every bench judges a ratio against its target: one method, so ``met`` means the same in each.

A bench measures the two sides of a ratio side by side in rounds (one round: each side once, close in time), so each
round gives one paired ratio. The figure is the geometric mean of those ratios and its interval a Student-t
confidence interval on their logarithms: the spread between rounds is what the interval is made of, so a machine
whose speed wanders between rounds gets the wide interval it deserves. (A percentile bootstrap of the median, used
before, gave the A/A control of ``bench overhead`` 1.060 [1.010-1.220] on 8 rounds: with few rounds it is far
narrower than the noise it resamples.) Rounds that share something besides the code (``clusters``: the rounds of
one session share a set of stacks) are first averaged per cluster, and the interval comes from the spread between
clusters. Deterministic figures (instruction counts) have no spread: their interval is the value itself.

``verdict``: ``met`` when the whole interval is on the target's good side, ``missed`` when all of it is on the
other, ``not resolved`` otherwise (more rounds narrow the interval). One round cannot show its own noise: with fewer
than two rounds (or clusters) a time-based ratio is ``not resolved`` whatever its value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

CONFIDENCE = 0.95
MET, MISSED, NOT_RESOLVED = "met", "missed", "not resolved"


@dataclass(frozen=True)
class Ratio:
    """A ratio's point estimate and confidence interval (``low``/``high``; infinite when it cannot be judged)."""

    value: float
    low: float
    high: float
    rounds: int

    def verdict(self, target: float, higher_is_better: bool = True) -> str:
        return verdict(self.low, self.high, target, higher_is_better)

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def text(self, digits: int = 3) -> str:
        if math.isinf(self.high):
            return f"{self.value:.{digits}f} [one round: no interval]"
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}-{self.high:.{digits}f}]"


def paired_ratio(ratios: list[float], clusters: list | None = None, confidence: float = CONFIDENCE,
                 deterministic: bool = False) -> Ratio:
    """The geometric mean of per-round ``ratios`` with its Student-t interval on the logs (see the module's text).

    ``clusters``: each ratio's cluster (e.g. its session); with more than one cluster the interval is taken over the
    clusters' means. ``deterministic``: the figures repeat exactly (instruction counts), so equal ratios are the
    value and one round is enough."""
    if not ratios or any(r <= 0 or not math.isfinite(r) for r in ratios):
        raise ValueError(f"ratios must be positive and finite, got {ratios!r}")
    logs = [math.log(r) for r in ratios]
    if clusters is not None and len(set(clusters)) > 1:
        grouped: dict = {}
        for log_ratio, cluster in zip(logs, clusters):
            grouped.setdefault(cluster, []).append(log_ratio)
        logs = [sum(group) / len(group) for group in grouped.values()]
    value = math.exp(sum(logs) / len(logs))
    if len(set(logs)) == 1 and (deterministic or len(logs) > 1):
        return Ratio(value, value, value, len(ratios))
    if len(logs) < 2:
        return Ratio(value, 0.0, math.inf, len(ratios))
    from scipy import stats

    mean = sum(logs) / len(logs)
    spread = stats.sem(logs) * stats.t.ppf((1 + confidence) / 2, len(logs) - 1)
    return Ratio(value, math.exp(mean - spread), math.exp(mean + spread), len(ratios))


def verdict(low: float, high: float, target: float, higher_is_better: bool = True) -> str:
    """``met`` / ``missed`` / ``not resolved`` of the interval [low, high] against ``target`` (a floor when higher is
    better, else a ceiling)."""
    if higher_is_better:
        return MET if low >= target else MISSED if high < target else NOT_RESOLVED
    return MET if high <= target else MISSED if low > target else NOT_RESOLVED


def target_text(target: float, higher_is_better: bool = True, digits: int = 2) -> str:
    return f"{'>=' if higher_is_better else '<='} {target:.{digits}f}"
