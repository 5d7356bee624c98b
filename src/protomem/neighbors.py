"""Exact matches and Hamming nearest neighbours between token arrays (shared by every layer).

Token arrays are (rows, length) integer arrays. Work is chunked so memory stays at about
``chunk_bytes`` whatever the sizes.
"""

from __future__ import annotations

import numpy as np

from protomem.errors import ProtomemError


def row_keys(rows: np.ndarray) -> np.ndarray:
    """One opaque, comparable void scalar per row of a 2-D array (for np.unique / np.isin / sorting)."""
    contiguous = np.ascontiguousarray(rows)
    if contiguous.ndim != 2:
        raise ProtomemError(f"expected a 2-D array, got shape {contiguous.shape}")
    return contiguous.view(np.dtype((np.void, contiguous.dtype.itemsize * contiguous.shape[1]))).ravel()


def _same_dtype(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ProtomemError(f"token arrays must be 2-D with equal lengths, got {a.shape} and {b.shape}")
    dtype = np.result_type(a.dtype, b.dtype)
    return a.astype(dtype, copy=False), b.astype(dtype, copy=False)


_WORD_FACTORS = np.random.default_rng(0x5EED).integers(1, 2**63, size=4096, dtype=np.uint64) | np.uint64(1)


def row_hashes(rows: np.ndarray) -> np.ndarray:
    """(N,) uint64 hash of the bytes of each row of a 2-D array (equal rows: equal hashes; different rows
    collide with probability about 2^-64, so a match must still be checked).

    The row's bytes are read as 64-bit words; each word is multiplied by its own odd factor, its halves
    are mixed, and the words are summed modulo 2^64.
    """
    rows = np.ascontiguousarray(rows)
    if rows.ndim != 2:
        raise ProtomemError(f"expected a 2-D array, got shape {rows.shape}")
    raw = rows.view(np.uint8).reshape(len(rows), -1)
    width = -(-raw.shape[1] // 8) * 8
    if width != raw.shape[1]:
        raw = np.concatenate([raw, np.zeros((len(rows), width - raw.shape[1]), dtype=np.uint8)], axis=1)
    words = raw.view(np.uint64)
    factors = np.resize(_WORD_FACTORS, words.shape[1]) + np.arange(words.shape[1], dtype=np.uint64)
    with np.errstate(over="ignore"):
        mixed = words * (factors | np.uint64(1))
        mixed ^= mixed >> np.uint64(29)
        return mixed.sum(axis=1, dtype=np.uint64)


class ExactIndex:
    """Rows of a reference array sorted once, for many exact-match look-ups (see :func:`exact_match_index`).

    Args:
        reference: (P, N) rows to match against (e.g. the training set).
    """

    def __init__(self, reference: np.ndarray) -> None:
        self.reference = np.asarray(reference)
        if self.reference.ndim != 2:
            raise ProtomemError(f"expected a 2-D array, got shape {self.reference.shape}")
        keys = row_keys(self.reference)
        self.order = np.argsort(keys, kind="stable")
        self.sorted_keys = keys[self.order]

    def find(self, queries: np.ndarray) -> np.ndarray:
        """(K,) int64: for each query row, the index of an identical reference row (the first one), or -1."""
        reference, queries = _same_dtype(self.reference[:0], queries)
        if reference.dtype != self.reference.dtype:  # queries of a wider dtype: compare in that dtype
            return ExactIndex(self.reference.astype(reference.dtype)).find(queries)
        query_keys = row_keys(queries)
        if self.sorted_keys.size == 0:
            return np.full(query_keys.size, -1, dtype=np.int64)
        pos = np.searchsorted(self.sorted_keys, query_keys).clip(0, self.sorted_keys.size - 1)
        found = self.sorted_keys[pos] == query_keys
        return np.where(found, self.order[pos], -1).astype(np.int64)


def exact_match_index(reference: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """(K,) int64: for each query row, the index of an identical reference row (the first one), or -1.

    Args:
        reference: (P, N) rows to match against (e.g. the training set).
        queries: (K, N) rows (e.g. generated samples).
    """
    reference, queries = _same_dtype(reference, queries)
    return ExactIndex(reference).find(queries)


def nearest_hamming(
    reference: np.ndarray,
    queries: np.ndarray,
    k: int = 1,
    exclude_self: bool = False,
    chunk_bytes: int = 64 << 20,
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest reference rows of every query row by Hamming distance (number of differing tokens).

    Args:
        exclude_self: queries are the reference rows themselves (same order); a row is not its own
            neighbour (identical duplicates at other indices still count, at distance 0).
        chunk_bytes: memory budget of one (queries x reference x length) comparison chunk.

    Returns:
        distances: (K, k) int64, ascending; indices: (K, k) int64 reference rows (ties: lowest index).
        Where fewer than k candidates exist, distance = length + 1 and index = -1.
    """
    reference, queries = _same_dtype(reference, queries)
    if exclude_self and reference.shape != queries.shape:
        raise ProtomemError("exclude_self needs queries identical to the reference rows")
    n_ref, length = reference.shape
    n_query = queries.shape[0]
    small = (
        np.uint8
        if reference.size == 0 or max(reference.max(initial=0), queries.max(initial=0)) < 256
        else None
    )
    if small is not None:
        reference, queries = reference.astype(small), queries.astype(small)
    distances = np.full((n_query, k), length + 1, dtype=np.int64)
    indices = np.full((n_query, k), -1, dtype=np.int64)
    if n_ref == 0 or n_query == 0:
        return distances, indices
    step = max(1, chunk_bytes // max(1, n_ref * length))
    take = min(k, n_ref)
    for start in range(0, n_query, step):
        block = queries[start : start + step]
        dist = (block[:, None, :] != reference[None, :, :]).sum(axis=2, dtype=np.int64)  # (B, P)
        if exclude_self:
            rows = np.arange(block.shape[0])
            dist[rows, start + rows] = length + 1
        # One key per pair orders by distance, then by index (ties go to the lowest index).
        key = dist * n_ref + np.arange(n_ref)
        if take < n_ref:
            key = np.take_along_axis(key, np.argpartition(key, take - 1, axis=1)[:, :take], axis=1)
        key.sort(axis=1)
        key = key[:, :take]
        chosen, chosen_dist = key % n_ref, key // n_ref
        if exclude_self:
            chosen = np.where(chosen_dist > length, -1, chosen)
        distances[start : start + block.shape[0], :take] = chosen_dist
        indices[start : start + block.shape[0], :take] = chosen
    return distances, indices
