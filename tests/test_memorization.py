"""Memorization detectors on planted data: exact and block copies, chance rates, tracking, slop counts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protomem.grammar import enumerate_strings, parse, sample_distinct_strings, sample_grammar, sample_strings
from protomem.grammar.prototypicality import level_blocks
from protomem.memorization.hierarchy import (
    block_holders,
    block_probability,
    chance_block_copy_fraction,
    classify_samples,
    node_symbol_marginals,
)
from protomem.memorization.slop import overproduction_curve, sample_block_counts, training_blocks
from protomem.memorization.tracking import (
    NOT_MEMORIZED,
    copies_per_checkpoint,
    expected_copies,
    first_memorized,
    not_yet_memorized_curve,
)


@pytest.fixture(scope="module")
def small():
    grammar = sample_grammar(4, 2, 2, 2, 3, seed=3, zipf_exponent=1.0)
    train = sample_distinct_strings(grammar, 20, seed=1)
    return grammar, train


def test_planted_copies_are_found_with_their_index(small):
    grammar, train = small
    rng = np.random.default_rng(0)
    picked = rng.integers(0, len(train), size=30)
    fresh = sample_strings(grammar, 200, seed=9).tokens
    fresh_index = np.flatnonzero((fresh[:, None, :] != train.tokens[None]).any(axis=2).all(axis=1))[:30]
    samples = np.concatenate([train.tokens[picked], fresh[fresh_index]])
    result = classify_samples(grammar, train.tokens, samples)
    assert (result.copy_index[:30] == picked).all()
    assert (result.status[:30] == "copy").all()
    assert (result.copy_index[30:] == -1).all() and (result.status[30:] == "novel_valid").all()
    assert (result.nn_hamming[:30] == 0).all() and (result.nn_hamming[30:] > 0).all()
    # a copy has every block copied at every level
    for copied in result.block_copied:
        assert copied[:30].all()


def test_invalid_sample_reports_its_lowest_failing_level(small):
    grammar, train = small
    valid = train.tokens[0].copy()
    parsed = parse(grammar, valid[None])
    assert parsed.valid[0]
    # Change the last pair to a tuple no level-(L-1) rule emits: the parse fails at level L-1.
    emitted = {tuple(r) for r in grammar.rules[grammar.depth - 1].reshape(-1, grammar.branching).tolist()}
    bad_pair = next(
        (a, b) for a in range(grammar.vocab_size) for b in range(grammar.vocab_size) if (a, b) not in emitted
    )
    broken = valid.copy()
    broken[-2:] = bad_pair
    result = classify_samples(grammar, train.tokens, np.stack([valid, broken]))
    assert list(result.status) == ["copy", "invalid"]
    assert result.failing_level.tolist() == [-1, grammar.depth - 1]
    assert result.nn_hamming[1] <= 2


def test_block_holders_counts_match_indices(small):
    grammar, train = small
    samples = sample_strings(grammar, 50, seed=4).tokens
    result = classify_samples(grammar, train.tokens, samples)
    for level in range(grammar.depth):
        blocks = level_blocks(samples, grammar.branching, grammar.depth, level)
        for k in range(5):
            for position in range(blocks.shape[1]):
                holders = block_holders(grammar, train.tokens, blocks[k, position], level, position)
                assert len(holders) == result.block_holders[level][k, position]
                assert (len(holders) > 0) == result.block_copied[level][k, position]


def test_block_probabilities_are_exact(small):
    grammar, _ = small
    every = enumerate_strings(grammar)
    weights = np.exp(every.logprob)
    for level in range(grammar.depth):
        for position in range(grammar.branching**level):
            blocks = level_blocks(every.tokens, grammar.branching, grammar.depth, level)[:, position, :]
            distinct, inverse = np.unique(blocks, axis=0, return_inverse=True)
            exact = np.bincount(inverse.ravel(), weights=weights)
            assert np.allclose(block_probability(grammar, distinct, level, position), exact)
    for marginal in node_symbol_marginals(grammar):
        assert np.allclose(marginal.sum(axis=1), 1.0)


def test_chance_fraction_is_the_expected_block_copy_rate_of_fresh_samples(small):
    grammar, train = small
    chance = chance_block_copy_fraction(grammar, train.tokens)
    # level 0: the training set's probability mass
    assert chance[0] == pytest.approx(np.exp(train.logprob).sum())
    fresh = sample_strings(grammar, 100_000, seed=5).tokens
    observed = classify_samples(grammar, train.tokens, fresh).fractions()
    for level in range(grammar.depth):
        # binomial standard error of a fraction over 100k strings is < 0.0016; allow 5 of them
        assert observed[f"frac_block_copy_l{level}"] == pytest.approx(chance[level], abs=0.008)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), zipf=st.sampled_from([0.0, 1.0, 2.0]))
def test_chance_fraction_is_monotone_in_block_size(seed, zipf):
    """A smaller block is contained in a larger one: copying a level-l block implies its sub-blocks."""
    grammar = sample_grammar(4, 4, 2, 2, 3, seed=seed, zipf_exponent=zipf)
    train = sample_distinct_strings(grammar, 12, seed=seed + 1)
    chance = chance_block_copy_fraction(grammar, train.tokens)
    assert (np.diff(chance) >= -1e-12).all()
    assert ((chance >= 0) & (chance <= 1 + 1e-12)).all()


def test_tracking_first_memorized_against_hand_derived_values():
    # 3 training strings, 4 checkpoints; expected copies 0.4 (rounds to 0), 2.6 (rounds to 3), 0
    copy_indices = [
        np.array([0, -1, 1, 1, 1]),  # string 0: 1 copy, string 1: 3
        np.array([0, 0, 1, 1, 1, 1, 1]),  # string 0: 2 -> memorized (2 >= 0 + 2); string 1: 5 -> 5 >= 3 + 2
        np.array([2, 0, 0, 0]),  # string 2: 1 copy
        np.array([2, 2, 2, -1]),  # string 2: 3 -> memorized
    ]
    copies = copies_per_checkpoint(copy_indices, 3)
    assert copies.tolist() == [[1, 2, 3, 0], [3, 5, 0, 0], [0, 0, 1, 3]]
    expected = np.array([0.4, 2.6, 0.0])
    index, step = first_memorized(copies, expected, np.array([10, 20, 40, 80]), min_excess=2)
    assert index.tolist() == [1, 1, 3]
    assert step.tolist() == [20, 20, 80]
    index, step = first_memorized(copies, expected, np.array([10, 20, 40, 80]), min_excess=3)
    assert index.tolist() == [2, 4, 3] and step[1] == NOT_MEMORIZED
    assert not_yet_memorized_curve(np.array([1, 1, 3]), 4).tolist() == pytest.approx([1, 1 / 3, 1 / 3, 0])
    assert expected_copies(np.log([0.5, 0.01]), 100) == pytest.approx([50, 1])


def test_slop_counts_and_overproduction(small):
    grammar, train = small
    blocks = training_blocks(grammar, train.tokens)
    # the training set itself reproduces every block exactly as often as it holds it
    assert (sample_block_counts(grammar, blocks, train.tokens) == blocks["train_count"]).all()
    # every level-0 block is one training string
    assert (blocks["train_count"][blocks["level"] == 0] == 1).all()
    # two copies of string 0: its blocks are counted twice, others zero
    twice = np.stack([train.tokens[0], train.tokens[0]])
    counts = sample_block_counts(grammar, blocks, twice)
    for row in np.flatnonzero(counts):
        level, position = blocks["level"][row], blocks["position"][row]
        block = level_blocks(train.tokens[:1], grammar.branching, grammar.depth, level)[0, position]
        assert list(block) == list(blocks["tokens"][row])
    assert counts.sum() == 2 * sum(grammar.branching**lv for lv in range(grammar.depth))
    centers, ratio, n_blocks = overproduction_curve(np.array([1, 1, 4, 4]), np.array([0, 2, 8, 8]), 8, 8)
    assert n_blocks.sum() == 4
    filled = ratio[~np.isnan(ratio)]
    assert filled[0] == pytest.approx(1.0) and filled[-1] == pytest.approx(2.0)
