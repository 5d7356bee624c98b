"""Rank correlation with honest uncertainty, for the image study's time-to-memorization analysis.

(The audit's own typical-vs-rare test, corrected for the detector's sensitivity, is in
:mod:`protomem.audit.typicality`.)

Spearman's rho with a percentile bootstrap interval (resampling items) and a permutation p-value
(shuffling one variable), computed by the string study's statistics module. The permutation p-value is
exact under exchangeability and does not assume untied data, which matters here because most training
items have zero copies.
"""

from __future__ import annotations

import numpy as np


def spearman_test(
    x: np.ndarray, y: np.ndarray, n_boot: int = 1000, n_perm: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Spearman correlation of paired samples with a bootstrap 95% CI and a two-sided permutation p-value.

    The computation is the string study's (:func:`protomem.study.stats.spearman_with_uncertainty`), so
    the audit, the image study and the string study report the same statistic.

    Args:
        x, y: (n,) paired values; pairs with a NaN are dropped.

    Returns:
        {"rho", "ci_low", "ci_high", "p_permutation", "n"}; NaN entries when either side is constant.
    """
    from protomem.study.stats import spearman_with_uncertainty

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    result = spearman_with_uncertainty(x[keep], y[keep], n_bootstrap=n_boot, n_permutations=n_perm, seed=seed)
    return result.to_dict()
