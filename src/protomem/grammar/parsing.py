"""Parsing strings bottom-up, vectorized: which blocks reduce, how deep the parse gets, log p(x).

Levels follow ``grammar.json``: the block at rule level l under a depth-l node holds s^(L-l) leaf tokens
(level 0 = the whole string, level L-1 = blocks of s tokens). A block *reduces* when its subtree has a
valid derivation, i.e. every rule from level l down to the leaves exists in the grammar.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protomem.errors import ProtomemError
from protomem.grammar.rhm import RHM


@dataclass
class ParseResult:
    """Per-string and per-block results of parsing P strings.

    Attributes:
        symbols: per level l, (P, s^l) int16: the symbol a depth-l block reduces to, or -1.
            ``symbols[0][:, 0]`` is the class.
        rules: per level l, (P, s^l) int16: the index k of the rule used at that node, or -1.
        deepest_valid_level: (P,) int64: the smallest level l such that every block at levels
            l..L-1 reduces; 0 = fully valid, L = not even the lowest level (pairs of s tokens) reduces.
        logprob: (P,) float64 exact log p(x) for valid strings, NaN otherwise.
    """

    symbols: tuple[np.ndarray, ...]
    rules: tuple[np.ndarray, ...]
    deepest_valid_level: np.ndarray
    logprob: np.ndarray

    @property
    def valid(self) -> np.ndarray:
        """(P,) bool: the whole string is a valid RHM string."""
        return self.deepest_valid_level == 0

    @property
    def classes(self) -> np.ndarray:
        """(P,) int64: the class of each valid string, -1 for invalid ones."""
        return self.symbols[0][:, 0]

    @property
    def block_valid(self) -> tuple[np.ndarray, ...]:
        """Per level l, (P, s^l) bool: the block reduces to a symbol."""
        return tuple(s >= 0 for s in self.symbols)

    @property
    def depth(self) -> int:
        return len(self.symbols)


def check_tokens(grammar: RHM, tokens: np.ndarray) -> np.ndarray:
    """Validate a (P, s^L) array of tokens in [0, v) and return it as int64."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] != grammar.length:
        raise ProtomemError(f"tokens must have shape (P, {grammar.length}), got {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= grammar.vocab_size):
        raise ProtomemError(f"tokens must lie in [0, {grammar.vocab_size})")
    return tokens.astype(np.int64, copy=False)


def parse(grammar: RHM, tokens: np.ndarray) -> ParseResult:
    """Parse a batch of strings (P, s^L) bottom-up; see :class:`ParseResult`."""
    tokens = check_tokens(grammar, tokens)
    v, s, depth = grammar.vocab_size, grammar.branching, grammar.depth
    count = tokens.shape[0]
    invalid_code = v**s  # the sentinel entry of the lookup tables maps to -1
    symbols: list[np.ndarray] = [np.empty(0)] * depth
    rules: list[np.ndarray] = [np.empty(0)] * depth
    level_valid = np.empty((count, depth), dtype=bool)
    node_logp = np.empty((count, (s**depth - 1) // (s - 1)))
    offset = 0
    children = tokens
    for level in range(depth - 1, -1, -1):
        width = s**level
        grouped = children.reshape(count, width, s)
        code = grouped[..., 0].astype(np.int64)
        bad = grouped[..., 0] < 0
        for j in range(1, s):
            code *= v
            code += grouped[..., j]
            bad |= grouped[..., j] < 0
        code[bad] = invalid_code
        parent = grammar._parent_of_tuple[level][code]
        symbols[level] = parent
        rules[level] = grammar._rule_of_tuple[level][code]
        np.take(grammar._logp_of_tuple[level], code, out=node_logp[:, offset : offset + width])
        offset += width
        level_valid[:, level] = parent.min(axis=1) >= 0
        children = parent
    # Validity is inherited upward, so the number of valid levels counts them from the bottom.
    deepest = depth - level_valid.sum(axis=1)
    logprob = node_logp.sum(axis=1) - np.log(grammar.n_classes)
    logprob[deepest != 0] = np.nan
    return ParseResult(
        symbols=tuple(symbols),
        rules=tuple(rules),
        deepest_valid_level=deepest.astype(np.int64),
        logprob=logprob,
    )


def valid_fraction_per_level(result: ParseResult) -> np.ndarray:
    """(L,) float: for each level l, the fraction of strings whose every block at level l reduces.

    Entry 0 is the fraction of fully valid strings; entry L-1 the fraction whose s-token blocks are all
    rules of the lowest level. Non-increasing towards level 0.
    """
    return np.array([(s >= 0).all(axis=1).mean() if s.shape[0] else np.nan for s in result.symbols])


def block_valid_fraction_per_level(result: ParseResult) -> np.ndarray:
    """(L,) float: for each level l, the fraction of all depth-l blocks (over all strings) that reduce."""
    return np.array([(s >= 0).mean() if s.size else np.nan for s in result.symbols])


def log_likelihood(grammar: RHM, tokens: np.ndarray) -> np.ndarray:
    """(P,) exact log p(x); -inf for strings the grammar cannot produce."""
    logprob = parse(grammar, tokens).logprob
    return np.where(np.isnan(logprob), -np.inf, logprob)
