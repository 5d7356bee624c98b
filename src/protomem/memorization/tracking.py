"""Tracking every training string over training: copies per checkpoint, excess over the grammar, first step.

A model that has learned the grammar also emits frequent training strings: sampling K strings from the
true grammar copies string i about K·p(x_i) times. Memorization is the *excess* over that expectation.
The first memorized step of string i is the first checkpoint at which its copies exceed
round(K·p(x_i)) by at least ``min_excess`` (2 by default); strings never crossing are censored.
"""

from __future__ import annotations

import numpy as np

NOT_MEMORIZED = -1  # first_memorized_step of a string that never crossed the threshold (censored)


def copies_per_checkpoint(copy_indices: list[np.ndarray], n_train: int) -> np.ndarray:
    """(P, T) int64: copies of each training string at each of T checkpoints.

    Args:
        copy_indices: per checkpoint, (K,) training index copied by each sample (-1 = not a copy).
    """
    out = np.zeros((n_train, len(copy_indices)), dtype=np.int64)
    for t, index in enumerate(copy_indices):
        index = np.asarray(index)
        out[:, t] = np.bincount(index[index >= 0], minlength=n_train)
    return out


def expected_copies(logprob: np.ndarray, n_samples: int) -> np.ndarray:
    """(P,) K·p(x): copies of each string expected when drawing K samples from the true grammar."""
    return n_samples * np.exp(np.asarray(logprob, dtype=np.float64))


def memorized_mask(copies: np.ndarray, expected: np.ndarray, min_excess: int = 2) -> np.ndarray:
    """(P, T) bool: copies exceed round(expected) by at least ``min_excess``."""
    return copies - np.round(expected)[:, None] >= min_excess


def first_memorized(
    copies: np.ndarray, expected: np.ndarray, steps: np.ndarray, min_excess: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """First checkpoint index and step at which each string is memorized.

    Returns:
        index: (P,) int64 checkpoint index, or T (one past the last) when never memorized;
        step: (P,) int64 training step, or NOT_MEMORIZED.
    """
    mask = memorized_mask(copies, expected, min_excess)
    ever = mask.any(axis=1)
    index = np.where(ever, mask.argmax(axis=1), mask.shape[1]).astype(np.int64)
    steps = np.asarray(steps, dtype=np.int64)
    step = np.where(ever, steps[np.minimum(index, len(steps) - 1)], NOT_MEMORIZED)
    return index, step.astype(np.int64)


def not_yet_memorized_curve(first_index: np.ndarray, n_checkpoints: int) -> np.ndarray:
    """(T,) fraction of strings not yet memorized at each checkpoint (a survival curve)."""
    first_index = np.asarray(first_index)
    if first_index.size == 0:
        return np.full(n_checkpoints, np.nan)
    return np.array([(first_index > t).mean() for t in range(n_checkpoints)])


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
