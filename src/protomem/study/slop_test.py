"""A test of slop: do samples over-produce the *common* training blocks more than likelihood explains?

For one level and checkpoint, the slop slope is the least-squares slope of log(sample frequency /
training frequency) on log(training frequency) over the training blocks (``analysis.slop_slope``).
Positive = the more common a block is in the training set, the more it is over-produced. The slope alone
is not evidence: training frequency goes with grammar probability, and a model that merely sharpens the
grammar (over-produces likely blocks, whatever the training set holds) has a positive slope too. Two
Monte Carlo nulls draw the sample counts of the training blocks again and recompute the slope:

- grammar: a model that samples the true grammar, count_b ~ Poisson(K p_b) with p_b the block's exact
  grammar probability at its position;
- calibrated: a model whose block counts depend on grammar probability alone, in any power, fitted to
  the model's own counts at that checkpoint: count_b ~ Poisson(exp(a + g log p_b)), (a, g) by Poisson
  regression of the observed counts on log p_b. Beating it means the model over-produces blocks *because
  they are common in the training set*, beyond any sharpening of the grammar.

The statistic of a condition is the mean slope over the levels below the root (blocks shorter than the
string) and the checkpoints of the partial-memorization window (before exact copies reach 5% of the
samples); the null draws are averaged the same way, draw by draw.
"""

from __future__ import annotations

import numpy as np

from protomem.study.stats import tail_p


def slopes(train_count: np.ndarray, sample_counts: np.ndarray, n_train: int, n_samples: int) -> np.ndarray:
    """(D,) slop slopes of D count vectors ``sample_counts`` (D, B) against one training count vector (B,).

    As ``analysis.slop_slope`` row by row (+0.5 on sample counts; NaN with < 3 distinct frequencies).
    """
    x = np.log(np.asarray(train_count, float) / n_train)
    counts = np.atleast_2d(np.asarray(sample_counts, float))
    if np.unique(x).size < 3:
        return np.full(counts.shape[0], np.nan)
    y = np.log((counts + 0.5) / max(n_samples, 1)) - x[None, :]
    xc = x - x.mean()
    return (y - y.mean(axis=1, keepdims=True)) @ xc / float(xc @ xc)


def poisson_power_fit(counts: np.ndarray, probs: np.ndarray, iterations: int = 50) -> tuple[float, float]:
    """(a, g) of the Poisson regression log E[count] = a + g log p (maximum likelihood, Newton's method)."""
    y = np.asarray(counts, float)
    x = np.log(np.asarray(probs, float))
    design = np.column_stack([np.ones_like(x), x])
    beta = np.array([np.log(max(y.mean(), 1e-3) / np.exp(x).mean()), 1.0])

    def loglik(b: np.ndarray) -> float:
        eta = design @ b
        return float((y * eta - np.exp(eta)).sum())

    current = loglik(beta)
    for _ in range(iterations):
        mu = np.exp(design @ beta)
        gradient = design.T @ (y - mu)
        hessian = design.T @ (design * mu[:, None])
        try:
            step = np.linalg.solve(hessian + 1e-9 * np.eye(2), gradient)
        except np.linalg.LinAlgError:
            break
        scale = 1.0  # halve the step until the likelihood does not fall
        trial = beta + step
        value = loglik(trial)
        while value < current - 1e-12 and scale > 1e-6:
            scale /= 2
            trial = beta + scale * step
            value = loglik(trial)
        if value < current - 1e-12:
            break
        converged = value - current < 1e-10
        beta, current = trial, value
        if converged:
            break
    return float(beta[0]), float(beta[1])


def null_slopes(
    train_count: np.ndarray,
    grammar_prob: np.ndarray,
    sample_count: np.ndarray,
    n_train: int,
    n_samples: int,
    n_draws: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """(n_draws,) slopes under the grammar and the calibrated null for one level and checkpoint."""
    grammar_prob = np.asarray(grammar_prob, float)
    a, g = poisson_power_fit(sample_count, grammar_prob)
    rates = {
        "grammar": n_samples * grammar_prob,
        "calibrated": np.exp(a + g * np.log(grammar_prob)),
    }
    return {
        name: slopes(train_count, rng.poisson(rate[None, :], size=(n_draws, rate.size)), n_train, n_samples)
        for name, rate in rates.items()
    }


def window_test(
    blocks: dict[str, np.ndarray],
    sample_counts: list[np.ndarray],
    levels: list[int],
    n_train: int,
    n_samples: list[int],
    n_draws: int,
    rng: np.random.Generator,
) -> dict[str, object] | None:
    """The condition's slop statistic and its null draws over the window's checkpoints.

    Args:
        blocks: ``memorization.slop.training_blocks`` columns (level, train_count, grammar_prob).
        sample_counts: per window checkpoint, (B,) sample counts of the training blocks.
        levels: the levels tested (below the root).
        n_samples: per window checkpoint, the number of samples K.

    Returns None when the window is empty; else {"slope": mean observed slope, "per_level": {level:
    {"slope", "null_mean_<null>", "p_<null>"}}, "null_draws": {null: (n_draws,) mean null slope per draw}}.
    """
    if not sample_counts:
        return None
    observed: list[float] = []
    per_level: dict[int, list[float]] = {level: [] for level in levels}
    draws: dict[str, list[np.ndarray]] = {"grammar": [], "calibrated": []}
    level_draws: dict[int, dict[str, list[np.ndarray]]] = {
        level: {"grammar": [], "calibrated": []} for level in levels
    }
    for counts, k in zip(sample_counts, n_samples, strict=True):
        for level in levels:
            at = blocks["level"] == level
            slope = float(slopes(blocks["train_count"][at], counts[at], n_train, k)[0])
            if np.isnan(slope):
                continue
            observed.append(slope)
            per_level[level].append(slope)
            nulls = null_slopes(
                blocks["train_count"][at], blocks["grammar_prob"][at], counts[at], n_train, k, n_draws, rng
            )
            for name, values in nulls.items():
                draws[name].append(values)
                level_draws[level][name].append(values)
    if not observed:
        return None
    levels_out: dict[int, dict[str, float]] = {}
    for level, values in per_level.items():
        if not values:
            continue
        entry = {"slope": float(np.mean(values))}
        for name, arrays in level_draws[level].items():
            null = np.mean(np.stack(arrays), axis=0)
            entry[f"null_mean_{name}"] = float(np.nanmean(null))
            entry[f"p_{name}"] = tail_p(entry["slope"], null)
        levels_out[level] = entry
    return {
        "slope": float(np.mean(observed)),
        "per_level": levels_out,
        "null_draws": {name: np.mean(np.stack(values), axis=0) for name, values in draws.items()},
    }
