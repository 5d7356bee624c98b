"""Training-set designs: a plain draw from the grammar, or a *matched* set in which the primary
prototypicality score and log p(x) are (nearly) uncorrelated.

Why: prototypical strings (made of common rules) are also likely ones, so in a plain draw the rule-count
score and log p(x) have Spearman rho ~ 0.6-0.7, and a model that copies likely strings first looks as if
it copied prototypical ones first. The matched design removes that confound by construction rather than
only by the nulls: draw a pool of distinct grammar strings (``pool_factor`` x P), start from a plain draw
of P of them, then repeatedly exchange a training string for a pool string *of nearly the same log p(x)*
(the nearest ``stratum`` candidates in log p(x)) whose rule counts lie on the other side, until the
training set's Spearman rho(score, log p(x)) is within ``tolerance`` of 0. Every exchange is matched on
log p(x), so the set keeps the grammar's spread of likelihoods; what changes is which rule counts go with
which likelihood. The score is the training set's own leave-one-out rule count (recomputed exactly after
every exchange), i.e. the very score the study tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protomem.errors import ProtomemError
from protomem.grammar import RHM, Derivations, sample_distinct_strings
from protomem.grammar.counting import n_valid_strings
from protomem.neighbors import row_keys
from protomem.study.stats import spearman


@dataclass
class TrainingSet:
    """The P training strings and how they were chosen.

    Attributes:
        strings: the training strings with their derivations.
        design: "random" (a plain distinct draw) or "matched".
        rho_score_logprob: Spearman rho of the rule-count score and log p(x) in the chosen set.
        rho_score_logprob_random: the same in the plain draw the matched design started from.
        pool_size: strings in the pool (matched) or P (random).
        exchanges: exchanges made (matched).
    """

    strings: Derivations
    design: str
    rho_score_logprob: float
    rho_score_logprob_random: float
    pool_size: int
    exchanges: int

    def summary(self) -> dict[str, float | int | str]:
        return {
            "design": self.design,
            "rho_score_logprob": self.rho_score_logprob,
            "rho_score_logprob_random": self.rho_score_logprob_random,
            "pool_size": self.pool_size,
            "exchanges": self.exchanges,
        }


def rule_ids(strings: Derivations, grammar: RHM) -> tuple[np.ndarray, np.ndarray]:
    """(M, nodes) global rule id of every node of every derivation, and (nodes,) the level of each node."""
    m = grammar.rules_per_symbol
    ids, levels, offset = [], [], 0
    for level in range(grammar.depth):
        symbols = strings.symbols[level].astype(np.int64)
        ids.append(offset + symbols * m + strings.rules[level].astype(np.int64))
        levels.append(np.full(symbols.shape[1], level))
        offset += grammar.n_parents(level) * m
    return np.concatenate(ids, axis=1), np.concatenate(levels)


def _own_uses(ids: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """(M, nodes) how many nodes of the same string and level use the same rule (itself included)."""
    same_level = levels[:, None] == levels[None, :]
    return ((ids[:, :, None] == ids[:, None, :]) & same_level[None]).sum(axis=2)


def rule_count_scores(ids: np.ndarray, own: np.ndarray, member: np.ndarray, n_rules: int) -> np.ndarray:
    """(M,) rule_count_mean of every pool string against the training set ``member`` (M,) bool.

    Members are scored leave-one-out (their own uses subtracted), as ``prototypicality_table`` does;
    non-members by the plain counts of their rules among the members' derivations.
    """
    counts = np.bincount(ids[member].ravel(), minlength=n_rules)
    freq = counts[ids] - np.where(member[:, None], own, 0)
    return freq.mean(axis=1)


def _n_rules(grammar: RHM) -> int:
    return sum(grammar.n_parents(level) * grammar.rules_per_symbol for level in range(grammar.depth))


def draw_training_set(
    grammar: RHM,
    n_train: int,
    *,
    seed: int,
    design: str = "random",
    pool_factor: int = 8,
    tolerance: float = 0.01,
    stratum: int = 40,
    max_exchanges: int | None = None,
) -> TrainingSet:
    """P distinct training strings, drawn plainly or by the matched design (module docstring).

    Args:
        pool_factor: the matched design's pool holds pool_factor x P distinct strings (capped at the
            grammar's size).
        tolerance: stop when |rho(score, log p(x))| <= tolerance.
        stratum: each exchange picks among the ``stratum`` pool strings nearest in log p(x) to the one
            it replaces.
        max_exchanges: give up after this many exchanges (default 4 P); the achieved rho is recorded.
    """
    if design not in ("random", "matched"):
        raise ProtomemError(f"unknown training-set design {design!r} (random or matched)")
    if design == "random":
        strings = sample_distinct_strings(grammar, n_train, seed=seed)
        ids, levels = rule_ids(strings, grammar)
        member = np.ones(len(strings), dtype=bool)
        score = rule_count_scores(ids, _own_uses(ids, levels), member, _n_rules(grammar))
        rho = spearman(score, tied_logprob(strings.logprob))
        return TrainingSet(strings, "random", rho, rho, n_train, 0)

    pool_size = int(min(pool_factor * n_train, n_valid_strings(grammar)))
    if pool_size <= n_train:
        raise ProtomemError(
            f"the matched design needs a pool larger than P = {n_train}, but the grammar has only "
            f"{n_valid_strings(grammar)} strings"
        )
    # The pool starts with the random design's training set (the exchanges start from it), then more
    # distinct strings from the grammar.
    plain = sample_distinct_strings(grammar, n_train, seed=seed)
    more = sample_distinct_strings(grammar, pool_size, seed=seed + 0x9E37)
    fresh = np.flatnonzero(~np.isin(row_keys(more.tokens), row_keys(plain.tokens)))
    pool = Derivations.concatenate([plain, more.take(fresh[: pool_size - n_train])])
    pool_size = len(pool)
    ids, levels = rule_ids(pool, grammar)
    own = _own_uses(ids, levels)
    logprob = tied_logprob(pool.logprob)
    member = np.zeros(pool_size, dtype=bool)
    member[:n_train] = True
    counts = np.bincount(ids[member].ravel(), minlength=_n_rules(grammar))
    by_logprob = np.argsort(logprob, kind="stable")
    position = np.empty(pool_size, dtype=np.int64)
    position[by_logprob] = np.arange(pool_size)

    def member_rho() -> tuple[float, np.ndarray]:
        inside = np.flatnonzero(member)
        score = (counts[ids[inside]] - own[inside]).mean(axis=1)
        return spearman(score, logprob[inside]), inside

    def exchange(out: int, come: int) -> None:
        np.subtract.at(counts, ids[out], 1)
        np.add.at(counts, ids[come], 1)
        member[out], member[come] = False, True

    rho, inside = member_rho()
    rho_start = rho
    limit = 4 * n_train if max_exchanges is None else max_exchanges
    exchanges = 0
    while abs(rho) > tolerance and exchanges < limit:
        direction = np.sign(rho)
        score = (counts[ids[inside]] - own[inside]).mean(axis=1)
        z_score = (score - score.mean()) / (score.std() + 1e-12)
        z_logprob = (logprob[inside] - logprob[inside].mean()) / (logprob[inside].std() + 1e-12)
        # members in the order of how much they pull the correlation towards its sign
        order = inside[np.argsort(-direction * z_score * z_logprob, kind="stable")]
        improved = False
        for out in order:
            lo = max(0, position[out] - stratum // 2)
            near = by_logprob[lo : lo + stratum]
            near = near[~member[near]]
            if near.size == 0:
                continue
            # non-members' score: the counts of their rules among the members. Replace the member by one of
            # nearly the same log p(x) whose score lies on the side that weakens the correlation: lower
            # when its log p(x) is above the mean and rho > 0, higher when below.
            near_score = counts[ids[near]].mean(axis=1)
            out_score = (counts[ids[out]] - own[out]).mean()
            side = direction * np.sign(logprob[out] - logprob[inside].mean())
            wanted = near[np.argsort(side * (near_score - out_score), kind="stable")]
            for come in wanted[:4]:
                exchange(out, come)
                trial_rho, trial_inside = member_rho()
                if abs(trial_rho) < abs(rho):
                    rho, inside, improved = trial_rho, trial_inside, True
                    break
                exchange(come, out)
            if improved:
                break
        if not improved:
            break
        exchanges += 1
    chosen = np.flatnonzero(member)
    return TrainingSet(pool.take(chosen), "matched", float(rho), float(rho_start), pool_size, exchanges)


def tied_logprob(logprob: np.ndarray) -> np.ndarray:
    """log p(x) rounded to 9 decimals: strings with the same rule probabilities tie exactly (sums of the
    same logs in another order differ by ~1e-15, which would otherwise break ties at random)."""
    return np.round(np.asarray(logprob, dtype=float), 9)
