"""Claim (b): does Zipf skew of the rules delay memorization, and more so near the root?

Each condition is an *arm* by where its rules are skewed: ``uniform`` (no skew), ``top`` (Zipf on the
levels nearest the root, the first half), ``bottom`` (the levels nearest the tokens, the second half) or
``all``. Conditions of different arms with the same grammar seed are a *pair* (same rule tables, same
seeds; only the rule probabilities differ). For each pair, the ratio of their tau_mem (the first step at
which exact copies reach 10% of the samples, interpolated in log step) is one observation; the ratio
of two arms is the geometric mean over seeds, with a t interval and one-sided t-tests on the log ratios.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from protomem.memorization.tracking import onset_step
from protomem.study.config import ConditionConfig

MEM_THRESHOLD = 0.1
COMPARISONS = (("top", "uniform"), ("bottom", "uniform"), ("all", "uniform"), ("top", "bottom"))


def skew_arm(condition: ConditionConfig) -> str | None:
    """uniform / top / bottom / all, or None for a skew on some other set of levels."""
    grammar = condition.grammar
    if grammar.zipf_exponent == 0:
        return "uniform"
    if grammar.zipf_levels is None:
        return "all"
    half = grammar.depth // 2
    levels = sorted(grammar.zipf_levels)
    if levels == list(range(half)):
        return "top"
    if levels == list(range(half, grammar.depth)):
        return "bottom"
    return None


def tau_mem(steps: np.ndarray, frac_exact_copy: np.ndarray) -> float:
    """The step at which exact copies first reach 10% of the samples (NaN if never)."""
    return onset_step(steps, frac_exact_copy, MEM_THRESHOLD)


def tau_ratios(
    taus: dict[str, float], conditions: list[ConditionConfig], alpha: float = 0.05
) -> dict[str, Any]:
    """Per comparison "a/b" present: {"ratio", "ci_low", "ci_high" (1 - alpha t interval of the geometric
    mean ratio), "half_width" (of the interval, relative), "p_greater", "p_less" (one-sided t-tests of the
    mean log ratio against 0), "n_seeds", "ratios" (per seed)}. Pairs with a censored tau are left out.
    """
    by_arm: dict[str, dict[int, float]] = {}
    for condition in conditions:
        arm = skew_arm(condition)
        tau = taus.get(condition.name, np.nan)
        if arm is not None and np.isfinite(tau):
            by_arm.setdefault(arm, {})[condition.grammar.seed] = float(tau)
    out: dict[str, Any] = {}
    for numerator, denominator in COMPARISONS:
        a, b = by_arm.get(numerator, {}), by_arm.get(denominator, {})
        seeds = sorted(set(a) & set(b))
        if len(seeds) < 2:
            continue
        logs = np.log([a[s] / b[s] for s in seeds])
        mean, error = float(logs.mean()), float(logs.std(ddof=1) / np.sqrt(len(logs)))
        t = scipy_stats.t.ppf(1 - alpha / 2, len(logs) - 1)
        if error > 0:
            p_greater = float(scipy_stats.t.sf(mean / error, len(logs) - 1))
            p_less = float(scipy_stats.t.cdf(mean / error, len(logs) - 1))
        else:
            p_greater, p_less = float(mean <= 0), float(mean >= 0)
        out[f"{numerator}/{denominator}"] = {
            "ratio": float(np.exp(mean)),
            "ci_low": float(np.exp(mean - t * error)),
            "ci_high": float(np.exp(mean + t * error)),
            "half_width": float((np.exp(mean + t * error) - np.exp(mean - t * error)) / 2 / np.exp(mean)),
            "p_greater": p_greater,
            "p_less": p_less,
            "n_seeds": len(seeds),
            "ratios": {int(s): float(np.exp(x)) for s, x in zip(seeds, logs, strict=True)},
        }
    return out
