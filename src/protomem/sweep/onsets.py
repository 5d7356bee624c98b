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

MEM_COLUMN = "frac_exact_copy"
GEN_COLUMN = "frac_novel_valid"
DEFAULT_MEM_THRESHOLD = 0.1
DEFAULT_GEN_THRESHOLD = 0.5


def onset_step(steps: np.ndarray, values: np.ndarray, threshold: float) -> float:
    """First step at which ``values`` reaches ``threshold``, interpolated in log(step); NaN if never.

    Args:
        steps: (E,) evaluation steps (any order, >= 1).
        values: (E,) the fraction at each step (NaN entries are ignored).
    """
    steps = np.asarray(steps, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    keep = np.isfinite(values) & (steps > 0)
    steps, values = steps[keep], values[keep]
    order = np.argsort(steps)
    steps, values = steps[order], values[order]
    above = np.flatnonzero(values >= threshold)
    if above.size == 0:
        return float("nan")
    i = int(above[0])
    if i == 0:
        return float(steps[0])
    s0, s1, v0, v1 = steps[i - 1], steps[i], values[i - 1], values[i]
    frac = (threshold - v0) / (v1 - v0)
    return float(np.exp(np.log(s0) + frac * (np.log(s1) - np.log(s0))))


@dataclass(frozen=True)
class PowerLawFit:
    """log τ = intercept + slope · log P, fitted by least squares over runs with a finite τ.

    Attributes:
        ci_low, ci_high: 95% bootstrap percentile interval of the slope.
        n_runs: runs used; n_sizes: distinct P among them; n_censored: runs excluded (τ not reached).
        method: how the bootstrap resampled ("runs within each P" or "runs").
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


def _slopes(log_x: np.ndarray, log_y: np.ndarray) -> np.ndarray:
    """Least-squares slopes of each row: log_x, log_y (B, n) -> (B,), NaN where x has no spread."""
    dx = log_x - log_x.mean(axis=1, keepdims=True)
    dy = log_y - log_y.mean(axis=1, keepdims=True)
    var = (dx * dx).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(var > 1e-12, (dx * dy).sum(axis=1) / var, np.nan)


def fit_power_law(
    sizes: np.ndarray, taus: np.ndarray, n_resamples: int = 2000, seed: int = 0
) -> PowerLawFit | None:
    """Fit τ ∝ P^slope on log-log axes with a bootstrap 95% interval; None if under 2 distinct P.

    When every P has at least two runs (seeds) the bootstrap resamples runs within each P (the design
    keeps its P values); otherwise it resamples runs and drops resamples with a single P.
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    taus = np.asarray(taus, dtype=np.float64)
    ok = np.isfinite(taus) & (taus > 0) & np.isfinite(sizes) & (sizes > 0)
    n_censored = int((~ok).sum())
    x, y = np.log(sizes[ok]), np.log(taus[ok])
    distinct = np.unique(x)
    if distinct.size < 2:
        return None
    slope = float(_slopes(x[None], y[None])[0])
    intercept = float(y.mean() - slope * x.mean())
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(x == value) for value in distinct]
    if all(g.size >= 2 for g in groups):
        method = "runs within each P"
        picks = np.concatenate([rng.choice(g, size=(n_resamples, g.size)) for g in groups], axis=1)
    else:
        method = "runs"
        picks = rng.integers(0, x.size, size=(n_resamples, x.size))
    boot = _slopes(x[picks], y[picks])
    boot = boot[np.isfinite(boot)]
    low, high = np.percentile(boot, [2.5, 97.5]) if boot.size else (np.nan, np.nan)
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
