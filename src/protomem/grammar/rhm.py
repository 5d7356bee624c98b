"""The Random Hierarchy Model (RHM): a random context-free grammar of fixed depth.

Every level has ``vocab_size`` (v) symbols; the root has ``n_classes`` (n) symbols. At rule level
``l`` (0 = the rules of the root classes, L-1 = the rules that emit leaf tokens), every parent symbol
owns ``rules_per_symbol`` (m) distinct s-tuples of child symbols, and no s-tuple belongs to two parents
of the same level, so every valid string has exactly one derivation. A string has s^L leaf tokens.

Example (v=2, n=1, m=2, s=2, L=2) — a string of 4 tokens and its tree::

             class 0
            /        \\          level 0: 0 -> (1, 0)
           1          0
          / \\        / \\       level 1: 1 -> (0, 0), 0 -> (1, 1)
         0   0      1   1
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from protomem.errors import ProtomemError

FORMAT = "protomem.rhm/1"


@dataclass(frozen=True, eq=False)
class RHM:
    """A sampled grammar. Build it with :func:`sample_grammar` or :func:`load_grammar`.

    Attributes:
        rules: per level l, int64 array (n_parents_l, m, s): ``rules[l][a, k]`` is the k-th s-tuple of
            parent symbol a. n_parents_0 = n_classes, n_parents_l = vocab_size for l >= 1.
        probs: per level l, float64 array (n_parents_l, m): ``probs[l][a, k]`` = p(rule k | parent a).
    """

    vocab_size: int
    n_classes: int
    rules_per_symbol: int
    branching: int
    depth: int
    rules: tuple[np.ndarray, ...]
    probs: tuple[np.ndarray, ...]
    seed: int | None = None
    zipf_exponent: float = 0.0
    zipf_levels: tuple[int, ...] | None = None
    # Derived lookup tables for parsing (built in __post_init__), indexed by the base-v code of an s-tuple:
    # _parent_of_tuple[l][code] = the parent symbol whose rule emits that tuple, or -1;
    # _rule_of_tuple[l][code] = that rule's index k, or -1; _logp_of_tuple[l][code] = its log-probability
    # (0 if none). The extra last entry (code v^s) is the "invalid child" sentinel.
    _parent_of_tuple: tuple[np.ndarray, ...] = field(init=False, repr=False)
    _rule_of_tuple: tuple[np.ndarray, ...] = field(init=False, repr=False)
    _logp_of_tuple: tuple[np.ndarray, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_parameters(self.vocab_size, self.n_classes, self.rules_per_symbol, self.branching, self.depth)
        v, s = self.vocab_size, self.branching
        parents, rule_ids, logps = [], [], []
        for level, (rules, probs) in enumerate(zip(self.rules, self.probs, strict=True)):
            codes = tuple_codes(rules, v).ravel()  # (n_parents * m,)
            if np.unique(codes).size != codes.size:
                raise ProtomemError(
                    "an s-tuple belongs to two rules of the same level", where=f"levels[{level}]"
                )
            n_parents = rules.shape[0]
            parent = np.full(v**s + 1, -1, dtype=np.int16)
            rule = np.full(v**s + 1, -1, dtype=np.int16)
            logp = np.zeros(v**s + 1)
            parent[codes] = np.repeat(np.arange(n_parents), self.rules_per_symbol)
            rule[codes] = np.tile(np.arange(self.rules_per_symbol), n_parents)
            logp[codes] = np.log(probs).ravel()
            parents.append(parent)
            rule_ids.append(rule)
            logps.append(logp)
        object.__setattr__(self, "_parent_of_tuple", tuple(parents))
        object.__setattr__(self, "_rule_of_tuple", tuple(rule_ids))
        object.__setattr__(self, "_logp_of_tuple", tuple(logps))

    @property
    def length(self) -> int:
        """Number of leaf tokens per string, s^L."""
        return self.branching**self.depth

    @property
    def log_probs(self) -> tuple[np.ndarray, ...]:
        """Per level, log p(rule k | parent a), shape (n_parents_l, m)."""
        return tuple(np.log(p) for p in self.probs)

    def n_parents(self, level: int) -> int:
        return self.n_classes if level == 0 else self.vocab_size

    def to_dict(self) -> dict:
        """The ``protomem.rhm/1`` JSON document (see README)."""
        return {
            "format": FORMAT,
            "vocab_size": self.vocab_size,
            "n_classes": self.n_classes,
            "rules_per_symbol": self.rules_per_symbol,
            "branching": self.branching,
            "depth": self.depth,
            "seed": self.seed,
            "zipf_exponent": self.zipf_exponent,
            "zipf_levels": None if self.zipf_levels is None else list(self.zipf_levels),
            "levels": [
                {"rules": rules.tolist(), "probs": probs.tolist()}
                for rules, probs in zip(self.rules, self.probs, strict=True)
            ],
        }


def tuple_codes(tuples: np.ndarray, base: int) -> np.ndarray:
    """Encode s-tuples (last axis) as integers in [0, base^s), most significant digit first."""
    s = tuples.shape[-1]
    weights = base ** np.arange(s - 1, -1, -1, dtype=np.int64)
    return tuples.astype(np.int64) @ weights


def check_parameters(
    vocab_size: int, n_classes: int, rules_per_symbol: int, branching: int, depth: int
) -> None:
    """Raise :class:`ProtomemError` with a clear message if no RHM has these parameters."""
    named = {
        "vocab_size": vocab_size,
        "n_classes": n_classes,
        "rules_per_symbol": rules_per_symbol,
        "branching": branching,
        "depth": depth,
    }
    for name, value in named.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ProtomemError(f"{name} must be a positive integer, got {value!r}")
    if branching < 2:
        raise ProtomemError(f"branching must be at least 2, got {branching}")
    from protomem import limits

    limits.VOCAB.check(vocab_size, "vocab_size")
    limits.VOCAB.check(n_classes, "n_classes")
    # s^L and v^s are compared on a log scale first: computing them for a huge exponent never ends
    if depth * math.log2(branching) > 62:
        raise ProtomemError(
            f"strings of branching**depth = {branching}**{depth} tokens exceed the limit of "
            f"{limits.STRING_TOKENS.value():,} tokens (raise it with {limits.STRING_TOKENS.env}=N)"
        )
    limits.STRING_TOKENS.check(branching**depth, "string length branching**depth")
    if branching * math.log2(vocab_size) > 62:
        raise ProtomemError(
            f"vocab_size**branching = {vocab_size}**{branching} tuples exceed the limit of "
            f"{limits.GRAMMAR_TUPLES.value():,} (raise it with {limits.GRAMMAR_TUPLES.env}=N)"
        )
    n_tuples = vocab_size**branching
    limits.GRAMMAR_TUPLES.check(n_tuples, "vocab_size**branching (tuples per level)")
    if n_classes * rules_per_symbol > n_tuples:
        raise ProtomemError(
            f"impossible grammar: n_classes*rules_per_symbol = {n_classes}*{rules_per_symbol} = "
            f"{n_classes * rules_per_symbol} exceeds the {n_tuples} distinct {branching}-tuples of "
            f"{vocab_size} symbols"
        )
    if depth > 1 and vocab_size * rules_per_symbol > n_tuples:
        raise ProtomemError(
            f"impossible grammar: vocab_size*rules_per_symbol = {vocab_size}*{rules_per_symbol} = "
            f"{vocab_size * rules_per_symbol} exceeds the {n_tuples} distinct {branching}-tuples of "
            f"{vocab_size} symbols"
        )


def zipf_probs(n_rules: int, exponent: float) -> np.ndarray:
    """p(rank k) ∝ (k+1)^(-exponent) for k = 0..n_rules-1; exponent 0 is uniform."""
    weights = np.arange(1, n_rules + 1, dtype=np.float64) ** (-float(exponent))
    return weights / weights.sum()


def sample_grammar(
    vocab_size: int,
    n_classes: int,
    rules_per_symbol: int,
    branching: int,
    depth: int,
    seed: int = 0,
    zipf_exponent: float = 0.0,
    zipf_levels: Sequence[int] | None = None,
) -> RHM:
    """Draw a random RHM.

    Args:
        zipf_exponent: a >= 0; rule probabilities p(rank k) ∝ (k+1)^(-a) on the skewed levels, uniform
            elsewhere. Which rule of a symbol gets which rank is random.
        zipf_levels: rule levels (0 = root) that are skewed; None for all levels.
    """
    check_parameters(vocab_size, n_classes, rules_per_symbol, branching, depth)
    if not (zipf_exponent >= 0 and math.isfinite(zipf_exponent)):
        raise ProtomemError(f"zipf_exponent must be a finite number >= 0, got {zipf_exponent}")
    levels_skewed = _check_zipf_levels(zipf_levels, depth)
    rng = np.random.default_rng(seed)
    v, m, s = vocab_size, rules_per_symbol, branching
    digits = v ** np.arange(s - 1, -1, -1, dtype=np.int64)
    rules, probs = [], []
    for level in range(depth):
        n_parents = n_classes if level == 0 else v
        codes = rng.choice(v**s, size=n_parents * m, replace=False)
        tuples = (codes[:, None] // digits) % v
        rules.append(tuples.reshape(n_parents, m, s).astype(np.int64))
        exponent = zipf_exponent if (levels_skewed is None or level in levels_skewed) else 0.0
        ranked = zipf_probs(m, exponent)
        ranks = rng.permuted(np.tile(np.arange(m), (n_parents, 1)), axis=1)
        probs.append(ranked[ranks])
    return RHM(
        vocab_size=v,
        n_classes=n_classes,
        rules_per_symbol=m,
        branching=s,
        depth=depth,
        rules=tuple(rules),
        probs=tuple(probs),
        seed=seed,
        zipf_exponent=float(zipf_exponent),
        zipf_levels=levels_skewed,
    )


def _check_zipf_levels(zipf_levels: Sequence[int] | None, depth: int) -> tuple[int, ...] | None:
    if zipf_levels is None:
        return None
    levels = tuple(sorted({int(level) for level in zipf_levels}))
    for level in levels:
        if not 0 <= level < depth:
            raise ProtomemError(f"zipf level {level} out of range [0, {depth})")
    return levels


def grammar_from_dict(doc: object, path: str | os.PathLike | None = None) -> RHM:
    """Validate a ``protomem.rhm/1`` document and build the grammar; errors name the field."""

    def fail(message: str, where: str) -> ProtomemError:
        return ProtomemError(message, path=path, where=where)

    if not isinstance(doc, dict):
        raise fail("expected a JSON object", "top level")
    if doc.get("format") != FORMAT:
        raise fail(f"expected {FORMAT!r}, got {doc.get('format')!r}", "format")
    ints = {}
    for name in ("vocab_size", "n_classes", "rules_per_symbol", "branching", "depth"):
        value = doc.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise fail(f"must be a positive integer, got {value!r}", name)
        ints[name] = value
    try:
        check_parameters(**ints)
    except ProtomemError as exc:
        raise fail(exc.message, "parameters") from None
    v, n, m, s, depth = (
        ints[k] for k in ("vocab_size", "n_classes", "rules_per_symbol", "branching", "depth")
    )
    exponent = doc.get("zipf_exponent", 0.0)
    if isinstance(exponent, bool) or not isinstance(exponent, (int, float)) or not 0 <= exponent < math.inf:
        raise fail(f"must be a finite number >= 0, got {exponent!r}", "zipf_exponent")
    zipf_levels = doc.get("zipf_levels")
    if zipf_levels is not None and (
        not isinstance(zipf_levels, list)
        or not all(isinstance(x, int) and 0 <= x < depth for x in zipf_levels)
    ):
        raise fail(f"must be null or a list of levels in [0, {depth})", "zipf_levels")
    seed = doc.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise fail(f"must be an integer or null, got {seed!r}", "seed")
    levels = doc.get("levels")
    if not isinstance(levels, list) or len(levels) != depth:
        raise fail(f"must be a list of {depth} levels", "levels")
    rules, probs = [], []
    for level, entry in enumerate(levels):
        n_parents = n if level == 0 else v
        where = f"levels[{level}]"
        if not isinstance(entry, dict):
            raise fail("expected an object with 'rules' and 'probs'", where)
        try:
            r = np.asarray(entry.get("rules"), dtype=np.float64)
            q = np.asarray(entry.get("probs"), dtype=np.float64)
        except (TypeError, ValueError):
            raise fail("rules and probs must be nested lists of numbers", where) from None
        if r.shape != (n_parents, m, s):
            raise fail(f"shape {r.shape}, expected ({n_parents}, {m}, {s})", where + ".rules")
        if not np.all(r == np.round(r)) or r.min() < 0 or r.max() >= v:
            raise fail(f"symbols must be integers in [0, {v})", where + ".rules")
        if q.shape != (n_parents, m):
            raise fail(f"shape {q.shape}, expected ({n_parents}, {m})", where + ".probs")
        if not np.all(np.isfinite(q)) or q.min() <= 0:
            raise fail("probabilities must be positive numbers", where + ".probs")
        bad = np.flatnonzero(np.abs(q.sum(axis=1) - 1.0) > 1e-6)
        if bad.size:
            raise fail(
                f"probabilities of symbol {bad[0]} sum to {q[bad[0]].sum():.6g}, not 1", where + ".probs"
            )
        r_int = r.astype(np.int64)
        codes = tuple_codes(r_int, v)
        for parent in range(n_parents):
            if np.unique(codes[parent]).size != m:
                raise fail(f"symbol {parent} has two identical rules", where + ".rules")
        if np.unique(codes).size != codes.size:
            raise fail(
                "an s-tuple belongs to two symbols of the same level (derivations would be ambiguous)",
                where + ".rules",
            )
        rules.append(r_int)
        probs.append(q)
    return RHM(
        vocab_size=v,
        n_classes=n,
        rules_per_symbol=m,
        branching=s,
        depth=depth,
        rules=tuple(rules),
        probs=tuple(probs),
        seed=seed,
        zipf_exponent=float(exponent),
        zipf_levels=None if zipf_levels is None else tuple(zipf_levels),
    )


def load_grammar(path: str | os.PathLike) -> RHM:
    """Read and validate ``grammar.json``."""
    from protomem.textio import load_json

    return grammar_from_dict(load_json(path, "grammar file"), path=path)


def save_grammar(grammar: RHM, path: str | os.PathLike) -> None:
    """Write ``grammar.json`` atomically."""
    from protomem.io import write_json_atomic

    write_json_atomic(path, grammar.to_dict())
