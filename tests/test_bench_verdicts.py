"""The benches' one verdict method (met / missed / not resolved from a confidence interval) and the A/A control."""
from __future__ import annotations

import argparse
import json
import math
import random

import pytest

from loadlab.bench.verdict import MET, MISSED, NOT_RESOLVED, paired_ratio, verdict


def test_a_target_is_met_or_missed_only_when_the_interval_is_on_one_side_of_it():
    around = [0.95, 0.952, 0.948, 0.951, 0.949, 0.953, 0.947, 0.95, 0.951, 0.949]
    tight = paired_ratio(around)
    assert tight.low < 0.95 < tight.high and tight.high - tight.low < 0.01
    assert tight.verdict(0.97) == MISSED and tight.verdict(0.90) == MET
    noisy = paired_ratio([0.85, 1.08, 0.91, 1.02, 0.97, 0.88, 1.05, 0.94, 0.99, 0.9])
    assert noisy.low < 0.97 < noisy.high and noisy.verdict(0.97) == NOT_RESOLVED
    assert paired_ratio([0.85, 1.08, 0.91, 1.02, 0.97, 0.88, 1.05, 0.94, 0.99, 0.9]) == noisy  # no randomness
    # a ceiling (instructions: at most +3 %) reads the other way round
    assert paired_ratio([1.01, 1.012, 1.011]).verdict(1.03, higher_is_better=False) == MET
    assert paired_ratio([1.05, 1.052, 1.051]).verdict(1.03, higher_is_better=False) == MISSED
    assert verdict(1.0, 1.1, 1.03, higher_is_better=False) == NOT_RESOLVED


def test_one_round_shows_no_noise_so_a_timed_ratio_is_not_resolved_and_a_counted_one_is():
    one = paired_ratio([1.5])
    assert one.value == 1.5 and one.verdict(0.9) == NOT_RESOLVED and math.isinf(one.high)
    counted = paired_ratio([1.02], deterministic=True)
    assert (counted.low, counted.high) == (1.02, 1.02) and counted.verdict(1.03, higher_is_better=False) == MET
    with pytest.raises(ValueError, match="positive and finite"):
        paired_ratio([0.0, 1.0])


def test_the_interval_is_as_wide_as_the_noise_between_rounds_and_between_clusters():
    rng = random.Random(1)
    # the wider the rounds scatter, the wider the interval, whatever the point estimate
    narrow = paired_ratio([rng.gauss(1.0, 0.01) for _ in range(10)])
    wide = paired_ratio([rng.gauss(1.0, 0.10) for _ in range(10)])
    assert (wide.high - wide.low) > 5 * (narrow.high - narrow.low)
    # rounds that share a set of stacks are one draw: sessions that disagree widen what the rounds alone would give
    steady = [x for level in (0.93, 0.99, 0.95, 1.01) for x in (level - 0.002, level, level + 0.002)]
    sessions = [k for k in range(4) for _ in range(3)]
    by_round, by_session = paired_ratio(steady), paired_ratio(steady, sessions)
    assert by_session.low < by_round.low and by_session.high > by_round.high
    assert by_session.verdict(0.97) == NOT_RESOLVED and by_round.verdict(0.97) == NOT_RESOLVED
    assert paired_ratio(steady, [0] * len(steady)) == by_round  # one session: the rounds


def _simulated_control(order_of_round, rounds: int, rng: random.Random):
    """An A/A bench on a simulated machine: each turn's throughput is 600/s times noise (3 % per turn, 2 % per
    session's set of stacks), and a turn that follows `all traced` inherits its tail (-5 %). Returns the control's
    interval."""
    from loadlab.bench.overhead import CONFIGS, summarize

    slices = {name: [] for name, *_ in CONFIGS}
    for round_index in range(rounds):
        session = round_index // 2
        if round_index % 2 == 0:
            stack_speed = {name: rng.gauss(1.0, 0.02) for name, *_ in CONFIGS}
        previous = None
        for name, *_ in order_of_round(CONFIGS, round_index):
            speed = 600.0 * stack_speed[name] * rng.gauss(1.0, 0.03) * (0.95 if previous == "all traced" else 1.0)
            slices[name].append({"round": round_index + 1, "session": session, "throughput_per_s": speed,
                                 "p50_ms": 3.0, "cpu_ms_per_task": 2.0})
            previous = name
    return summarize(slices)["bare again"]


def test_the_a_a_control_contains_1_over_repeated_runs_when_the_order_is_drawn_per_round():
    """The bias behind the control's 1.060 [1.010-1.220]: rotating A B C D E keeps each configuration's predecessor,
    so a carry-over from one stack's turn to the next lands on the same configuration every round. Drawn per round,
    it averages out, and the control's interval holds 1 in about 95 % of runs."""
    from loadlab.bench.overhead import rotated, round_order

    rng = random.Random(5)
    runs = 40
    rotating = [_simulated_control(rotated, 20, rng)["throughput_contains_1"] for _ in range(runs)]
    drawn = [_simulated_control(lambda c, r, seed=seed: round_order(c, r, seed), 20, rng)["throughput_contains_1"]
             for seed in range(runs)]
    assert sum(drawn) >= 0.85 * runs, sum(drawn)
    assert sum(rotating) <= 0.5 * runs, sum(rotating)


def test_a_real_a_a_control_reads_1(run_dir):
    """Two bare stacks through the bench itself (short bursts, two sessions): the control's interval contains 1."""
    from loadlab.bench.overhead import CONFIGS, CONTROL, bench

    bare_twice = tuple(c for c in CONFIGS if c[0] in ("bare", CONTROL))
    args = argparse.Namespace(rounds=4, tasks=150, paced_tasks=10, paced_rate=40.0, warmup=50, workers=1,
                              concurrency=1, out=str(run_dir), with_earlier=[])
    record = bench(args, configs=bare_twice)
    control = record["summary"][CONTROL]
    assert {s["session"] for s in record["slices"][CONTROL]} == {1, 2}
    assert json.loads((run_dir / "bench.json").read_text())["summary"][CONTROL] == control
    # the bench's own 95 % intervals of three figures would all hold 1 in only ~86 % of unbiased runs: the test
    # judges the throughput (the figure whose control read 1.060) at 99 %, so an unbiased bench fails it 1 time in 100
    slices, bare = record["slices"][CONTROL], record["slices"]["bare"]
    ratio = paired_ratio([c["throughput_per_s"] / b["throughput_per_s"] for c, b in zip(slices, bare)],
                         [c["session"] for c in slices], confidence=0.99)
    assert ratio.contains(1.0), ratio
