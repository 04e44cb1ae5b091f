"""Universal Scalability Law (USL) fit for scaling sweeps.

Gunther's USL models throughput at concurrency ``N`` (workers × concurrency, or whatever the sweep varies) as::

    X(N) = λN / (1 + σ(N − 1) + κN(N − 1))

* ``λ`` (lambda) — throughput of a single unit with no interference;
* ``σ`` (sigma) — contention: the serial fraction (Amdahl's law is the case κ = 0);
* ``κ`` (kappa) — coherency/crosstalk cost, which makes throughput *fall* past ``N_peak = sqrt((1 − σ) / κ)``.

:func:`fit_usl` fits the three parameters with bounded non-linear least squares and decides whether the data really
supports a non-zero κ (see :func:`fit_usl`); :func:`knee` gives the N where adding units stops paying off. The result's
:meth:`UslFit.as_dict` is the ``scaling.usl`` object of ``report.json``.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats
from scipy.optimize import OptimizeWarning, curve_fit

__all__ = [
    "MIN_DISTINCT_N",
    "KAPPA_SIGNIFICANCE",
    "DEFAULT_KNEE_EFFICIENCY",
    "ScalingError",
    "UslFit",
    "fit_usl",
    "knee",
    "usl_section",
]

#: Three parameters need at least one more distinct N than parameters to say anything about the fit's quality.
MIN_DISTINCT_N = 4
#: κ is kept only when it improves the fit this significantly (F-test p-value) over the κ = 0 (Amdahl) model.
KAPPA_SIGNIFICANCE = 0.05
#: Default efficiency threshold of :func:`knee`.
DEFAULT_KNEE_EFFICIENCY = 0.8


class ScalingError(ValueError):
    """The points cannot be fitted; the message is one plain sentence saying what to change."""


def _usl(n: np.ndarray | float, lam: float, sigma: float, kappa: float) -> np.ndarray | float:
    return lam * n / (1.0 + sigma * (n - 1.0) + kappa * n * (n - 1.0))


def _amdahl(n: np.ndarray | float, lam: float, sigma: float) -> np.ndarray | float:
    return _usl(n, lam, sigma, 0.0)


@dataclass(frozen=True)
class UslFit:
    """A fitted USL curve.

    ``n_peak`` is ``math.inf`` when κ = 0 (throughput never falls); ``x_peak`` is then the asymptotic ceiling
    λ/σ (``math.inf`` when σ is 0 too). :meth:`as_dict` turns infinities into ``None`` so the result is valid JSON.
    """

    lam: float
    sigma: float
    kappa: float
    n_peak: float
    x_peak: float
    r2: float

    def predict(self, n: float) -> float:
        """Predicted throughput at ``n`` units."""
        return float(_usl(float(n), self.lam, self.sigma, self.kappa))

    def efficiency(self, n: float) -> float:
        """X(n) / (n·λ): the share of linear scaling left at ``n`` units (1.0 at n = 1)."""
        return self.predict(n) / (float(n) * self.lam)

    def as_dict(self) -> dict[str, float | None]:
        """The ``scaling.usl`` object of ``report.json`` (no inf/nan, so ``json.dumps`` output is strict JSON)."""
        return {
            "lambda": _finite_or_none(self.lam),
            "sigma": _finite_or_none(self.sigma),
            "kappa": _finite_or_none(self.kappa),
            "n_peak": _finite_or_none(self.n_peak),
            "r2": _finite_or_none(self.r2),
        }


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _fmt_n(n: float) -> str:
    return str(int(n)) if float(n).is_integer() else f"{n:g}"


def _validate(points: Sequence[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    try:
        arr = np.asarray([(float(n), float(x)) for n, x in points], dtype=float).reshape(-1, 2)
    except (TypeError, ValueError) as exc:
        raise ScalingError(f"USL points must be (N, throughput) pairs of numbers; got {points!r}.") from exc
    n, x = arr[:, 0], arr[:, 1]
    if not (np.all(np.isfinite(n)) and np.all(np.isfinite(x))):
        raise ScalingError("USL points must be finite numbers; a point has an infinite or missing N or throughput.")
    if np.any(n <= 0):
        raise ScalingError(f"USL points need N greater than zero; got N={_fmt_n(float(n[n <= 0][0]))}.")
    if np.any(x <= 0):
        bad = float(n[x <= 0][0])
        raise ScalingError(
            f"USL points need a throughput greater than zero; the point at N={_fmt_n(bad)} completed nothing, "
            "so check that run before fitting."
        )
    distinct = sorted(set(n.tolist()))
    if len(distinct) < MIN_DISTINCT_N:
        listed = ", ".join(_fmt_n(v) for v in distinct)
        raise ScalingError(
            f"A USL fit needs at least {MIN_DISTINCT_N} distinct points of N; got {len(distinct)} (N={listed}). "
            "Add more values to --workers."
        )
    return n, x


def _initial_guess(n: np.ndarray, x: np.ndarray) -> tuple[float, float, float]:
    """λ from the smallest N (exact when that N is 1), σ and κ from the USL's linearised form.

    With C(N) = X(N)/λ, the USL rearranges to N/C − 1 = σ(N − 1) + κN(N − 1): linear in (σ, κ), so ordinary least
    squares gives a starting point close to the optimum and the bounded solver converges in a few steps.
    """
    i_min = int(np.argmin(n))
    lam0 = float(x[i_min] / n[i_min])
    y = n / (x / lam0) - 1.0
    design = np.column_stack([n - 1.0, n * (n - 1.0)])
    (sigma0, kappa0), *_ = np.linalg.lstsq(design, y, rcond=None)
    sigma0 = float(np.clip(sigma0, 1e-6, 1.0 - 1e-6))
    kappa0 = float(max(kappa0, 1e-9))
    return lam0, sigma0, kappa0


def _fit(func, n: np.ndarray, x: np.ndarray, p0: list[float], lower: list[float], upper: list[float]) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # A parameter sitting on its bound (σ = 0, κ = 0) leaves the covariance undefined; we do not use it.
            warnings.simplefilter("ignore", OptimizeWarning)
            # sigma=x weights residuals relatively: sweep noise is roughly proportional to throughput, and absolute
            # residuals would let the largest N points decide the whole curve.
            params, _ = curve_fit(func, n, x, p0=p0, bounds=(lower, upper), sigma=x, maxfev=20_000)
    except (RuntimeError, ValueError) as exc:
        raise ScalingError(
            f"The USL fit did not converge on these points ({exc}); check the sweep's throughputs."
        ) from exc
    return np.asarray(params, dtype=float)


def _weighted_rss(pred: np.ndarray | float, x: np.ndarray) -> float:
    return float(np.sum(((x - pred) / x) ** 2))


def _keep_kappa(kappa: float, sigma: float, rss_full: float, rss_amdahl: float, n: np.ndarray) -> bool:
    """Does the data support κ > 0 over the Amdahl (κ = 0) model? See :func:`fit_usl`."""
    # The residuals are relative, so these sums are dimensionless: 1e-12 is a relative RMS error of about 1e-6.
    exact = 1e-12
    if kappa <= 0.0 or rss_amdahl <= exact:
        return False  # nothing to keep, or Amdahl already goes through every point
    dof = len(n) - 3
    if rss_full <= exact:
        significant = True  # the USL is exact and Amdahl is not
    elif dof > 0:
        # Extra-sum-of-squares F-test of the 3-parameter model against the nested 2-parameter one.
        f_stat = max(rss_amdahl - rss_full, 0.0) / (rss_full / dof)
        significant = float(stats.f.sf(f_stat, 1, dof)) < KAPPA_SIGNIFICANCE
    else:
        significant = False
    # A fitted peak inside the measured range, with a clearly better fit than Amdahl's, means the data itself turns
    # down (which κ = 0 cannot produce); with only 4–5 points the F-test has too little power to say so.
    visible_peak = math.sqrt((1.0 - sigma) / kappa) <= float(n.max()) and rss_full < 0.5 * rss_amdahl
    return significant or visible_peak


def fit_usl(points: Sequence[tuple[float, float]]) -> UslFit:
    """Fit the USL to ``(N, throughput)`` points (repeated N are allowed and simply weigh more).

    Bounds: λ > 0, 0 ≤ σ ≤ 1, κ ≥ 0. Noise alone can always "explain" itself with a tiny κ, which would predict a
    peak far outside the measured range. So κ is kept only when the data supports it — the full model beats the
    κ = 0 (Amdahl) model by an F-test at p < :data:`KAPPA_SIGNIFICANCE`, or the fitted peak lies within the
    measured N (throughput visibly falls) — and otherwise the Amdahl fit is returned with κ = 0 and no peak.

    Raises :class:`ScalingError` with fewer than :data:`MIN_DISTINCT_N` distinct N, or with N or throughput ≤ 0.
    """
    n, x = _validate(points)
    lam0, sigma0, kappa0 = _initial_guess(n, x)
    lam_lo = lam0 * 1e-9  # strictly positive, far below any plausible value

    lam, sigma, kappa = _fit(_usl, n, x, [lam0, sigma0, kappa0], [lam_lo, 0.0, 0.0], [np.inf, 1.0, np.inf])
    rss_full = _weighted_rss(_usl(n, lam, sigma, kappa), x)

    lam_a, sigma_a = _fit(_amdahl, n, x, [lam0, sigma0], [lam_lo, 0.0], [np.inf, 1.0])
    rss_amdahl = _weighted_rss(_amdahl(n, lam_a, sigma_a), x)

    if not _keep_kappa(kappa, sigma, rss_full, rss_amdahl, n):
        lam, sigma, kappa = lam_a, sigma_a, 0.0

    lam, sigma, kappa = float(lam), float(sigma), float(kappa)
    if kappa > 0.0:
        # N < 1 is meaningless: with σ = 1 the curve already falls from the first unit on.
        n_peak = max(1.0, math.sqrt((1.0 - sigma) / kappa))
        x_peak = float(_usl(n_peak, lam, sigma, kappa))
    else:
        n_peak = math.inf
        x_peak = lam / sigma if sigma > 0.0 else math.inf  # the Amdahl ceiling, approached as N → ∞

    pred = np.asarray(_usl(n, lam, sigma, kappa))
    ss_res = float(np.sum((x - pred) ** 2))
    ss_tot = float(np.sum((x - x.mean()) ** 2))
    if ss_tot > 0.0:
        r2 = 1.0 - ss_res / ss_tot
    else:  # every throughput equal: R² is undefined, so say whether the curve goes through them
        r2 = 1.0 if ss_res <= 1e-12 * float(np.sum(x**2)) else 0.0
    return UslFit(lam=lam, sigma=sigma, kappa=kappa, n_peak=n_peak, x_peak=x_peak, r2=r2)


def knee(
    fit: UslFit,
    points: Sequence[tuple[float, float]] | None = None,
    *,
    threshold: float = DEFAULT_KNEE_EFFICIENCY,
) -> float:
    """The N at which scaling efficiency X(N) / (N·λ) falls to ``threshold`` (default 0.8) on the fitted curve.

    Definition: efficiency is the share of perfectly linear scaling still delivered, so the knee is where each
    unit does only 80 % of the work a lone unit does — past it, added workers mostly add contention. It is
    solved exactly from 1 + σ(N − 1) + κN(N − 1) = 1/threshold; ``math.inf`` when σ = κ = 0 (linear forever).

    ``points`` (the sweep's measurements) are optional: when given, the knee is not reported below the smallest
    measured N, because the curve is only anchored from there on.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"The knee's efficiency threshold must be between 0 and 1; got {threshold}.")
    target = 1.0 / threshold - 1.0  # the denominator's excess over 1 at the knee
    sigma, kappa = fit.sigma, fit.kappa
    if kappa > 0.0:
        # κN² + (σ − κ)N − (σ + target) = 0, positive root.
        b = sigma - kappa
        n_knee = (-b + math.sqrt(b * b + 4.0 * kappa * (sigma + target))) / (2.0 * kappa)
    elif sigma > 0.0:
        n_knee = 1.0 + target / sigma
    else:
        return math.inf
    if points:
        n_min = min(float(n) for n, _ in points)
        n_knee = max(n_knee, n_min)
    return float(n_knee)


def usl_section(points: list[dict]) -> dict:
    """The USL fit of a sweep's points, or the sentence saying why there is none. A point whose backlog did not grow
    measured the load offered, not the stack's capacity: it is left out of the fit (saturated None: not known, kept)."""
    by_n: dict[int, list[float]] = {}
    for p in points:
        if p.get("saturated") is not False:
            by_n.setdefault(p["n"], []).append(p["completed_per_s"])
    pairs = [(n, max(xs)) for n, xs in sorted(by_n.items())]
    unsaturated = sorted({p["n"] for p in points if p.get("saturated") is False} - set(by_n))
    try:
        fit = fit_usl(pairs)
    except ScalingError as exc:
        note = str(exc)
        if unsaturated:
            note = (f"the points at N={', '.join(str(n) for n in unsaturated)} kept up with the load (their backlog "
                    "did not grow), so they measured the load offered, not the capacity; offer more (--users, or a "
                    f"scenario of a higher rate) to fit them. {note}")
        return {"usl": None, "usl_note": note}
    measured_max = max(n for n, _ in pairs)
    predictions = [{"n": n, "completed_per_s": round(fit.predict(n), 3), "prediction": True}
                   for n in (measured_max * 2, measured_max * 4)]
    k = knee(fit, pairs)
    return {"usl": fit.as_dict(), "knee_n": None if k == float("inf") else round(k, 2),
            "predictions": predictions}
