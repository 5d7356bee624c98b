"""Classify generated RHM strings against a training set: exact, hierarchical (block) copies, novel, invalid.

Levels follow ``grammar.json``: a block at level l is the s^(L-l) tokens under one depth-l node, so a
string has s^l blocks at level l (level 0 = the whole string, level L-1 = aligned s-token blocks).
A sample's level-l block is *copied* when some training string holds the identical block at the same
position. The chance rate of that event for a fresh grammar sample is exact: the probability that the
grammar emits one of the training set's blocks at that position (see :func:`chance_block_copy_fraction`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protomem.grammar import RHM, parse
from protomem.grammar.parsing import check_tokens
from protomem.grammar.prototypicality import level_blocks
from protomem.neighbors import exact_match_index, nearest_hamming, row_keys

STATUSES = ("copy", "novel_valid", "invalid")


def block_keys(tokens: np.ndarray, branching: int, depth: int, level: int) -> np.ndarray:
    """(P, s^level) void keys, one per aligned level-``level`` block, comparable across strings."""
    blocks = np.ascontiguousarray(level_blocks(tokens, branching, depth, level))
    width, block_len = blocks.shape[1], blocks.shape[2]
    return row_keys(blocks.reshape(-1, block_len)).reshape(tokens.shape[0], width)


def block_holder_counts(train_keys: np.ndarray, query_keys: np.ndarray) -> np.ndarray:
    """(K, W) int64: how many training strings hold each query block at the same position.

    Args:
        train_keys, query_keys: (P, W) and (K, W) keys from :func:`block_keys` at one level.
    """
    out = np.zeros(query_keys.shape, dtype=np.int64)
    for position in range(train_keys.shape[1]):
        unique, counts = np.unique(train_keys[:, position], return_counts=True)
        query = query_keys[:, position]
        pos = np.searchsorted(unique, query).clip(0, unique.size - 1)
        out[:, position] = np.where(unique[pos] == query, counts[pos], 0)
    return out


def block_holders(
    grammar: RHM, train_tokens: np.ndarray, block: np.ndarray, level: int, position: int
) -> np.ndarray:
    """Indices of the training strings whose level-``level`` block at ``position`` equals ``block``."""
    train = check_tokens(grammar, train_tokens)
    blocks = level_blocks(train, grammar.branching, grammar.depth, level)[:, position, :]
    return np.flatnonzero((blocks == np.asarray(block)[None, :]).all(axis=1))


@dataclass
class Classification:
    """Per-sample results of :func:`classify_samples` for K samples against P training strings.

    Attributes:
        copy_index: (K,) int64: index of the identical training string, or -1.
        status: (K,) object: "copy", "novel_valid" or "invalid".
        failing_level: (K,) int64: for invalid samples the lowest failing level (the deepest level index
            at which some block does not reduce: ``deepest_valid_level - 1``), else -1.
        block_copied: per level l, (K, s^l) bool: the block equals a training block at that position.
        block_holders: per level l, (K, s^l) int64: how many training strings hold that block there.
        nn_hamming: (K,) int64 Hamming distance to the nearest training string; nn_index (K,) its index.
        logprob: (K,) float64 log p(x) under the grammar, NaN for invalid samples.
    """

    copy_index: np.ndarray
    status: np.ndarray
    failing_level: np.ndarray
    block_copied: tuple[np.ndarray, ...]
    block_holders: tuple[np.ndarray, ...]
    nn_hamming: np.ndarray
    nn_index: np.ndarray
    logprob: np.ndarray

    def fractions(self) -> dict[str, float]:
        """Fractions of samples that are copies / novel valid / invalid, and of blocks copied per level."""
        count = max(len(self.status), 1)
        out = {f"frac_{name}": float((self.status == name).sum() / count) for name in STATUSES}
        out["frac_exact_copy"] = out.pop("frac_copy")
        for level, copied in enumerate(self.block_copied):
            out[f"frac_block_copy_l{level}"] = float(copied.mean()) if copied.size else float("nan")
        return out


def classify_samples(grammar: RHM, train_tokens: np.ndarray, samples: np.ndarray) -> Classification:
    """Classify every sample (K, N) against the training strings (P, N); see :class:`Classification`."""
    train = check_tokens(grammar, train_tokens)
    samples = check_tokens(grammar, samples)
    copy_index = exact_match_index(train, samples)
    parsed = parse(grammar, samples)
    valid = parsed.valid
    status = np.where(copy_index >= 0, "copy", np.where(valid, "novel_valid", "invalid")).astype(object)
    failing = np.where(valid, -1, parsed.deepest_valid_level - 1).astype(np.int64)
    copied, holders = [], []
    for level in range(grammar.depth):
        train_keys = block_keys(train, grammar.branching, grammar.depth, level)
        query_keys = block_keys(samples, grammar.branching, grammar.depth, level)
        counts = block_holder_counts(train_keys, query_keys)
        holders.append(counts)
        copied.append(counts > 0)
    distances, indices = nearest_hamming(train, samples, k=1)
    return Classification(
        copy_index=copy_index,
        status=status,
        failing_level=failing,
        block_copied=tuple(copied),
        block_holders=tuple(holders),
        nn_hamming=distances[:, 0],
        nn_index=indices[:, 0],
        logprob=parsed.logprob,
    )


def node_symbol_marginals(grammar: RHM) -> tuple[np.ndarray, ...]:
    """Per level l, (s^l, n_parents_l): probability that the depth-l node at each position holds each symbol.

    Level 0 is the uniform class prior; lower levels follow by pushing probability through the rules.
    """
    s, m = grammar.branching, grammar.rules_per_symbol
    current = np.full((1, grammar.n_classes), 1.0 / grammar.n_classes)
    out = [current]
    for level in range(grammar.depth - 1):
        rules, probs = grammar.rules[level], grammar.probs[level]  # (n_parents, m, s), (n_parents, m)
        width = current.shape[0]
        child = np.zeros((width * s, grammar.vocab_size))
        for c in range(s):
            for k in range(m):
                # mass flowing from each parent symbol through rule k into child slot c
                flow = current * probs[None, :, k]  # (width, n_parents)
                np.add.at(child[c::s], (slice(None), rules[:, k, c]), flow)
        current = child
        out.append(current)
    return tuple(out)


def block_inside(grammar: RHM, blocks: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray]:
    """Reduce level-``level`` blocks bottom-up.

    Args:
        blocks: (B, s^(L-level)) int64 tokens.

    Returns:
        symbol: (B,) int64 the depth-``level`` symbol the block derives from (-1 if it does not reduce);
        inside_logp: (B,) float64 log p(block | symbol), -inf if it does not reduce.
    """
    v, s = grammar.vocab_size, grammar.branching
    count = blocks.shape[0]
    children = np.asarray(blocks, dtype=np.int64)
    logp = np.zeros(count)
    invalid_code = v**s
    for rule_level in range(grammar.depth - 1, level - 1, -1):
        grouped = children.reshape(count, -1, s)
        bad = (grouped < 0).any(axis=2)
        code = np.zeros(grouped.shape[:2], dtype=np.int64)
        for j in range(s):
            code = code * v + np.where(bad, 0, grouped[..., j])
        code[bad] = invalid_code
        # grammar tables: tuple code -> parent symbol / log-probability at that rule level
        children = grammar._parent_of_tuple[rule_level][code].astype(np.int64)
        logp += grammar._logp_of_tuple[rule_level][code].sum(axis=1)
    symbol = children[:, 0]
    return symbol, np.where(symbol >= 0, logp, -np.inf)


def block_probability(grammar: RHM, blocks: np.ndarray, level: int, position: int) -> np.ndarray:
    """(B,) exact probability that a fresh grammar sample has ``blocks`` at (level, position)."""
    marginals = node_symbol_marginals(grammar)[level][position]
    symbol, inside = block_inside(grammar, blocks, level)
    return np.where(symbol >= 0, marginals[symbol.clip(0)] * np.exp(inside), 0.0)


def chance_block_copy_fraction(grammar: RHM, train_tokens: np.ndarray) -> np.ndarray:
    """(L,) exact expected fraction of a fresh grammar sample's level-l blocks that are training blocks.

    For level l: the mean over positions j of the summed probability of the distinct training blocks at
    (l, j). Entry 0 is the training set's probability mass.
    """
    train = check_tokens(grammar, train_tokens)
    s, depth = grammar.branching, grammar.depth
    out = np.zeros(depth)
    for level in range(depth):
        blocks = level_blocks(train, s, depth, level)
        total = 0.0
        for position in range(blocks.shape[1]):
            distinct = np.unique(blocks[:, position, :], axis=0)
            total += block_probability(grammar, distinct, level, position).sum()
        out[level] = total / blocks.shape[1]
    return out
