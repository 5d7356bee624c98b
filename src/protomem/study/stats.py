"""Statistics of the study: Spearman with bootstrap intervals and permutation p-values, Monte Carlo nulls,
a multi-score logistic model.

Copy counts are overdispersed (a memorized string is copied many times, most strings not at all), so
no p-value here comes from a textbook formula: every one is a Monte Carlo or permutation tail fraction
``(1 + #{null >= observed}) / (1 + draws)``.

The primary endpoint of a training string is its *first memorized checkpoint* (protomem.memorization.
tracking). Its "earliness" is minus that index, with never-memorized strings tied last; a positive
Spearman correlation between a prototypicality score and earliness means "prototypical strings are
memorized first".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import false_discovery_control, rankdata


def _rank_rows(values: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis (ties share their mean rank)."""
    return rankdata(values, axis=-1, method="average")


def _corr_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis (broadcasting); NaN where either side is constant."""
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    denom = np.sqrt((a * a).sum(axis=-1) * (b * b).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a * b).sum(axis=-1) / np.where(denom > 0, denom, 1.0), np.nan)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of two (P,) arrays (NaN rows dropped); NaN if either is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    if keep.sum() < 3:
        return float("nan")
    return float(_corr_rows(_rank_rows(x[keep]), _rank_rows(y[keep])))


@dataclass
class CorrelationResult:
    """Spearman rho with a percentile bootstrap 95% interval and a two-sided permutation p-value."""

    rho: float
    ci_low: float
    ci_high: float
    p_permutation: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return {
            "rho": self.rho,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "p_permutation": self.p_permutation,
            "n": self.n,
        }


def spearman_with_uncertainty(
    x: np.ndarray, y: np.ndarray, *, n_bootstrap: int = 1000, n_permutations: int = 1000, seed: int = 0
) -> CorrelationResult:
    """Spearman rho of (x, y), a bootstrap 95% CI (resampling pairs) and a permutation p (two-sided)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    n = x.size
    rho = spearman(x, y)
    if n < 3 or np.isnan(rho):
        return CorrelationResult(rho, float("nan"), float("nan"), float("nan"), int(n))
    rng = np.random.default_rng(seed)
    boot = []
    for start in range(0, n_bootstrap, 200):  # chunks keep memory at 200 x n
        idx = rng.integers(0, n, size=(min(200, n_bootstrap - start), n))
        boot.append(_corr_rows(_rank_rows(x[idx]), _rank_rows(y[idx])))
    boot_rho = np.concatenate(boot)
    low, high = np.nanpercentile(boot_rho, [2.5, 97.5])
    rank_x, rank_y = _rank_rows(x), _rank_rows(y)
    perms = np.argsort(rng.random((n_permutations, n)), axis=1)
    null = _corr_rows(rank_x[None, :], rank_y[perms])
    p = (1 + np.sum(np.abs(null) >= abs(rho) - 1e-12)) / (1 + n_permutations)
    return CorrelationResult(float(rho), float(low), float(high), float(p), int(n))


def varies(values: np.ndarray) -> bool:
    """True when the non-NaN values differ by more than float rounding (a constant score says nothing).

    Sums of the same log-probabilities in another order differ by ~1e-15: that is not variation.
    """
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if values.size < 2:
        return False
    return bool(np.ptp(values) > 1e-9 * max(1.0, float(np.abs(values).max())))


def rank_residual(score: np.ndarray, control: np.ndarray) -> np.ndarray:
    """The part of ``score`` that ``control`` does not explain, on the rank scale: (P,) residuals of
    rank(score) after a least-squares line on rank(control); NaN where either is NaN.

    A Spearman correlation with these residuals is the semi-partial Spearman correlation of the score
    with the other variable, ``control`` held out of the score. ``control`` is rounded to 9 decimals
    first, so values equal up to float rounding (sums of the same log-probabilities) tie.
    """
    score, control = np.asarray(score, dtype=float), np.asarray(control, dtype=float)
    out = np.full(score.shape, np.nan)
    keep = ~(np.isnan(score) | np.isnan(control))
    if keep.sum() < 3:
        return out
    y, x = _rank_rows(score[keep]), _rank_rows(np.round(control[keep], 9))
    x, y = x - x.mean(), y - y.mean()
    spread = float((x * x).sum())
    slope = float((x * y).sum()) / spread if spread > 0 else 0.0
    out[keep] = y - slope * x
    return out


def earliness(first_index: np.ndarray) -> np.ndarray:
    """Minus the first memorized checkpoint index (never memorized = one past the last, tied last)."""
    return -np.asarray(first_index, dtype=float)


def dispersion_shape(copies: np.ndarray, baseline: np.ndarray) -> float:
    """Gamma shape k of per-string memorization propensity, by moments of the excess copies.

    Negative-binomial moments: Var = mu + mu^2 / k. Returns a large k (about Poisson) when the excess is
    not overdispersed.

    Args:
        copies: (P,) observed copies at one checkpoint; baseline: (P,) expected copies without memorization.
    """
    excess = np.clip(np.asarray(copies, float) - np.asarray(baseline, float), 0.0, None)
    mu, var = excess.mean(), excess.var()
    if mu <= 0 or var <= mu:
        return 1e6
    return float(max(mu * mu / (var - mu), 1e-3))


def simulate_first_index(
    baseline: np.ndarray,
    expected: np.ndarray,
    total_copies: np.ndarray,
    shape: float,
    n_draws: int,
    min_excess: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """(n_draws, P) first memorized checkpoint index under a null of score-blind memorization.

    Copies of string i at checkpoint t are Poisson with rate ``baseline[i, t] + g_i * X_t / P``: the
    baseline (what the grammar, or the model's own rate for strings of that likelihood, predicts) plus a
    share of the observed excess X_t = max(total_copies[t] - sum_i baseline[i, t], 0) spread over the
    strings by a propensity g_i ~ Gamma(shape, 1/shape) (mean 1) that is fixed per string across
    checkpoints (memorized strings stay memorized) and independent of every score.

    Args:
        baseline: (P, T) expected copies per string and checkpoint without memorization.
        expected: (P,) K p(x), the threshold's reference (as for the observed data).
        total_copies: (T,) observed copies of training strings per checkpoint.
    """
    n_train, n_checkpoints = baseline.shape
    excess = np.clip(total_copies - baseline.sum(axis=0), 0.0, None)  # (T,)
    out = np.empty((n_draws, n_train), dtype=np.int64)
    threshold = np.round(expected)[:, None] + min_excess
    chunk = max(1, (1 << 20) // max(n_train * n_checkpoints, 1))
    for start in range(0, n_draws, chunk):
        count = min(chunk, n_draws - start)
        propensity = rng.gamma(shape, 1.0 / shape, size=(count, n_train))
        # the excess is exactly redistributed over the strings
        propensity *= n_train / np.maximum(propensity.sum(axis=1, keepdims=True), 1e-12)
        rate = baseline[None] + propensity[:, :, None] * excess[None, None, :] / n_train  # (D, P, T)
        mask = rng.poisson(rate) >= threshold[None]
        out[start : start + count] = np.where(mask.any(axis=2), mask.argmax(axis=2), n_checkpoints)
    return out


def null_rhos(score: np.ndarray, null_first_index: np.ndarray) -> np.ndarray:
    """(n_draws,) Spearman rho of score vs earliness for every null draw (NaN scores dropped)."""
    score = np.asarray(score, dtype=float)
    keep = ~np.isnan(score)
    ranks = _rank_rows(score[keep])
    return _corr_rows(ranks[None, :], _rank_rows(earliness(null_first_index[:, keep])))


def tail_p(observed: float, null: np.ndarray) -> float:
    """One-sided Monte Carlo p-value that the null reaches ``observed`` (upper tail)."""
    null = np.asarray(null, dtype=float)
    null = null[~np.isnan(null)]
    if np.isnan(observed) or null.size == 0:
        return float("nan")
    return float((1 + np.sum(null >= observed - 1e-12)) / (1 + null.size))


def adjusted_p_values(p_values: dict[str, float]) -> dict[str, float]:
    """Benjamini-Hochberg adjusted p-values of a family of tests (false discovery rate), NaNs left out.

    For the secondary (exploratory) scores of a condition: many scores are tested, so a small raw p of
    one of them is weak evidence; an adjusted p below alpha keeps the expected share of false
    discoveries among the flagged scores below alpha.
    """
    names = [name for name, p in p_values.items() if np.isfinite(p)]
    if not names:
        return {}
    adjusted = false_discovery_control([p_values[name] for name in names], method="bh")
    return {name: float(value) for name, value in zip(names, adjusted, strict=True)}


def calibration_factors(
    sample_logprob: np.ndarray,
    sample_is_novel: np.ndarray,
    bin_edges: np.ndarray,
    novel_mass: np.ndarray,
    n_samples: int,
) -> np.ndarray:
    """(B,) ratio of the model's rate of *novel* valid strings to the grammar's, per log p(x) bin.

    A factor of 1 means the model samples non-training strings of that likelihood as often as the
    grammar would; the calibrated null multiplies K p(x) of each training string by its bin's factor.

    Args:
        sample_logprob: (K,) log p(x) of the samples (NaN for invalid ones).
        sample_is_novel: (K,) valid and not in the training set.
        bin_edges: (B+1,) log p(x) bin edges (the outer ones are -inf / +inf).
        novel_mass: (B,) grammar probability mass of the non-training strings in each bin.
    """
    which = np.clip(np.searchsorted(bin_edges, sample_logprob[sample_is_novel], side="right") - 1, 0, None)
    counts = np.bincount(which, minlength=len(novel_mass))[: len(novel_mass)]
    expected = n_samples * np.asarray(novel_mass, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(expected > 0, counts / np.where(expected > 0, expected, 1.0), 0.0)


def halfway_checkpoint(first_index: np.ndarray, n_checkpoints: int) -> int:
    """The checkpoint at which the memorized fraction is closest to one half (the most informative cut)."""
    fractions = np.array([(np.asarray(first_index) <= t).mean() for t in range(n_checkpoints)])
    return int(np.argmin(np.abs(fractions - 0.5)))


def logistic_model(
    scores: dict[str, np.ndarray], outcome: np.ndarray, *, n_bootstrap: int = 200, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Logistic regression of a binary outcome on several standardized scores at once.

    Returns, per score: the coefficient (log-odds per standard deviation) with a bootstrap 95% interval.
    Empty when the outcome has a single class.
    """
    from sklearn.linear_model import LogisticRegression

    names = list(scores)
    design = np.column_stack([np.asarray(scores[n], dtype=float) for n in names])
    outcome = np.asarray(outcome, dtype=int)
    keep = ~np.isnan(design).any(axis=1)
    design, outcome = design[keep], outcome[keep]
    varying = np.array([varies(column) for column in design.T], dtype=bool)  # constants have no coefficient
    names = [n for n, v in zip(names, varying, strict=True) if v]
    design = design[:, varying]
    if design.shape[0] < 10 or design.shape[1] == 0 or np.unique(outcome).size < 2:
        return {}
    design = (design - design.mean(axis=0)) / design.std(axis=0)

    def fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        if np.unique(y).size < 2:
            return np.full(x.shape[1], np.nan)
        return LogisticRegression(C=10.0, solver="newton-cholesky", max_iter=100).fit(x, y).coef_[0]

    coef = fit(design, outcome)
    rng = np.random.default_rng(seed)
    boots = np.array(
        [fit(design[idx], outcome[idx]) for idx in rng.integers(0, len(outcome), (n_bootstrap, len(outcome)))]
    )
    low, high = np.nanpercentile(boots, [2.5, 97.5], axis=0)
    return {
        name: {"coef": float(c), "ci_low": float(lo), "ci_high": float(hi)}
        for name, c, lo, hi in zip(names, coef, low, high, strict=True)
    }


def quantile_strata(values: np.ndarray, n_strata: int) -> np.ndarray:
    """(P,) int stratum of each value: ``n_strata`` quantile bins (fewer when values tie); NaN -> -1."""
    values = np.asarray(values, dtype=float)
    out = np.full(values.shape, -1, dtype=np.int64)
    keep = ~np.isnan(values)
    if not keep.any():
        return out
    edges = np.unique(np.quantile(values[keep], np.linspace(0, 1, n_strata + 1)[1:-1]))
    out[keep] = np.searchsorted(edges, values[keep], side="right")
    return out


def stratified_permutations(
    values: np.ndarray, strata: np.ndarray, n_draws: int, rng: np.random.Generator
) -> np.ndarray:
    """(n_draws, P): ``values`` (P,) shuffled *within* each stratum, independently per draw.

    Used as a null of "memorization order depends on the stratifying variable only" (e.g. log p(x) bins):
    the draws keep how the values go with the strata and break any link to anything else.
    """
    values, strata = np.asarray(values), np.asarray(strata)
    out = np.tile(values, (n_draws, 1))
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        if members.size > 1:
            order = np.argsort(rng.random((n_draws, members.size)), axis=1)
            out[:, members] = values[members][order]
    return out
