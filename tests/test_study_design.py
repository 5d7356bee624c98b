"""The matched training-set design decorrelates the primary score from log p(x); the likelihood endpoint's
gains, thresholds and first crossings on planted ELBOs; stratified permutation nulls."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protomem.errors import ProtomemError
from protomem.grammar import parse, sample_grammar
from protomem.grammar.prototypicality import prototypicality_table
from protomem.memorization.likelihood import (
    first_exceeding,
    gain_thresholds,
    likelihood_gain,
    match_by_logprob,
)
from protomem.neighbors import row_keys
from protomem.study import stats
from protomem.study.design import draw_training_set, tied_logprob


@pytest.mark.parametrize(
    "shape", [(8, 3, 3, 256), (8, 2, 4, 128), (16, 4, 4, 128)], ids=["small", "m2-L4", "large"]
)
def test_matched_design_decorrelates_score_and_likelihood(shape):
    v, m, depth, n_train = shape
    grammar = sample_grammar(v, v, m, 2, depth, seed=0, zipf_exponent=1.0)
    plain = draw_training_set(grammar, n_train, seed=5)
    matched = draw_training_set(grammar, n_train, seed=5, design="matched")

    def rho(strings) -> float:
        table = prototypicality_table(grammar, strings.tokens)  # the study's own score, recomputed
        return stats.spearman(table["rule_count_mean"], tied_logprob(table["logprob"]))

    assert rho(plain.strings) > 0.45  # prototypical strings are likely ones in a plain draw
    assert plain.rho_score_logprob == pytest.approx(rho(plain.strings))
    assert abs(rho(matched.strings)) <= 0.01 + 1e-9
    assert matched.rho_score_logprob == pytest.approx(rho(matched.strings))
    assert matched.rho_score_logprob_random == pytest.approx(plain.rho_score_logprob)
    strings = matched.strings
    assert len(strings) == n_train and np.unique(row_keys(strings.tokens)).size == n_train
    assert parse(grammar, strings.tokens).valid.all()
    assert np.allclose(parse(grammar, strings.tokens).logprob, strings.logprob)
    # exchanges are matched on log p(x): the spread of likelihoods stays that of a plain draw
    assert np.std(strings.logprob) == pytest.approx(np.std(plain.strings.logprob), rel=0.2)
    again = draw_training_set(grammar, n_train, seed=5, design="matched")
    assert np.array_equal(again.strings.tokens, strings.tokens)


def test_matched_design_needs_a_pool_larger_than_the_training_set():
    grammar = sample_grammar(2, 1, 2, 2, 2, seed=0, zipf_exponent=1.0)  # 8 strings
    with pytest.raises(ProtomemError, match="pool"):
        draw_training_set(grammar, 8, seed=0, design="matched")
    with pytest.raises(ProtomemError, match="design"):
        draw_training_set(grammar, 4, seed=0, design="clever")


def test_match_by_logprob_takes_the_same_class_nearest_in_likelihood():
    logprob = np.array([-5.0, -9.0])
    classes = np.array([0, 1])
    pool_logprob = np.array([-5.1, -9.0, -4.0, -8.5, -5.0, -20.0])
    pool_classes = np.array([0, 0, 0, 1, 1, 1])
    matches = match_by_logprob(logprob, classes, pool_logprob, pool_classes, 2)
    assert matches.tolist() == [[0, 2], [3, 4]]
    selves = match_by_logprob(pool_logprob, pool_classes, pool_logprob, pool_classes, 1, exclude_self=True)
    assert (selves[:, 0] != np.arange(6)).all()
    assert selves[:, 0].tolist() == [2, 0, 0, 4, 3, 3]


def test_likelihood_endpoint_finds_planted_memorization():
    rng = np.random.default_rng(0)
    n_train, n_heldout, steps = 200, 300, np.array([10, 20, 40, 80, 160])
    heldout_nll = 12 + rng.normal(0, 0.5, (n_heldout, 1)) + rng.normal(0, 0.3, (n_heldout, len(steps)))
    train_nll = 12 + rng.normal(0, 0.5, (n_train, 1)) + rng.normal(0, 0.3, (n_train, len(steps)))
    onset = np.full(n_train, len(steps))
    onset[:50] = rng.integers(1, len(steps), 50)  # planted: 50 strings become 4 nats more likely
    train_nll -= 4.0 * (np.arange(len(steps))[None, :] >= onset[:, None])
    matches = match_by_logprob(
        np.zeros(n_train), np.zeros(n_train), np.zeros(n_heldout), np.zeros(n_heldout), 4
    )
    gain = likelihood_gain(train_nll, heldout_nll, matches)
    assert gain.shape == (n_train, len(steps))
    assert np.allclose(gain[0], heldout_nll[matches[0]].mean(0) - train_nll[0])
    own = match_by_logprob(
        np.zeros(n_heldout),
        np.zeros(n_heldout),
        np.zeros(n_heldout),
        np.zeros(n_heldout),
        4,
        exclude_self=True,
    )
    thresholds = gain_thresholds(likelihood_gain(heldout_nll, heldout_nll, own), 0.99)
    index, step = first_exceeding(gain, thresholds, steps)
    assert (index[:50] == onset[:50]).all()
    assert (step[:50] == steps[onset[:50]]).all()
    false_alarms = (index[50:] < len(steps)).mean()
    assert false_alarms < 0.1  # about 1% per checkpoint
    assert (step[50:][index[50:] == len(steps)] == -1).all()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=2, max_size=40), st.integers(0, 2**31))
def test_stratified_permutations_shuffle_only_within_strata(strata, seed):
    strata = np.array(strata)
    values = np.arange(len(strata)) * 10
    draws = stats.stratified_permutations(values, strata, 5, np.random.default_rng(seed))
    for draw in draws:
        for stratum in np.unique(strata):
            assert sorted(draw[strata == stratum]) == sorted(values[strata == stratum])


def test_quantile_strata_bins_by_quantile_and_keeps_ties_together():
    values = np.array([0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0, np.nan])
    strata = stats.quantile_strata(values, 4)
    assert strata[-1] == -1  # NaN
    assert len(set(strata[:4])) == 1  # tied values share a stratum
    assert (np.diff(strata[:8]) >= 0).all()  # monotone in the value
    assert len(np.unique(stats.quantile_strata(np.arange(100.0), 10))) == 10
