"""Slop: how often generated samples reproduce each training block, against the training set and the grammar.

Before copying whole strings, a model may overproduce the *common* substrings of its training set. For
every level l and position j, and every distinct block b that training strings hold there:

- ``train_count``: training strings with b at (l, j); ``sample_count``: samples with b at (l, j);
- ``grammar_prob``: exact probability that a fresh grammar sample has b at (l, j).

The overproduction ratio of b is (sample_count / K) / (train_count / P): 1 = reproduced as often as it
appears in the training set. Slop = the ratio growing with how common the block is.
"""

from __future__ import annotations

import numpy as np

from protomem.grammar import RHM
from protomem.grammar.parsing import check_tokens
from protomem.grammar.prototypicality import level_blocks
from protomem.memorization.hierarchy import block_keys, block_probability
from protomem.neighbors import row_keys


def training_blocks(grammar: RHM, train_tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Every distinct (level, position, block) of the training set with its training count and grammar prob.

    Returns columns (each (B,)): level, position, train_count, grammar_prob, and ``tokens`` (B,) object
    arrays of the block's tokens (lists).
    """
    train = check_tokens(grammar, train_tokens)
    s, depth = grammar.branching, grammar.depth
    columns: dict[str, list] = {
        "level": [],
        "position": [],
        "train_count": [],
        "grammar_prob": [],
        "tokens": [],
    }
    for level in range(depth):
        blocks = level_blocks(train, s, depth, level)
        for position in range(blocks.shape[1]):
            distinct, counts = np.unique(blocks[:, position, :], axis=0, return_counts=True)
            columns["level"].append(np.full(len(counts), level))
            columns["position"].append(np.full(len(counts), position))
            columns["train_count"].append(counts)
            columns["grammar_prob"].append(block_probability(grammar, distinct, level, position))
            columns["tokens"].extend(distinct.tolist())
    out = {
        k: np.concatenate(v).astype(np.float64 if k == "grammar_prob" else np.int64)
        for k, v in columns.items()
        if k != "tokens"
    }
    out["tokens"] = np.array(columns["tokens"] + [None], dtype=object)[:-1]
    return out


def sample_block_counts(grammar: RHM, blocks: dict[str, np.ndarray], samples: np.ndarray) -> np.ndarray:
    """(B,) int64: how many samples hold each block of :func:`training_blocks` at its (level, position)."""
    samples = check_tokens(grammar, samples)
    s, depth = grammar.branching, grammar.depth
    out = np.zeros(len(blocks["level"]), dtype=np.int64)
    for level in range(depth):
        sample_keys = block_keys(samples, s, depth, level)
        rows = np.flatnonzero(blocks["level"] == level)
        if rows.size == 0:
            continue
        block_len = s ** (depth - level)
        query = np.array([blocks["tokens"][r] for r in rows], dtype=np.int64).reshape(-1, block_len)
        query_keys = row_keys(query)
        for position in np.unique(blocks["position"][rows]):
            at = blocks["position"][rows] == position
            unique, counts = np.unique(sample_keys[:, position], return_counts=True)
            keys = query_keys[at]
            pos = np.searchsorted(unique, keys).clip(0, max(unique.size - 1, 0))
            found = unique[pos] == keys if unique.size else np.zeros(keys.size, dtype=bool)
            out[rows[at]] = np.where(found, counts[pos] if unique.size else 0, 0)
    return out


def overproduction_curve(
    train_count: np.ndarray, sample_count: np.ndarray, n_train: int, n_samples: int, n_bins: int = 8
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean overproduction ratio per log-spaced bin of training frequency (one level, one checkpoint).

    Returns:
        centers: (B,) training frequency (fraction of training strings) at each bin's geometric centre;
        ratio: (B,) (sum of sample frequencies) / (sum of training frequencies) of the blocks in the bin;
        n_blocks: (B,) blocks per bin (bins with none give NaN ratios).
    """
    train_freq = np.asarray(train_count, float) / n_train
    sample_freq = np.asarray(sample_count, float) / max(n_samples, 1)
    low, high = train_freq.min(), train_freq.max()
    edges = (
        np.geomspace(low, high * 1.0001, n_bins + 1) if high > low else np.array([low, high * 1.0001 + 1e-12])
    )
    which = np.clip(np.searchsorted(edges, train_freq, side="right") - 1, 0, len(edges) - 2)
    n = len(edges) - 1
    n_blocks = np.bincount(which, minlength=n)
    t_sum = np.bincount(which, weights=train_freq, minlength=n)
    s_sum = np.bincount(which, weights=sample_freq, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(n_blocks > 0, s_sum / np.where(t_sum > 0, t_sum, 1.0), np.nan)
    centers = np.sqrt(edges[:-1] * edges[1:])
    return centers, ratio, n_blocks
