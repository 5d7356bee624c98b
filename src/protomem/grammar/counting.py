"""How many valid strings a grammar has, and all of them for tiny grammars."""

from __future__ import annotations

import numpy as np

from protomem.errors import ProtomemError
from protomem.grammar.rhm import RHM
from protomem.grammar.sampling import Derivations


def n_internal_nodes(branching: int, depth: int) -> int:
    """Nodes that apply a rule: 1 + s + ... + s^(L-1) = (s^L - 1) / (s - 1)."""
    return (branching**depth - 1) // (branching - 1)


def n_valid_strings(grammar: RHM) -> int:
    """n * m^((s^L - 1)/(s - 1)): every derivation gives a distinct string (exact Python int)."""
    return grammar.n_classes * grammar.rules_per_symbol ** n_internal_nodes(grammar.branching, grammar.depth)


def enumerate_strings(grammar: RHM, max_count: int = 2_000_000) -> Derivations:
    """Every valid string with its derivation and log-probability, in derivation order.

    Raises:
        ProtomemError: if the grammar has more than ``max_count`` strings.
    """
    total = n_valid_strings(grammar)
    if total > max_count:
        raise ProtomemError(f"the grammar has {total} strings; enumeration is capped at {max_count}")
    m, s = grammar.rules_per_symbol, grammar.branching
    current = np.arange(grammar.n_classes, dtype=np.int64)[:, None]
    logprob = np.full(grammar.n_classes, -np.log(grammar.n_classes))
    symbols: list[np.ndarray] = []
    rules: list[np.ndarray] = []
    for level in range(grammar.depth):
        width = current.shape[1]
        # every assignment of one of m rules to each of the `width` nodes: (m^width, width)
        choices = np.indices((m,) * width).reshape(width, -1).T
        n_before, n_choices = current.shape[0], choices.shape[0]
        symbols = [np.repeat(sym, n_choices, axis=0) for sym in symbols]
        rules = [np.repeat(rule, n_choices, axis=0) for rule in rules]
        current = np.repeat(current, n_choices, axis=0)
        chosen = np.tile(choices, (n_before, 1))
        symbols.append(current)
        rules.append(chosen)
        logprob = np.repeat(logprob, n_choices) + np.log(grammar.probs[level][current, chosen]).sum(axis=1)
        current = grammar.rules[level][current, chosen].reshape(current.shape[0], width * s)
    return Derivations(
        tokens=current,
        classes=symbols[0][:, 0].copy(),
        rules=tuple(rules),
        symbols=tuple(symbols),
        logprob=logprob,
    )
