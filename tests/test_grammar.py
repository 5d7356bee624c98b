"""Property tests of the RHM engine against an independent, slow reference parser."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scipy import stats

from protomem.errors import ProtomemError
from protomem.grammar import (
    enumerate_strings,
    grammar_from_dict,
    log_likelihood,
    n_valid_strings,
    parse,
    sample_distinct_strings,
    sample_grammar,
    sample_strings,
    valid_fraction_per_level,
    zipf_probs,
)
from protomem.grammar.counting import n_internal_nodes

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def grammars(draw, max_strings: int = 20_000):
    """Small random RHMs whose parameters are all feasible, with Zipf skew on random levels."""
    v = draw(st.integers(2, 6))
    s = draw(st.integers(2, 3))
    depth = draw(st.integers(1, 3))
    m_max = v ** (s - 1) if depth > 1 else v**s
    m = draw(st.integers(1, min(m_max, 4)))
    n = draw(st.integers(1, min(v, v**s // m)))
    assume(n * m ** n_internal_nodes(s, depth) <= max_strings)
    exponent = draw(st.sampled_from([0.0, 0.5, 1.0, 2.0]))
    levels = draw(st.none() | st.lists(st.integers(0, depth - 1), unique=True))
    seed = draw(st.integers(0, 2**31))
    return sample_grammar(v, n, m, s, depth, seed=seed, zipf_exponent=exponent, zipf_levels=levels)


def reference_parse(grammar, string):
    """Slow, obviously-correct parser: dicts from tuples to (parent, rule), one node at a time.

    Returns (deepest_valid_level, class or -1, logprob or nan).
    """
    s = grammar.branching
    lookup = []
    for level in range(grammar.depth):
        table = {}
        for parent in range(grammar.n_parents(level)):
            for k in range(grammar.rules_per_symbol):
                table[tuple(int(x) for x in grammar.rules[level][parent, k])] = (parent, k)
        lookup.append(table)
    symbols = [int(t) for t in string]
    logprob = -np.log(grammar.n_classes)
    for level in range(grammar.depth - 1, -1, -1):
        parents = []
        for i in range(0, len(symbols), s):
            block = tuple(symbols[i : i + s])
            if -1 in block or block not in lookup[level]:
                parents.append(-1)
            else:
                parent, k = lookup[level][block]
                parents.append(parent)
                logprob += np.log(grammar.probs[level][parent, k])
        if -1 in parents:
            return level + 1, -1, np.nan
        symbols = parents
    return 0, symbols[0], logprob


@SETTINGS
@given(grammars(), st.integers(0, 1000))
def test_sampled_strings_parse_to_their_class_and_derivation(grammar, seed):
    sample = sample_strings(grammar, 300, seed=seed)
    result = parse(grammar, sample.tokens)
    assert result.valid.all()
    np.testing.assert_array_equal(result.classes, sample.classes)
    np.testing.assert_allclose(result.logprob, sample.logprob, rtol=0, atol=1e-9)
    for level in range(grammar.depth):
        np.testing.assert_array_equal(result.rules[level], sample.rules[level])
        np.testing.assert_array_equal(result.symbols[level], sample.symbols[level])
    # The derivation really produces the tokens: apply the rules top-down.
    current = sample.classes[:, None]
    for level in range(grammar.depth):
        current = grammar.rules[level][current, sample.rules[level]].reshape(len(sample), -1)
    np.testing.assert_array_equal(current, sample.tokens)


@SETTINGS
@given(grammars(max_strings=5_000))
def test_enumeration_is_complete_distinct_and_normalized(grammar):
    every = enumerate_strings(grammar)
    assert len(every) == n_valid_strings(grammar)
    assert np.unique(every.tokens, axis=0).shape[0] == len(every)
    assert np.exp(every.logprob).sum() == pytest.approx(1.0, abs=1e-9)
    result = parse(grammar, every.tokens)
    assert result.valid.all()
    np.testing.assert_allclose(result.logprob, every.logprob, atol=1e-9)


@SETTINGS
@given(grammars(), st.integers(0, 1000), st.data())
def test_corrupted_token_caught_at_the_right_level(grammar, seed, data):
    sample = sample_strings(grammar, 1, seed=seed)
    tokens = sample.tokens.copy()
    position = data.draw(st.integers(0, grammar.length - 1))
    shift = data.draw(st.integers(1, grammar.vocab_size - 1)) if grammar.vocab_size > 1 else 0
    tokens[0, position] = (tokens[0, position] + shift) % grammar.vocab_size
    deepest, cls, logprob = reference_parse(grammar, tokens[0])
    result = parse(grammar, tokens)
    assert result.deepest_valid_level[0] == deepest
    assert result.classes[0] == cls
    if deepest == 0:
        assert result.logprob[0] == pytest.approx(logprob)
    else:
        assert np.isnan(result.logprob[0])
    # If the changed token's s-block is no rule at all, the lowest level must fail.
    s = grammar.branching
    block = tuple(tokens[0, position - position % s : position - position % s + s])
    lowest = {tuple(r) for r in grammar.rules[-1].reshape(-1, s).tolist()}
    if block not in lowest:
        assert result.deepest_valid_level[0] == grammar.depth
        assert valid_fraction_per_level(result)[-1] == 0.0


@SETTINGS
@given(grammars(), st.integers(0, 1000))
def test_random_strings_match_reference_parser(grammar, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, grammar.vocab_size, size=(40, grammar.length))
    tokens[:20] = sample_strings(grammar, 20, seed=seed).tokens  # half valid, half random
    result = parse(grammar, tokens)
    for i in range(tokens.shape[0]):
        deepest, cls, logprob = reference_parse(grammar, tokens[i])
        assert result.deepest_valid_level[i] == deepest
        assert result.classes[i] == cls
        if deepest == 0:
            assert result.logprob[i] == pytest.approx(logprob)
    fractions = valid_fraction_per_level(result)
    assert np.all(np.diff(fractions) >= 0)  # level 0 (root) can only be rarer than lower levels
    assert fractions[0] == pytest.approx(result.valid.mean())


@SETTINGS
@given(grammars(), st.integers(0, 1000))
def test_same_seed_same_output(grammar, seed):
    again = grammar_from_dict(json.loads(json.dumps(grammar.to_dict())))
    a = sample_strings(grammar, 50, seed=seed)
    b = sample_strings(again, 50, seed=seed)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprob, b.logprob)
    g1 = sample_grammar(4, 3, 2, 2, 2, seed=seed, zipf_exponent=1.0)
    g2 = sample_grammar(4, 3, 2, 2, 2, seed=seed, zipf_exponent=1.0)
    assert g1.to_dict() == g2.to_dict()


def test_sampling_frequencies_match_exact_probabilities():
    """Chi-square goodness of fit of 200k samples against p(x) from the grammar (fixed seed)."""
    grammar = sample_grammar(4, 2, 3, 2, 2, seed=3, zipf_exponent=1.5)
    every = enumerate_strings(grammar)
    sample = sample_strings(grammar, 200_000, seed=11)
    index = {tuple(t): i for i, t in enumerate(every.tokens.tolist())}
    observed = np.bincount([index[tuple(t)] for t in sample.tokens.tolist()], minlength=len(every))
    expected = np.exp(every.logprob) * len(sample)
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    assert observed.sum() == len(sample)


def test_zipf_probabilities_and_levels():
    grammar = sample_grammar(8, 4, 4, 2, 3, seed=0, zipf_exponent=1.0, zipf_levels=[0])
    target = np.sort(zipf_probs(4, 1.0))
    np.testing.assert_allclose(np.sort(grammar.probs[0], axis=1), np.tile(target, (4, 1)))
    np.testing.assert_allclose(grammar.probs[1], 0.25)
    np.testing.assert_allclose(zipf_probs(3, 1.0), np.array([1, 1 / 2, 1 / 3]) / (11 / 6))
    # which rule gets which rank is random: not every symbol ranks its rules in index order
    assert len({tuple(np.argsort(row)) for row in grammar.probs[0]}) > 1


@SETTINGS
@given(grammars())
def test_no_tuple_belongs_to_two_symbols(grammar):
    for rules in grammar.rules:
        flat = rules.reshape(-1, grammar.branching)
        assert np.unique(flat, axis=0).shape[0] == flat.shape[0]


def test_distinct_sampling_gives_distinct_valid_strings():
    grammar = sample_grammar(8, 8, 3, 2, 3, seed=0, zipf_exponent=1.0)
    for count in (100, 5000, n_valid_strings(grammar)):  # rejection path, enumeration path, everything
        sample = sample_distinct_strings(grammar, count, seed=1)
        assert np.unique(sample.tokens, axis=0).shape[0] == count
        assert parse(grammar, sample.tokens).valid.all()
    with pytest.raises(ProtomemError, match="only 17496"):
        sample_distinct_strings(grammar, 17497, seed=1)


def test_distinct_sampling_prefers_probable_strings():
    """Without replacement, the first draws are the probable strings: mean log p beats the grammar's."""
    grammar = sample_grammar(8, 8, 3, 2, 3, seed=0, zipf_exponent=2.0)
    every = enumerate_strings(grammar)
    entropy_mean = float((np.exp(every.logprob) * every.logprob).sum())
    uniform_mean = float(every.logprob.mean())
    drawn = sample_distinct_strings(grammar, 6000, seed=2)  # enumeration (Gumbel-top-k) path
    assert uniform_mean < drawn.logprob.mean() < entropy_mean + 0.5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((8, 30, 3, 2, 3), "n_classes\\*rules_per_symbol"),
        ((4, 2, 5, 2, 3), "vocab_size\\*rules_per_symbol"),
        ((4, 2, 2, 1, 3), "branching must be at least 2"),
        ((0, 2, 2, 2, 3), "vocab_size must be a positive integer"),
    ],
)
def test_impossible_parameters_are_rejected(args, message):
    with pytest.raises(ProtomemError, match=message):
        sample_grammar(*args)


def test_log_likelihood_is_minus_infinity_for_invalid_strings():
    grammar = sample_grammar(8, 8, 3, 2, 3, seed=0)
    valid = sample_strings(grammar, 5, seed=0).tokens
    everything = np.array(list(itertools.product(range(8), repeat=2)))
    lowest = {tuple(r) for r in grammar.rules[-1].reshape(-1, 2).tolist()}
    not_a_rule = next(t for t in everything.tolist() if tuple(t) not in lowest)
    broken = valid.copy()
    broken[:, :2] = not_a_rule
    ll = log_likelihood(grammar, np.concatenate([valid, broken]))
    assert np.isfinite(ll[:5]).all() and np.isneginf(ll[5:]).all()


def test_grammar_file_errors_name_the_field():
    doc = sample_grammar(4, 2, 2, 2, 2, seed=0).to_dict()
    bad = json.loads(json.dumps(doc))
    bad["levels"][1]["rules"][0][0] = bad["levels"][1]["rules"][1][0]  # a tuple owned by two symbols
    with pytest.raises(ProtomemError, match=r"levels\[1\]\.rules"):
        grammar_from_dict(bad)
    bad = json.loads(json.dumps(doc))
    bad["levels"][0]["probs"][1] = [0.9, 0.3]
    with pytest.raises(ProtomemError, match=r"levels\[0\]\.probs.*sum to 1\.2"):
        grammar_from_dict(bad)
    bad = json.loads(json.dumps(doc))
    bad["levels"][1]["rules"][0][0] = [0, 4]
    with pytest.raises(ProtomemError, match=r"levels\[1\]\.rules.*\[0, 4\)"):
        grammar_from_dict(bad)
    with pytest.raises(ProtomemError, match="format"):
        grammar_from_dict({**doc, "format": "other/1"})


def test_readme_worked_example():
    """The tiny grammar drawn in README.md, checked by hand: v=2, n=1, m=2, s=2, L=2."""
    doc = {
        "format": "protomem.rhm/1",
        "vocab_size": 2,
        "n_classes": 1,
        "rules_per_symbol": 2,
        "branching": 2,
        "depth": 2,
        "seed": None,
        "zipf_exponent": 0.0,
        "zipf_levels": None,
        "levels": [
            {"rules": [[[1, 0], [0, 1]]], "probs": [[0.5, 0.5]]},
            {"rules": [[[1, 1], [1, 0]], [[0, 0], [0, 1]]], "probs": [[0.5, 0.5], [0.5, 0.5]]},
        ],
    }
    grammar = grammar_from_dict(doc)
    assert n_valid_strings(grammar) == 8  # 1 class x 2 rules at each of the 3 internal nodes
    result = parse(grammar, np.array([[0, 0, 1, 1], [1, 1, 1, 1]]))
    # 0 0 1 1: (0,0) <- 1, (1,1) <- 0, (1,0) <- class 0; three rules of probability 1/2 each.
    assert result.valid.tolist() == [True, False]
    assert result.logprob[0] == pytest.approx(np.log(1 / 8))
    assert result.symbols[1][0].tolist() == [1, 0]
    # 1 1 1 1: both pairs reduce to symbol 0, but (0,0) is no rule of the class: fails at level 0.
    assert result.deepest_valid_level.tolist() == [0, 1]
