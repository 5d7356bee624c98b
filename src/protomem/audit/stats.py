"""Are the copied training items the typical or the rare ones? Rank correlation with honest uncertainty.

Kept small on purpose: Spearman's rho with a percentile bootstrap interval (resampling items) and a
permutation p-value (shuffling one variable), the statistics the string study reports too. The
permutation p-value is exact under exchangeability and does not assume untied data, which matters here
because most training items have zero copies.
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)


def _rank_rows(values: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis (ties get their mean rank), as float64."""
    return stats.rankdata(values, axis=-1)


def spearman_test(
    x: np.ndarray, y: np.ndarray, n_boot: int = 1000, n_perm: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Spearman correlation of paired samples with a bootstrap 95% CI and a two-sided permutation p-value.

    Args:
        x, y: (n,) paired values; pairs with a NaN are dropped.

    Returns:
        {"rho", "ci_low", "ci_high", "p_permutation", "n"}; NaN entries when either side is constant.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(x.size)
    result = {
        "rho": float("nan"),
        "ci_low": float("nan"),
        "ci_high": float("nan"),
        "p_permutation": float("nan"),
        "n": n,
    }
    if n < 3:
        return result
    rho = _spearman(x, y)
    result["rho"] = rho
    if not np.isfinite(rho):
        return result
    rng = np.random.default_rng(seed)
    # Permutation null: Pearson correlation of ranks with one side shuffled (ranks are computed once).
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    rx = (rx - rx.mean()) / np.linalg.norm(rx - rx.mean())
    ry = (ry - ry.mean()) / np.linalg.norm(ry - ry.mean())
    perms = np.argsort(rng.random((n_perm, n)), axis=1)
    null = ry[perms] @ rx
    result["p_permutation"] = float((1 + np.sum(np.abs(null) >= abs(rho) - 1e-12)) / (n_perm + 1))
    # Bootstrap over items: re-rank every resample.
    picks = rng.integers(0, n, size=(n_boot, n))
    bx, by = _rank_rows(x[picks]), _rank_rows(y[picks])
    bx -= bx.mean(axis=1, keepdims=True)
    by -= by.mean(axis=1, keepdims=True)
    denom = np.linalg.norm(bx, axis=1) * np.linalg.norm(by, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = np.sum(bx * by, axis=1) / denom
    boot = boot[np.isfinite(boot)]
    if boot.size:
        result["ci_low"], result["ci_high"] = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
    return result


def describe_direction(result: dict[str, float], score: str, low_means: str, high_means: str) -> str:
    """One sentence: which items are copied more, with rho, CI and p, or that the data do not say."""
    rho, p = result["rho"], result["p_permutation"]
    if not np.isfinite(rho):
        return f"No test: {score} or the copy counts do not vary across the {result['n']} items scored."
    numbers = (
        f"Spearman rho = {rho:+.3f} between {score} and copies, 95% CI [{result['ci_low']:+.3f}, "
        f"{result['ci_high']:+.3f}], permutation p = {p:.3g}, n = {result['n']}"
    )
    if p < 0.05:
        which = high_means if rho > 0 else low_means
        return f"The copied training items are the {which} ones ({numbers})."
    return f"The data do not show whether typical or rare items are copied more ({numbers})."
