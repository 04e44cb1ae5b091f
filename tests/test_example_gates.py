"""The example CI gates (loadtests/gates/ci.yml) pass a healthy smoke run: no rule gates a figure the smoke mix's
designed failures move, the chance that a healthy run still fails one is computed and below 0.1 %, and a real run
whose flaky tasks fail for good passes them."""
from __future__ import annotations

import json

import numpy as np
import yaml
from scipy.stats import binom

from loadlab.config.settings import Settings
from loadlab.loadtests.scenarios import get_scenario
from tests.conftest import REPO, run_cli

CI_RULES = REPO / "loadtests" / "gates" / "ci.yml"
# figures a designed failure (a flaky task that used up its retries) moves on a healthy stack
MOVED_BY_DESIGNED_FAILURES = {"tasks.failed", "locust.failures", "retries.exhausted", "verdict"}


def _rules() -> list[dict]:
    return yaml.safe_load(CI_RULES.read_text())["gates"]


def test_no_example_gate_is_moved_by_designed_failures():
    gated = {rule["metric"] for rule in _rules()}
    assert not gated & MOVED_BY_DESIGNED_FAILURES, gated & MOVED_BY_DESIGNED_FAILURES


def test_the_chance_that_a_healthy_smoke_run_fails_the_example_gates_is_below_a_thousandth():
    """On a healthy stack tasks.lost, locust.request_failures and the throughput floor do not vary with chance; the
    p95 rule does, through retried flaky tasks, whose backoff (Celery's full jitter) stretches their end-to-end time.
    p95 exceeds the limit only if more than 5 % of the run's tasks take longer than it: a binomial tail."""
    settings, smoke = Settings(), get_scenario("smoke")
    limit_s = next(r["max"] for r in _rules() if r["metric"] == "latency_ms.end_to_end.p95") / 1000
    weights = {c.task: c.weight for c in smoke.mix}
    flaky = next(c for c in smoke.mix if c.task == "flaky")
    share_flaky = weights["flaky"] / sum(weights.values())
    tasks = int(smoke.users * smoke.rate_per_user * smoke.duration_s)
    # a flaky task's time in backoff: retry k waits U(0, min(max, factor * 2^(k-1))) after each failed attempt
    rng = np.random.default_rng(1)
    samples = 1_000_000
    waited = np.zeros(samples)
    failing = np.ones(samples, dtype=bool)
    for retry in range(1, settings.retry_max_retries + 1):
        failing &= rng.random(samples) < flaky.kwargs["p"]
        cap = min(settings.retry_backoff_max_s, settings.retry_backoff_s * 2 ** (retry - 1))
        waited += np.where(failing, rng.uniform(0, cap, samples), 0.0)
    slow_share = share_flaky * float(np.mean(waited > limit_s))
    allowed_slow = int(0.05 * tasks)  # p95 is over the limit only when more than this many tasks are
    chance = binom.sf(allowed_slow, tasks, slow_share)
    print(f"smoke: {tasks} tasks, {slow_share:.5f} of them past {limit_s:g}s by design; "
          f"P(p95 gate fails on a healthy run) = {chance:.3g}")
    assert chance < 1e-3


def test_a_smoke_run_whose_flaky_tasks_fail_for_good_passes_the_example_gates(tmp_path):
    out = tmp_path / "designed-failures"
    result = run_cli("run", "smoke", "--duration", "8s", "--retry-max-retries", "0", "--gates", str(CI_RULES),
                     "--out", str(out), timeout=240)
    report = json.loads((out / "report.json").read_text())
    assert report["tasks"]["failed"] > 0, "the run was meant to have tasks that failed for good"
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert all(g["passed"] for g in report["gates"])
    assert report["locust"]["failures"] >= report["tasks"]["failed"] and report["locust"]["request_failures"] == 0
    listed = report["failed_tasks"]
    assert len(listed) == report["tasks"]["failed"]
    assert all(f["exception"] == "FlakyError" and f["attempts"] == 1 and f["task"].endswith("flaky") for f in listed)
