"""Sampling strings from an RHM, vectorized over strings and tree nodes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protomem.errors import ProtomemError
from protomem.grammar.rhm import RHM
from protomem.neighbors import row_keys

_CHUNK = 1 << 15  # strings per vectorized chunk: keeps the working set in cache


@dataclass
class Derivations:
    """Strings with their full derivation trees.

    Attributes:
        tokens: (P, s^L) int64 leaf tokens in [0, v).
        classes: (P,) int64 root class.
        rules: per rule level l, (P, s^l) int16: index k of the rule applied at each depth-l node.
        symbols: per level l, (P, s^l) int16: the symbol at each depth-l node (level 0 = class).
        logprob: (P,) float64 exact log p(x) = log(1/n) + sum of log rule probabilities.
    """

    tokens: np.ndarray
    classes: np.ndarray
    rules: tuple[np.ndarray, ...]
    symbols: tuple[np.ndarray, ...]
    logprob: np.ndarray

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def take(self, index: np.ndarray) -> Derivations:
        """The subset of strings at ``index`` (in that order)."""
        return Derivations(
            tokens=self.tokens[index],
            classes=self.classes[index],
            rules=tuple(r[index] for r in self.rules),
            symbols=tuple(s[index] for s in self.symbols),
            logprob=self.logprob[index],
        )

    @staticmethod
    def concatenate(parts: list[Derivations]) -> Derivations:
        return Derivations(
            tokens=np.concatenate([p.tokens for p in parts]),
            classes=np.concatenate([p.classes for p in parts]),
            rules=tuple(np.concatenate(level) for level in zip(*(p.rules for p in parts), strict=True)),
            symbols=tuple(np.concatenate(level) for level in zip(*(p.symbols for p in parts), strict=True)),
            logprob=np.concatenate([p.logprob for p in parts]),
        )


_GUIDE_BITS = 12
_GUIDE_BINS = 1 << _GUIDE_BITS  # guide-table bins per parent symbol


def _guide_table(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact inverse-CDF draws in O(1): a guide table over u ~ U[0,1) for each row of ``probs``.

    The rule drawn by u for parent a is k(u) = #{j < m-1 : cdf[a, j] <= u}. Bin b = floor(u * R) covers
    [b/R, (b+1)/R); ``table[a*R + b]`` is k(u) when it is the same for the whole bin, else -1 (only the
    few bins holding a CDF boundary), and those are resolved against ``inner_cdf`` (n_parents, m-1).
    """
    n_parents, m = probs.shape
    inner_cdf = np.cumsum(probs, axis=1)[:, :-1]
    edges = np.arange(_GUIDE_BINS + 1) / _GUIDE_BINS
    # rule at the left edge of each bin, and the number of boundaries strictly below the right edge
    at_left = (inner_cdf[:, None, :] <= edges[None, :-1, None]).sum(axis=2)
    below_right = (inner_cdf[:, None, :] < edges[None, 1:, None]).sum(axis=2)
    table = np.where(at_left == below_right, at_left, -1).astype(np.int64)
    return table.ravel(), inner_cdf


class _Sampler:
    """Precomputed flat tables for fast ancestral sampling of one grammar.

    Rows of the rule tables are indexed by ``a*m + k`` (parent a, rule k). The guide tables store that
    row index directly. The s children of a rule are stored as one opaque s*8-byte item so that a single
    1-D gather fetches all of them (a 2-D fancy index is ~10x slower in numpy).
    """

    def __init__(self, grammar: RHM) -> None:
        self.grammar = grammar
        self.m = grammar.rules_per_symbol
        item = np.dtype((np.void, 8 * grammar.branching))
        self.guide, self.inner_cdf, self.children, self.logp, self.uniform = [], [], [], [], []
        for rules, probs in zip(grammar.rules, grammar.probs, strict=True):
            guide, inner_cdf = _guide_table(probs)
            parent_row = np.repeat(np.arange(probs.shape[0]) * self.m, _GUIDE_BINS)
            self.guide.append(np.where(guide >= 0, parent_row + guide, -1))
            self.inner_cdf.append(inner_cdf)
            self.uniform.append(bool(np.all(probs == probs[:, :1])))
            self.children.append(
                np.ascontiguousarray(rules.reshape(-1, grammar.branching)).view(item).ravel()
            )
            self.logp.append(np.log(probs).ravel())

    def sample_into(
        self, out: Derivations, start: int, classes: np.ndarray, rng: np.random.Generator
    ) -> None:
        """Sample strings with the given root classes into rows ``start:start+len(classes)`` of ``out``."""
        g, m = self.grammar, self.m
        count = classes.shape[0]
        rows = slice(start, start + count)
        node_logp = np.empty((count, (g.length - 1) // (g.branching - 1)))
        current = classes.astype(np.int64)[:, None]  # (B, 1) symbols at depth 0
        offset = 0
        for level in range(g.depth):
            width = current.shape[1]
            out.symbols[level][rows] = current
            bits = rng.bit_generator.random_raw(current.shape)  # uint64: u = bits / 2^64
            if self.uniform[level]:
                flat = current * m + ((bits >> np.uint64(11)) * (m * 2.0**-53)).astype(np.int64)
            else:
                guide_bin = (bits >> np.uint64(64 - _GUIDE_BITS)).astype(np.int64)
                flat = self.guide[level][guide_bin + (current << _GUIDE_BITS)]
                unresolved = flat < 0
                if unresolved.any():
                    u = (bits[unresolved] >> np.uint64(11)) * 2.0**-53
                    parents = current[unresolved]
                    rule = (self.inner_cdf[level][parents] <= u[:, None]).sum(axis=1)
                    flat[unresolved] = parents * m + rule
            out.rules[level][rows] = flat - current * m
            np.take(self.logp[level], flat, out=node_logp[:, offset : offset + width])
            offset += width
            current = self.children[level][flat].view(np.int64).reshape(count, -1)
        out.tokens[rows] = current
        out.logprob[rows] = node_logp.sum(axis=1) - np.log(g.n_classes)


def _empty_derivations(grammar: RHM, count: int) -> Derivations:
    s = grammar.branching
    return Derivations(
        tokens=np.empty((count, grammar.length), dtype=np.int64),
        classes=np.empty(count, dtype=np.int64),
        rules=tuple(np.empty((count, s**level), dtype=np.int16) for level in range(grammar.depth)),
        symbols=tuple(np.empty((count, s**level), dtype=np.int16) for level in range(grammar.depth)),
        logprob=np.empty(count, dtype=np.float64),
    )


def sample_strings(
    grammar: RHM,
    count: int,
    seed: int | np.random.Generator = 0,
    classes: np.ndarray | None = None,
) -> Derivations:
    """Draw ``count`` strings i.i.d. from the grammar (with replacement).

    Args:
        classes: optional (count,) root classes to condition on; default uniform.
    """
    if count < 0:
        raise ProtomemError(f"count must be >= 0, got {count}")
    rng = np.random.default_rng(seed)
    if classes is None:
        classes = rng.integers(0, grammar.n_classes, size=count)
    else:
        classes = np.asarray(classes, dtype=np.int64)
        if classes.shape != (count,) or (classes < 0).any() or (classes >= grammar.n_classes).any():
            raise ProtomemError(f"classes must be {count} integers in [0, {grammar.n_classes})")
    sampler = _Sampler(grammar)
    out = _empty_derivations(grammar, count)
    out.classes[:] = classes
    for start in range(0, count, _CHUNK):
        sampler.sample_into(out, start, classes[start : start + _CHUNK], rng)
    return out


def sample_distinct_strings(grammar: RHM, count: int, seed: int | np.random.Generator = 0) -> Derivations:
    """Draw ``count`` distinct strings: sequential sampling from the grammar without replacement.

    Equivalent to drawing i.i.d. strings and keeping each first occurrence. When the request is a
    large share of a small grammar, the strings are enumerated and drawn by the Gumbel-top-k trick
    (the same distribution, without the slow tail of rejections).
    """
    from protomem.grammar.counting import enumerate_strings, n_valid_strings

    total = n_valid_strings(grammar)
    if count > total:
        raise ProtomemError(f"cannot draw {count} distinct strings: the grammar has only {total}")
    rng = np.random.default_rng(seed)
    if total <= 2_000_000 and count > total // 4:
        every = enumerate_strings(grammar)
        keys = np.log(rng.random(len(every))) / np.exp(every.logprob)  # Efraimidis–Spirakis keys
        order = np.argsort(-keys, kind="stable")[:count]
        return every.take(order)
    parts: list[Derivations] = []
    seen = np.empty(0, dtype=row_keys(np.zeros((1, grammar.length), dtype=np.int64)).dtype)
    have = 0
    while have < count:
        batch = sample_strings(grammar, max(2 * (count - have), 1024), seed=rng)
        keys = row_keys(batch.tokens)
        _, first = np.unique(keys, return_index=True)
        first.sort()
        fresh = first[~np.isin(keys[first], seen)][: count - have]
        parts.append(batch.take(fresh))
        seen = np.concatenate([seen, keys[fresh]])
        have += fresh.size
    return Derivations.concatenate(parts)
