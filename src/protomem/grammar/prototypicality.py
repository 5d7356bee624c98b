"""How prototypical each string is relative to a training set: one score family per function.

"Prototypical" here means made of common parts. For a string x and a training set T (P strings):

- block frequency at level l, same position: for each of x's s^l blocks at level l (the s^(L-l) tokens
  under one depth-l node), the number of training strings whose block at that position is identical;
- block frequency at level l, any position: the number of level-l blocks anywhere in T identical to it;
- rule frequency at level l: for each depth-l node of x's derivation, how often T's derivations use the
  same rule (parent symbol and rule index) at level l;
- log-likelihood log p(x) under the grammar;
- Hamming distance to the nearest training string.

Scores of the training strings themselves are leave-one-out: a string's own occurrence is not counted
(so a block no other training string shares scores 0), and its nearest neighbour is another string.
"""

from __future__ import annotations

import numpy as np

from protomem.errors import ProtomemError
from protomem.grammar.parsing import check_tokens, parse
from protomem.grammar.rhm import RHM
from protomem.neighbors import nearest_hamming, row_keys


def level_blocks(tokens: np.ndarray, branching: int, depth: int, level: int) -> np.ndarray:
    """(P, s^level, s^(depth-level)) view of the aligned level-``level`` blocks of each string."""
    width = branching**level
    return tokens.reshape(tokens.shape[0], width, branching ** (depth - level))


def _count_matches(train_keys: np.ndarray, query_keys: np.ndarray) -> np.ndarray:
    """For each query key, how many train keys are identical (any shape; returns query's shape)."""
    unique, counts = np.unique(train_keys.ravel(), return_counts=True)
    flat = query_keys.ravel()
    if unique.size == 0:
        return np.zeros(query_keys.shape, dtype=np.int64)
    pos = np.searchsorted(unique, flat).clip(0, unique.size - 1)
    found = unique[pos] == flat
    return np.where(found, counts[pos], 0).reshape(query_keys.shape)


def block_frequency(
    grammar: RHM, train_tokens: np.ndarray, tokens: np.ndarray | None = None, level: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Per-block frequencies of ``tokens``' level-``level`` blocks in the training set.

    Args:
        tokens: (K, N) strings to score; None scores the training strings leave-one-out.

    Returns:
        same_position: (K, s^level) int64, training strings holding the identical block at that position.
        any_position: (K, s^level) int64, identical level-``level`` blocks anywhere in the training set.
    """
    train = check_tokens(grammar, train_tokens)
    query = train if tokens is None else check_tokens(grammar, tokens)
    s, depth = grammar.branching, grammar.depth
    if not 0 <= level < depth:
        raise ProtomemError(f"level must be in [0, {depth}), got {level}")
    width = s**level
    block_len = s ** (depth - level)
    train_blocks = np.ascontiguousarray(level_blocks(train, s, depth, level)).reshape(-1, block_len)
    query_blocks = np.ascontiguousarray(level_blocks(query, s, depth, level)).reshape(-1, block_len)
    train_keys = row_keys(train_blocks).reshape(train.shape[0], width)
    query_keys = row_keys(query_blocks).reshape(query.shape[0], width)
    # Same position: tag each block with its position so blocks only match at the same place.
    positions = np.arange(width, dtype=np.int64)
    train_tagged = np.concatenate([np.tile(positions, train.shape[0])[:, None], train_blocks], axis=1)
    query_tagged = np.concatenate([np.tile(positions, query.shape[0])[:, None], query_blocks], axis=1)
    same = _count_matches(row_keys(train_tagged), row_keys(query_tagged)).reshape(query.shape[0], width)
    anywhere = _count_matches(train_keys, query_keys)
    if tokens is None:
        same = same - 1
        # a string's own blocks: each of its level-l blocks that equal this one (itself included)
        own = (query_keys[:, :, None] == query_keys[:, None, :]).sum(axis=2)
        anywhere = anywhere - own
    return same.astype(np.int64), anywhere.astype(np.int64)


def rule_frequency(
    grammar: RHM, train_tokens: np.ndarray, tokens: np.ndarray | None = None
) -> tuple[np.ndarray, ...]:
    """Per level l, (K, s^l) float: how often the training derivations use each node's rule at level l.

    NaN where the node's block does not reduce (invalid strings have no rule there).
    Training strings must be valid; ``tokens=None`` scores the training strings leave-one-out.
    """
    train_parse = parse(grammar, train_tokens)
    if not train_parse.valid.all():
        bad = int(np.flatnonzero(~train_parse.valid)[0])
        raise ProtomemError(f"training string {bad} is not a valid string of the grammar")
    query_parse = train_parse if tokens is None else parse(grammar, tokens)
    m = grammar.rules_per_symbol
    out = []
    for level in range(grammar.depth):
        n_rules = grammar.n_parents(level) * m
        train_ids = train_parse.symbols[level].astype(np.int64) * m + train_parse.rules[level]
        counts = np.bincount(train_ids.ravel(), minlength=n_rules)
        symbols = query_parse.symbols[level].astype(np.int64)
        ok = symbols >= 0
        ids = np.where(ok, symbols * m + query_parse.rules[level], 0)
        freq = counts[ids].astype(np.float64)
        if tokens is None:
            # subtract the string's own uses of the same rule at this level (itself included)
            freq -= (ids[:, :, None] == ids[:, None, :]).sum(axis=2)
        out.append(np.where(ok, freq, np.nan))
    return tuple(out)


def prototypicality_table(
    grammar: RHM, train_tokens: np.ndarray, tokens: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """All prototypicality scores, one row per string (the training set itself when ``tokens`` is None).

    Columns (each a (K,) array):
        logprob: log p(x) (NaN if invalid).
        block_count_same_pos_l{l}, block_count_any_pos_l{l} for l in 0..L-1: mean over the string's
            level-l blocks of :func:`block_frequency` (level 0 = whole-string duplicates).
        rule_count_l{l} for l in 0..L-1 and rule_count_mean (over all nodes): mean
            :func:`rule_frequency` (NaN for strings that do not parse).
        nn_hamming: Hamming distance (tokens) to the nearest (other) training string.
    """
    train = check_tokens(grammar, train_tokens)
    query = train if tokens is None else check_tokens(grammar, tokens)
    table: dict[str, np.ndarray] = {"logprob": parse(grammar, query).logprob}
    for level in range(grammar.depth):
        same, anywhere = block_frequency(grammar, train, tokens if tokens is None else query, level)
        table[f"block_count_same_pos_l{level}"] = same.mean(axis=1)
        table[f"block_count_any_pos_l{level}"] = anywhere.mean(axis=1)
    rules = rule_frequency(grammar, train, tokens if tokens is None else query)
    for level, freq in enumerate(rules):
        table[f"rule_count_l{level}"] = freq.mean(axis=1)
    table["rule_count_mean"] = np.concatenate(rules, axis=1).mean(axis=1)
    distances, _ = nearest_hamming(train, query, k=1, exclude_self=tokens is None)
    table["nn_hamming"] = distances[:, 0].astype(np.float64)
    return table
