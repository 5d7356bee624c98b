"""Prototypicality scores against brute-force counts written the obvious way."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from protomem.grammar import parse, sample_distinct_strings, sample_grammar, sample_strings
from protomem.grammar.prototypicality import prototypicality_table


def brute_force_scores(grammar, train, tokens=None):
    """Loop over strings and blocks; leave-one-out when tokens is None."""
    s, depth, length = grammar.branching, grammar.depth, grammar.length
    query = train if tokens is None else tokens
    train_parse, query_parse = parse(grammar, train), parse(grammar, query)
    rows = []
    for i, x in enumerate(query):
        others = [j for j in range(len(train)) if tokens is not None or j != i]
        row = {}
        for level in range(depth):
            size = s ** (depth - level)
            same, anywhere = [], []
            for b in range(s**level):
                block = x[b * size : (b + 1) * size]
                same.append(sum(np.array_equal(train[j, b * size : (b + 1) * size], block) for j in others))
                anywhere.append(
                    sum(
                        np.array_equal(train[j, c * size : (c + 1) * size], block)
                        for j in others
                        for c in range(s**level)
                    )
                )
            row[f"block_count_same_pos_l{level}"] = np.mean(same)
            row[f"block_count_any_pos_l{level}"] = np.mean(anywhere)
            uses = []
            for node in range(s**level):
                key = (query_parse.symbols[level][i, node], query_parse.rules[level][i, node])
                uses.append(
                    sum(
                        (train_parse.symbols[level][j] == key[0]) & (train_parse.rules[level][j] == key[1])
                    ).sum()
                    for j in others
                )
                uses[-1] = sum(uses[-1])
            row[f"rule_count_l{level}"] = np.mean(uses)
        row["nn_hamming"] = min(int((train[j] != x).sum()) for j in others)
        row["logprob"] = query_parse.logprob[i]
        assert length == x.size
        rows.append(row)
    return rows


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([0.0, 1.0]))
def test_leave_one_out_scores_match_brute_force(seed, exponent):
    grammar = sample_grammar(4, 3, 2, 2, 3, seed=seed, zipf_exponent=exponent)
    train = sample_distinct_strings(grammar, 25, seed=seed + 1).tokens
    table = prototypicality_table(grammar, train)
    for i, row in enumerate(brute_force_scores(grammar, train)):
        for name, value in row.items():
            assert np.isclose(table[name][i], value), (name, i, table[name][i], value)


def test_scores_of_new_strings_count_every_training_string():
    grammar = sample_grammar(4, 3, 2, 2, 3, seed=5, zipf_exponent=1.0)
    train = sample_distinct_strings(grammar, 30, seed=1).tokens
    fresh = sample_strings(grammar, 10, seed=2).tokens
    table = prototypicality_table(grammar, train, fresh)
    for i, row in enumerate(brute_force_scores(grammar, train, fresh)):
        for name, value in row.items():
            assert np.isclose(table[name][i], value), (name, i)


def test_common_parts_score_higher_than_rare_parts():
    """A training set built around one repeated pair: strings holding it score higher at that level."""
    grammar = sample_grammar(8, 8, 3, 2, 3, seed=0, zipf_exponent=2.0)
    train = sample_distinct_strings(grammar, 300, seed=3).tokens
    table = prototypicality_table(grammar, train)
    # Strings with higher rule usage at the lowest level also have more frequent token pairs there
    # (at level L-1 a rule and its pair are the same thing), and higher log p correlates with both.
    np.testing.assert_allclose(table["rule_count_l2"], table["block_count_any_pos_l2"])
    assert np.corrcoef(table["logprob"], table["rule_count_mean"])[0, 1] > 0.3
    assert (table["block_count_same_pos_l0"] == 0).all()  # distinct strings: no duplicate elsewhere
    assert (table["nn_hamming"] >= 1).all()
