"""Exact matches and Hamming neighbours against brute force."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from protomem.neighbors import exact_match_index, nearest_hamming


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 40), st.integers(1, 30), st.integers(1, 6), st.integers(1, 3))
def test_nearest_hamming_matches_brute_force(seed, n_ref, n_query, length, k):
    rng = np.random.default_rng(seed)
    vocab = int(rng.choice([2, 3, 300]))  # 300 exercises the wide-dtype path
    reference = rng.integers(0, vocab, size=(n_ref, length))
    queries = np.concatenate([reference[: n_query // 2], rng.integers(0, vocab, size=(n_query, length))])
    distances, indices = nearest_hamming(reference, queries, k=k, chunk_bytes=64)  # tiny chunks
    full = (queries[:, None, :] != reference[None, :, :]).sum(axis=2)
    take = min(k, n_ref)
    for q in range(queries.shape[0]):
        order = sorted(range(n_ref), key=lambda j: (full[q, j], j))[:take]
        assert indices[q, :take].tolist() == order
        assert distances[q, :take].tolist() == [full[q, j] for j in order]
        assert (indices[q, take:] == -1).all() and (distances[q, take:] == length + 1).all()


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 30))
def test_exclude_self_never_returns_the_row_itself(seed, n):
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 2, size=(n, 3))  # many duplicates at other indices
    distances, indices = nearest_hamming(rows, rows, k=1, exclude_self=True)
    assert (indices[:, 0] != np.arange(n)).all()
    full = (rows[:, None] != rows[None]).sum(axis=2) + np.eye(n, dtype=int) * 99
    np.testing.assert_array_equal(distances[:, 0], full.min(axis=1))


def test_exact_match_index_finds_the_first_identical_row():
    reference = np.array([[1, 2], [3, 4], [1, 2], [5, 6]])
    queries = np.array([[1, 2], [5, 6], [2, 1], [3, 4]], dtype=np.int16)  # dtype differs on purpose
    assert exact_match_index(reference, queries).tolist() == [0, 3, -1, 1]
    assert exact_match_index(np.empty((0, 2), dtype=int), queries).tolist() == [-1] * 4
