"""USL fit (reports/scaling.py): recovers known parameters, refuses too few points, and stays JSON-safe."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from loadlab.reports.scaling import ScalingError, UslFit, fit_usl, knee

NS = (1, 2, 4, 8, 16, 32)
LAM, SIGMA, KAPPA = 100.0, 0.05, 0.002


def usl(n: float, lam: float, sigma: float, kappa: float) -> float:
    return lam * n / (1 + sigma * (n - 1) + kappa * n * (n - 1))


def synthetic(lam: float, sigma: float, kappa: float, noise: float = 0.005, seed: int = 0) -> list[tuple[float, float]]:
    """Points of a known curve with deterministic multiplicative noise of at most ``noise`` (0.5 % by default)."""
    rng = np.random.default_rng(seed)
    factors = 1 + rng.uniform(-noise, noise, len(NS))
    return [(float(n), usl(n, lam, sigma, kappa) * f) for n, f in zip(NS, factors, strict=True)]


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_known_parameters_from_noisy_points(seed: int) -> None:
    fit = fit_usl(synthetic(LAM, SIGMA, KAPPA, seed=seed))
    assert rel(fit.lam, LAM) < 0.05
    assert rel(fit.sigma, SIGMA) < 0.05
    assert rel(fit.kappa, KAPPA) < 0.05
    assert fit.r2 > 0.99
    assert rel(fit.n_peak, math.sqrt((1 - SIGMA) / KAPPA)) < 0.05
    assert fit.x_peak == pytest.approx(fit.predict(fit.n_peak))


def test_exact_points_give_exact_parameters() -> None:
    fit = fit_usl(synthetic(LAM, SIGMA, KAPPA, noise=0.0))
    assert fit.lam == pytest.approx(LAM, rel=1e-6)
    assert fit.sigma == pytest.approx(SIGMA, rel=1e-6)
    assert fit.kappa == pytest.approx(KAPPA, rel=1e-6)
    assert fit.r2 == pytest.approx(1.0)


def test_lambda_guess_works_when_the_sweep_does_not_start_at_one() -> None:
    points = [(float(n), usl(n, LAM, SIGMA, KAPPA)) for n in (2, 4, 6, 8, 12, 16)]
    fit = fit_usl(points)
    assert rel(fit.lam, LAM) < 1e-3 and rel(fit.sigma, SIGMA) < 1e-2 and rel(fit.kappa, KAPPA) < 1e-2


@pytest.mark.parametrize("noise", [0.0, 0.005])
def test_amdahl_data_has_no_kappa_and_no_peak(noise: float) -> None:
    fit = fit_usl(synthetic(LAM, SIGMA, 0.0, noise=noise))
    assert fit.kappa == pytest.approx(0.0, abs=1e-9)
    assert math.isinf(fit.n_peak)
    assert fit.as_dict()["n_peak"] is None
    assert rel(fit.sigma, SIGMA) < 0.05
    assert fit.x_peak == pytest.approx(fit.lam / fit.sigma)  # the Amdahl ceiling


def test_a_visible_decline_keeps_kappa_even_with_four_points() -> None:
    fit = fit_usl([(1, 100.0), (2, 190.0), (4, 330.0), (8, 300.0)])
    assert fit.kappa > 0
    assert 4 < fit.n_peak < 8


def test_predictions_beyond_the_range_follow_the_model() -> None:
    fit = fit_usl(synthetic(LAM, SIGMA, KAPPA))
    # Past the peak (≈ 21.8) throughput falls, and keeps falling.
    assert fit.predict(16) < fit.predict(fit.n_peak) > fit.predict(32) > fit.predict(64) > fit.predict(128)
    for n in (48.0, 64.0, 100.0):
        assert rel(fit.predict(n), usl(n, LAM, SIGMA, KAPPA)) < 0.05
    amdahl = fit_usl(synthetic(LAM, SIGMA, 0.0))
    # Without κ throughput only rises, towards λ/σ and never past it.
    assert amdahl.predict(32) < amdahl.predict(64) < amdahl.predict(1000) < amdahl.lam / amdahl.sigma


def test_fewer_than_four_distinct_n_is_refused_in_one_sentence() -> None:
    with pytest.raises(ScalingError, match="4") as info:
        fit_usl([(1, 100.0), (2, 180.0)])
    message = str(info.value)
    assert "N=1, 2" in message and "--workers" in message
    # Repeating an N does not count as a new point.
    with pytest.raises(ScalingError, match="at least 4 distinct"):
        fit_usl([(1, 100.0), (1, 101.0), (2, 180.0), (2, 182.0), (4, 300.0)])
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "points",
    [
        [(0, 10.0), (1, 100.0), (2, 180.0), (4, 300.0)],
        [(-1, 10.0), (1, 100.0), (2, 180.0), (4, 300.0)],
        [(1, 100.0), (2, 0.0), (4, 300.0), (8, 400.0)],
        [(1, 100.0), (2, -5.0), (4, 300.0), (8, 400.0)],
        [(1, 100.0), (2, float("nan")), (4, 300.0), (8, 400.0)],
    ],
)
def test_non_positive_or_missing_values_are_refused(points: list[tuple[float, float]]) -> None:
    with pytest.raises(ScalingError):
        fit_usl(points)


def test_as_dict_is_strict_json() -> None:
    for fit in (fit_usl(synthetic(LAM, SIGMA, KAPPA)), fit_usl(synthetic(LAM, SIGMA, 0.0))):
        d = fit.as_dict()
        assert set(d) == {"lambda", "sigma", "kappa", "n_peak", "r2"}
        json.dumps(d, allow_nan=False)  # raises on inf/nan
    linear = UslFit(lam=10.0, sigma=0.0, kappa=0.0, n_peak=math.inf, x_peak=math.inf, r2=float("nan"))
    assert linear.as_dict() == {"lambda": 10.0, "sigma": 0.0, "kappa": 0.0, "n_peak": None, "r2": None}


def test_knee_is_where_efficiency_falls_to_the_threshold() -> None:
    fit = fit_usl(synthetic(LAM, SIGMA, KAPPA))
    n_knee = knee(fit, synthetic(LAM, SIGMA, KAPPA))
    assert 1 < n_knee < fit.n_peak
    assert fit.efficiency(n_knee) == pytest.approx(0.8)
    assert fit.efficiency(n_knee * 0.9) > 0.8 > fit.efficiency(n_knee * 1.1)
    # A stricter threshold comes earlier.
    assert knee(fit, threshold=0.9) < n_knee
    # Amdahl: 1 + σ(N − 1) = 1/0.8  →  N = 1 + 0.25/σ.
    assert knee(fit_usl(synthetic(LAM, SIGMA, 0.0, noise=0.0))) == pytest.approx(1 + 0.25 / SIGMA, rel=1e-6)
    # Perfectly linear scaling never reaches a knee.
    assert math.isinf(knee(UslFit(lam=1.0, sigma=0.0, kappa=0.0, n_peak=math.inf, x_peak=math.inf, r2=1.0)))
    with pytest.raises(ValueError):
        knee(fit, threshold=1.5)


def test_knee_is_not_placed_below_the_first_measured_n() -> None:
    fit = fit_usl(synthetic(LAM, SIGMA, KAPPA))
    assert knee(fit, [(8.0, 600.0), (16.0, 700.0)]) == 8.0


def test_a_sweep_recovers_the_capacity_of_a_stack_whose_capacity_is_known(tmp_path) -> None:
    """The `capacity` scenario offers 80/s of io tasks sleeping a fixed 100 ms to one worker of 1..4 threads: each
    point's capacity is N / 100 ms. The sweep measures it within 10 % (the steady window's completions, whatever
    their send time), marks every point saturated, and fits the USL of those capacities (λ = 10/s, no coherency
    cost). The drain is cut short: the backlog left is not what the test measures."""
    from loadlab.loadtests.scenarios import SCENARIOS
    from tests.conftest import run_cli

    task_s = SCENARIOS["capacity"].mix[0].kwargs["ms"] / 1000
    out = tmp_path / "sweep"
    result = run_cli("sweep", "capacity", "--workers", "1", "--concurrency", "1,2,3,4", "--pool", "threads",
                     "--duration", "4s", "--drain-timeout-s", "1", "--metrics", "off", "--out", str(out), timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    points = report["scaling"]["points"]
    assert [p["n"] for p in points] == [1, 2, 3, 4]
    for p in points:
        capacity = p["n"] / task_s
        assert rel(p["completed_per_s"], capacity) < 0.10, (p, capacity)
        assert p["saturated"] and p["backlog_growth_per_s"] > 0, p
    known = fit_usl([(n, n / task_s) for n in (1, 2, 3, 4)])
    measured = report["scaling"]["usl"]
    fitted = UslFit(lam=measured["lambda"], sigma=measured["sigma"], kappa=measured["kappa"], n_peak=math.inf,
                    x_peak=math.inf, r2=measured["r2"])
    assert rel(fitted.lam, known.lam) < 0.10 and measured["kappa"] == known.kappa == 0.0, (measured, known)
    for n in (1, 2, 3, 4):
        assert rel(fitted.predict(n), known.predict(n)) < 0.10, (n, measured)
    # the sweep's pages and settings describe the sweep and its points, not one run
    summary = (out / "summary.md").read_text()
    assert "Sweep of 4 points" in summary and "concurrency 1,2,3,4" in summary and "None" not in summary, summary
    settings = json.loads((out / "settings.json").read_text())
    assert settings["sweep"]["concurrency"] == [1, 2, 3, 4] and len(settings["points"]) == 4
    assert all((out / p["settings"]).is_file() for p in settings["points"])
    assert report["settings"]["concurrency"] is None and report["settings"]["pool"] is None


def test_points_that_kept_up_with_the_load_are_left_out_of_the_fit() -> None:
    from loadlab.reports.scaling import usl_section

    def point(n, rate, saturated):
        return {"n": n, "completed_per_s": rate, "saturated": saturated}

    capacity = [point(n, usl(n, LAM, SIGMA, 0.0), True) for n in (1, 2, 3, 4)]
    section = usl_section(capacity + [point(8, 200.0, False)])  # N=8 measured the 200/s offered, not its capacity
    assert rel(section["usl"]["lambda"], LAM) < 0.01 and rel(section["usl"]["sigma"], SIGMA) < 0.05
    section = usl_section(capacity[:1] + [point(n, 200.0, False) for n in (2, 3, 4)])
    assert section["usl"] is None and "N=2, 3, 4 kept up with the load" in section["usl_note"]
