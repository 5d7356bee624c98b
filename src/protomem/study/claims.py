"""The claims table: one entry per claim of arXiv 2605.30642, with its test, statistic and verdict.

(a) Prototypical training examples are memorized first (by the copy endpoint and by the likelihood
    endpoint), beyond likelihood: the pooled Spearman rho of the primary score with the earliness of
    first memorization over the Zipf conditions, against both Monte Carlo nulls.
(b) Zipf-distributed rules delay memorization, more so when the skew is on the levels near the root:
    tau_mem of skewed against uniform rules, seed by seed (only where the preset runs it).
(c) Slop: before copying whole strings, models over-produce the common substrings of their training
    set beyond what likelihood explains: the pooled slop slope against both nulls.

Decision rule, fixed before the decisive run (see docs/results/study.md): a claim is *supported* when its
statistic beats both nulls one-sided at alpha (upper tail), *refuted* when it lies below both at alpha
(the opposite direction), *not supported* otherwise, and *not tested* when the preset has no data for it.
For (b): *supported* when skew near the root delays memorization (tau ratio > 1) and delays it more
than skew near the tokens, each one-sided at alpha across seeds; *refuted* when skew near the root
significantly speeds it up (ratio < 1 at alpha); *not supported* otherwise. When a preset has several
grammars, claim (a) is also broken down by grammar ("secondary" entries, alpha divided by the number of
grammars); the claim's verdict is the primary entry's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

STATEMENTS = {
    "a": "Prototypical training examples (made of common rules) are memorized earlier than atypical ones, "
    "beyond what their likelihood explains",
    "b": "Zipf-distributed rules delay memorization, more so when the skew is on the levels near the root",
    "c": "Before copying whole examples, models over-produce the common substrings of their training set "
    "(slop), beyond what likelihood explains",
}


def verdict(pooled: dict[str, float] | None, alpha: float) -> str:
    """supported / refuted / not supported / not tested from a pooled test's one-sided p-values."""
    if not pooled or not pooled.get("n_conditions") or not np.isfinite(pooled.get("rho", np.nan)):
        return "not tested"
    upper = [pooled.get(f"p_{null}", np.nan) for null in ("grammar", "calibrated")]
    lower = [pooled.get(f"p_lower_{null}", np.nan) for null in ("grammar", "calibrated")]
    if not all(np.isfinite(upper)):
        return "not tested"
    if all(p < alpha for p in upper):
        return "supported"
    if all(np.isfinite(lower)) and all(p < alpha for p in lower):
        return "refuted"
    return "not supported"


def pooled_claim(
    claim: str,
    test: str,
    endpoint: str,
    pooled: dict[str, float] | None,
    alpha: float,
    scope: str = "all conditions",
    role: str = "primary",
) -> dict[str, Any]:
    """A claims-table entry for a pooled test (claims a and c). ``scope`` names the conditions pooled;
    ``role`` is "primary" (the claim's verdict) or "secondary" (a pre-specified breakdown, with its own
    alpha)."""
    pooled = pooled or {}
    return {
        "claim": claim,
        "role": role,
        "scope": scope,
        "alpha": alpha,
        "statement": STATEMENTS[claim],
        "test": test,
        "endpoint": endpoint,
        "statistic": pooled.get("rho", float("nan")),
        "n_conditions": pooled.get("n_conditions", 0),
        "null_means": {null: pooled.get(f"null_mean_{null}") for null in ("grammar", "calibrated")},
        "p_values": {null: pooled.get(f"p_{null}") for null in ("grammar", "calibrated")},
        "verdict": verdict(pooled, alpha),
    }


def skew_claim(ratios: dict[str, Any] | None, alpha: float) -> dict[str, Any]:
    """Claim (b) from ``tau_ratios`` (protomem.study.onsets): skew near the root vs uniform and vs skew near
    the tokens."""
    entry: dict[str, Any] = {
        "claim": "b",
        "role": "primary",
        "scope": "skew arms paired by grammar seed",
        "alpha": alpha,
        "statement": STATEMENTS["b"],
        "test": "tau_mem (first step with >= 10% exact copies among the samples) of skewed over uniform "
        "rules, paired by seed; one-sided t-tests on the log ratios across seeds",
        "endpoint": "tau_mem",
    }
    if not ratios:
        return {**entry, "statistic": None, "p_values": {}, "verdict": "not tested"}
    top, versus = ratios.get("top/uniform"), ratios.get("top/bottom")
    p_values = {
        "top delays (top/uniform > 1)": top["p_greater"] if top else None,
        "top speeds up (top/uniform < 1)": top["p_less"] if top else None,
        "top delays more than bottom (top/bottom > 1)": versus["p_greater"] if versus else None,
    }
    if top is None or versus is None:
        result = "not tested"
    elif top["p_greater"] < alpha and versus["p_greater"] < alpha:
        result = "supported"
    elif top["p_less"] < alpha:
        result = "refuted"
    else:
        result = "not supported"
    keys = ("ratio", "ci_low", "ci_high", "n_seeds")
    statistic = {name: {k: r[k] for k in keys} for name, r in ratios.items()}
    return {**entry, "statistic": statistic, "p_values": p_values, "verdict": result}
