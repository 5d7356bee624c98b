"""Onset times τ_mem and τ_gen of one run, and power-law fits τ ∝ P^b across runs with bootstrap intervals.

Definitions (stated in the sweep report):

- τ_mem: the first training step at which the fraction of generated samples that are exact copies of a
  training string (``frac_exact_copy``) reaches ``mem_threshold``;
- τ_gen: the first training step at which the fraction of generated samples that are valid strings of
  the grammar *not* in the training set (``frac_novel_valid``) reaches ``gen_threshold``.

Evaluations are log-spaced, so the crossing is interpolated linearly in log(step) between the last
evaluation below the threshold and the first one at or above it. A run that never reaches the threshold
has τ = NaN ("not reached": censored at its last step).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protomem.memorization.tracking import onset_step

__all__ = ["onset_step"]

MEM_COLUMN = "frac_exact_copy"
GEN_COLUMN = "frac_novel_valid"
DEFAULT_MEM_THRESHOLD = 0.1
DEFAULT_GEN_THRESHOLD = 0.1


@dataclass(frozen=True)
class PowerLawFit:
    """log τ = intercept + slope · log P, fitted by least squares over runs with a finite τ.

    Attributes:
        ci_low, ci_high: 95% bootstrap percentile interval of the slope.
        n_runs: runs used; n_sizes: distinct P among them; n_censored: runs excluded (τ not reached).
        method: how the interval was computed (bootstrap-t over runs, or a fallback).
    """

    slope: float
    intercept: float
    ci_low: float
    ci_high: float
    n_runs: int
    n_sizes: int
    n_censored: int
    method: str

    def predict(self, sizes: np.ndarray) -> np.ndarray:
        return np.exp(self.intercept + self.slope * np.log(np.asarray(sizes, dtype=np.float64)))


def _slopes(log_x: np.ndarray, log_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares slope of each row and its standard error: (B, n) arrays -> (B,), (B,).

    NaN where x has no spread; the standard error needs n >= 3 (NaN otherwise).
    """
    n = log_x.shape[1]
    dx = log_x - log_x.mean(axis=1, keepdims=True)
    dy = log_y - log_y.mean(axis=1, keepdims=True)
    var = (dx * dx).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.where(var > 1e-12, (dx * dy).sum(axis=1) / var, np.nan)
        residual = dy - slope[:, None] * dx
        se = (
            np.sqrt((residual * residual).sum(axis=1) / (n - 2) / var)
            if n > 2
            else np.full(slope.shape, np.nan)
        )
    return slope, se


def fit_power_law(
    sizes: np.ndarray, taus: np.ndarray, n_resamples: int = 2000, seed: int = 0
) -> PowerLawFit | None:
    """Fit τ ∝ P^slope on log-log axes with a bootstrap 95% interval; None if under 2 distinct P.

    The interval is a studentized (bootstrap-t) interval over resampled runs: with the ~10 runs of a
    sweep, plain percentile intervals cover the true slope only ~90% of the time, bootstrap-t ~95%
    (checked by simulation). The interval needs runs at 3 or more distinct P (with two, a line through
    two clusters has no spread to resample); resamples with fewer than 3 distinct P are dropped. Without
    residual spread (a perfect fit) it falls back to the percentile interval.
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    taus = np.asarray(taus, dtype=np.float64)
    ok = np.isfinite(taus) & (taus > 0) & np.isfinite(sizes) & (sizes > 0)
    n_censored = int((~ok).sum())
    x, y = np.log(sizes[ok]), np.log(taus[ok])
    distinct = np.unique(x)
    if distinct.size < 2:
        return None
    slopes, ses = _slopes(x[None], y[None])
    slope, se = float(slopes[0]), float(ses[0])
    intercept = float(y.mean() - slope * x.mean())
    low = high = float("nan")
    method = "none (needs runs at 3 or more training-set sizes)"
    if distinct.size >= 3:
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, x.size, size=(n_resamples, x.size))
        spread = (np.diff(np.sort(x[picks], axis=1), axis=1) > 0).sum(axis=1) + 1
        picks = picks[spread >= 3]
        boot, boot_se = _slopes(x[picks], y[picks])
        with np.errstate(invalid="ignore", divide="ignore"):
            t_stats = (boot - slope) / boot_se
        t_stats = t_stats[np.isfinite(t_stats)]
        if se > 0 and t_stats.size >= n_resamples // 4:
            method = "bootstrap-t over runs"
            t_high, t_low = np.percentile(t_stats, [97.5, 2.5])
            low, high = slope - t_high * se, slope - t_low * se
        elif np.isfinite(boot).any():
            method = "percentile bootstrap over runs"
            low, high = np.nanpercentile(boot, [2.5, 97.5])
    return PowerLawFit(
        slope=slope,
        intercept=intercept,
        ci_low=float(low),
        ci_high=float(high),
        n_runs=int(x.size),
        n_sizes=int(distinct.size),
        n_censored=n_censored,
        method=method,
    )
