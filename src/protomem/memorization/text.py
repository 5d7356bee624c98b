"""Extractable memorization of token sequences: spans of >= k tokens shared verbatim with training data.

Source of the criterion: Carlini et al. 2021, "Extracting training data from large language models", and
Carlini et al. 2023, "Quantifying memorization across neural language models" (a generation is an
extraction when it reproduces a long enough training span verbatim); Nasr et al. 2023, "Scalable
extraction of training data from (production) language models" flags outputs holding any 50-token
window found in the training data (they use a suffix array; we use k-gram hashing).

How: every k-gram of the training documents is hashed (a polynomial hash over uint64, vectorized as k
passes over the concatenated tokens) and sorted with its document id. An output's k-grams are looked up
by binary search; the tokens covered by a matched k-gram give the covered fraction. For outputs with a
match, the training document holding most of the matched k-grams is compared token by token, and the
longest common run of tokens between the two is the longest shared span (exact, verified tokens, so a
hash collision cannot create a false match).

Memory: 16 bytes per training token (hash + document id) for the index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from protomem.errors import ProtomemError

_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier (golden ratio), arithmetic mod 2^64
_OFFSET = np.uint64(0x100000001B3)


def whitespace_tokens(documents: Sequence[str]) -> tuple[list[np.ndarray], dict[str, int]]:
    """Split documents on whitespace and map words to integer ids (one shared vocabulary).

    Returns:
        token arrays (one (n_i,) int64 per document) and the vocabulary {word: id}.
    """
    vocabulary: dict[str, int] = {}
    arrays = [
        np.fromiter((vocabulary.setdefault(w, len(vocabulary)) for w in doc.split()), dtype=np.int64)
        for doc in documents
    ]
    return arrays, vocabulary


def encode_with(
    documents: Sequence[str], vocabulary: dict[str, int], unknown: int | None = None
) -> list[np.ndarray]:
    """Like :func:`whitespace_tokens` with an existing vocabulary.

    Words not in it get new ids (the vocabulary grows), or all get the id ``unknown`` when given (the
    vocabulary stays as it is: right when only matches against the vocabulary's documents matter, since
    a word they never use can match nothing in them).
    """
    if unknown is not None:
        return [
            np.fromiter((vocabulary.get(w, unknown) for w in doc.split()), dtype=np.int64)
            for doc in documents
        ]
    return [
        np.fromiter((vocabulary.setdefault(w, len(vocabulary)) for w in doc.split()), dtype=np.int64)
        for doc in documents
    ]


def _concatenate(documents: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens of all documents end to end, each token's document id, and each document's start offset."""
    lengths = np.array([len(d) for d in documents], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else np.zeros(0, dtype=np.int64)
    tokens = np.concatenate([np.asarray(d, dtype=np.int64) for d in documents]) if len(documents) else None
    if tokens is None:
        tokens = np.zeros(0, dtype=np.int64)
    doc_ids = np.repeat(np.arange(len(documents), dtype=np.int64), lengths)
    return tokens, doc_ids, starts


def kgram_hashes(tokens: np.ndarray, doc_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every k-gram that lies inside one document.

    Args:
        tokens: (T,) int64 concatenated tokens; doc_ids: (T,) document of each token.

    Returns:
        hashes (G,) uint64 and start positions (G,) int64 into ``tokens``.
    """
    n_grams = tokens.size - k + 1
    if n_grams <= 0:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    values = tokens.astype(np.uint64) + _OFFSET
    hashes = np.zeros(n_grams, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(k):
            hashes = hashes * _BASE + values[j : j + n_grams]
    starts = np.arange(n_grams, dtype=np.int64)
    inside = doc_ids[:n_grams] == doc_ids[k - 1 :]
    return hashes[inside], starts[inside]


@dataclass
class KGramIndex:
    """Sorted k-gram hashes of a training corpus with the document holding each occurrence."""

    k: int
    hashes: np.ndarray  # (G,) uint64, sorted
    documents: np.ndarray  # (G,) int64 document of each occurrence
    corpus: list[np.ndarray]  # the training documents' tokens (for exact verification)


def build_kgram_index(documents: Sequence[np.ndarray], k: int) -> KGramIndex:
    """Index every k-gram of the training documents (token arrays of any lengths)."""
    if k < 1:
        raise ProtomemError(f"span length k must be >= 1, got {k}")
    tokens, doc_ids, _ = _concatenate(documents)
    hashes, starts = kgram_hashes(tokens, doc_ids, k)
    order = np.argsort(hashes, kind="stable")
    return KGramIndex(k=k, hashes=hashes[order], documents=doc_ids[starts[order]], corpus=list(documents))


def longest_common_run(a: np.ndarray, b: np.ndarray) -> tuple[int, int, int]:
    """Longest run of identical consecutive tokens shared by a and b (longest common substring).

    O(len(a) * len(b)) time, O(len(b)) memory (one row of the run-length table at a time).

    Returns:
        (length, start in a, start in b); (0, 0, 0) if they share no token.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.size == 0 or b.size == 0:
        return 0, 0, 0
    # run[j]: length of the common run ending at a[i], b[j]; one row at a time, so memory is O(m)
    m = b.size
    run = np.zeros(m, dtype=np.int64)
    best = (0, 0, 0)
    for i in range(a.size):
        equal = b == a[i]
        shifted = np.empty(m, dtype=np.int64)
        shifted[0] = 0
        shifted[1:] = run[:-1]
        run = np.where(equal, shifted + 1, 0)
        j = int(run.argmax())
        if run[j] > best[0]:
            length = int(run[j])
            best = (length, i - length + 1, j - length + 1)
    return best


@dataclass
class SpanMatches:
    """Per-output extractable-memorization results (all arrays (K,))."""

    covered_fraction: np.ndarray  # fraction of the output's tokens inside a k-gram found in training
    longest_span: np.ndarray  # int64 longest run of tokens shared with one training document (>= k or 0)
    train_index: np.ndarray  # int64 training document holding that span, -1 if none
    output_start: np.ndarray  # int64 where the span starts in the output
    train_start: np.ndarray  # int64 where it starts in the training document


def shared_spans(
    index: KGramIndex, outputs: Sequence[np.ndarray], max_docs_per_gram: int = 64
) -> SpanMatches:
    """Covered fraction and longest shared span (>= index.k tokens) of every output.

    Args:
        outputs: token arrays of any lengths (same vocabulary as the index).
        max_docs_per_gram: occurrences consulted per matched k-gram when voting for the source document
            (boilerplate k-grams occur in thousands of documents; they add nothing to the vote).
    """
    count = len(outputs)
    result = SpanMatches(
        covered_fraction=np.zeros(count),
        longest_span=np.zeros(count, dtype=np.int64),
        train_index=np.full(count, -1, dtype=np.int64),
        output_start=np.zeros(count, dtype=np.int64),
        train_start=np.zeros(count, dtype=np.int64),
    )
    if count == 0:
        return result
    k = index.k
    tokens, doc_ids, starts = _concatenate(outputs)
    hashes, positions = kgram_hashes(tokens, doc_ids, k)
    lo = np.searchsorted(index.hashes, hashes, side="left")
    hi = np.searchsorted(index.hashes, hashes, side="right")
    matched = hi > lo
    covered = np.zeros(tokens.size + 1, dtype=np.int64)
    np.add.at(covered, positions[matched], 1)
    np.add.at(covered, positions[matched] + k, -1)
    is_covered = np.cumsum(covered[:-1]) > 0
    lengths = np.array([len(o) for o in outputs], dtype=np.int64)
    per_doc = np.bincount(doc_ids, weights=is_covered, minlength=count)
    result.covered_fraction = np.divide(per_doc, lengths, out=np.zeros(count), where=lengths > 0)
    matched_docs = doc_ids[positions[matched]]
    for out_id in np.unique(matched_docs):
        mine = matched & (doc_ids[positions] == out_id)
        votes = np.concatenate(
            [
                index.documents[a : min(b, a + max_docs_per_gram)]
                for a, b in zip(lo[mine], hi[mine], strict=True)
            ]
        )
        docs, counts = np.unique(votes, return_counts=True)
        candidates = docs[np.argsort(-counts, kind="stable")[:3]]
        best = (0, 0, 0, -1)
        for cand in candidates:
            length, start_out, start_train = longest_common_run(outputs[out_id], index.corpus[cand])
            if length > best[0]:
                best = (length, start_out, start_train, int(cand))
        if best[0] >= k:
            result.longest_span[out_id] = best[0]
            result.output_start[out_id] = best[1]
            result.train_start[out_id] = best[2]
            result.train_index[out_id] = best[3]
    return result
