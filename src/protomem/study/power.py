"""Power of the pooled test: how many conditions detect an effect of a given size against both nulls.

The pooled statistic of C conditions is the mean of their rho; each null's pooled draw is the mean of one
draw per condition. With the per-condition null spreads s_k (sd of the Monte Carlo draws) and the spread
sigma of a condition's observed rho (its bootstrap standard error, or the spread of rho across conditions
when that is larger), the pooled null k is about Normal(m_k, s_k^2 / C) and the pooled rho under an
effect ``effect`` beyond the stricter null about Normal(max_k m_k + effect, sigma^2 / C). The test claims
the effect when the pooled rho exceeds every null's 1 - alpha quantile, so

    power(C) = 1 - Phi((max_k (m_k + z_{1-alpha} s_k / sqrt(C)) - max_k m_k - effect) / (sigma / sqrt(C))).

Conditions are assumed to be like the ones measured (same P, grammar, training); more strings per
condition shrink every spread roughly as 1/sqrt(P).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import norm

NULLS = ("grammar", "calibrated")


def power_curve(
    correlations: list[dict[str, Any]],
    *,
    effect: float = 0.08,
    alpha: float = 0.01,
    target: float = 0.9,
    max_conditions: int = 96,
) -> dict[str, Any] | None:
    """Power of the pooled test against both nulls for 1..max_conditions conditions like the given ones.

    Args:
        correlations: one dict per condition with rho, ci_low, ci_high and, per null k,
            null_mean_k and null_sd_k (as in a condition summary's correlations of one score).

    Returns None without usable conditions; else {"conditions": [1..], "power": [...], "required":
    the smallest count with power >= target (None if beyond max_conditions), "effect", "alpha",
    "target", "sigma", "null_means", "null_sds", "n_measured"}.
    """
    def measured(c: dict[str, Any]) -> bool:
        keys = ["rho", "ci_low", "ci_high"] + [f"null_{s}_{k}" for s in ("mean", "sd") for k in NULLS]
        return all(np.isfinite(c.get(key, np.nan)) for key in keys)

    usable = [c for c in correlations if measured(c)]
    if not usable:
        return None
    null_means = {k: float(np.mean([c[f"null_mean_{k}"] for c in usable])) for k in NULLS}
    null_sds = {k: float(np.sqrt(np.mean([c[f"null_sd_{k}"] ** 2 for c in usable]))) for k in NULLS}
    standard_errors = [(c["ci_high"] - c["ci_low"]) / (2 * norm.ppf(0.975)) for c in usable]
    sigma = float(np.sqrt(np.nanmean(np.square(standard_errors))))
    if len(usable) >= 3:
        sigma = max(sigma, float(np.std([c["rho"] for c in usable], ddof=1)))
    counts = np.arange(1, max_conditions + 1)
    z = norm.ppf(1 - alpha)
    critical = np.max([null_means[k] + z * null_sds[k] / np.sqrt(counts) for k in NULLS], axis=0)
    true_mean = max(null_means.values()) + effect
    power = 1 - norm.cdf((critical - true_mean) / (sigma / np.sqrt(counts)))
    reached = np.flatnonzero(power >= target)
    return {
        "conditions": counts.tolist(),
        "power": power.tolist(),
        "required": int(counts[reached[0]]) if reached.size else None,
        "effect": effect,
        "alpha": alpha,
        "target": target,
        "sigma": sigma,
        "null_means": null_means,
        "null_sds": null_sds,
        "n_measured": len(usable),
    }
