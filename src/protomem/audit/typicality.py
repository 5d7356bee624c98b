"""Are the copied training items the typical or the rare ones? Corrected for what the detector can see.

A detector does not catch every copy equally well: a noisy copy of an item with a close twin has a small
second-nearest distance d2 and fails d1/d2 < 1/3, while the same copy of an isolated item passes. So even
a model that copies items chosen uniformly at random yields "copied" items that differ in density from the
training set, and a plain correlation between density and copies calls that random choice typical or rare.

The test here compares the copied items with a reference of the same detector's catches under the null:

1. *Cases*: the copied training items (all, or a random sample of ``sample`` of them).
2. *Reference*: ``sample`` training items drawn uniformly at random. Each gets one planted copy, made the
   way the audit's copies look (pixel noise of an RMS drawn from the observed copies' distances to their
   sources; as many changed tokens as the observed copies; in feature space a vector at an observed cosine
   similarity), and the audit's own criteria decide whether that copy would be flagged as a copy of its
   source. The reference keeps the items whose planted copy is caught (``detectable``).
3. Under the null (copied items are random items that survived the same detector) cases and detectable
   reference items are exchangeable: the statistic is the AUC, P(score of a case < score of a reference
   item) (ties count one half), with a permutation p-value (labels shuffled) and a bootstrap 95% interval.

Text and token sequences of several lengths are flagged by verbatim criteria (exact, shared span), whose
success does not depend on the other training items: every reference item is detectable there.

The planted copy is re-scored exactly against the item itself and its nearest training items (the
candidates found around the item; a planted copy's two nearest training items lie among them unless the
copy noise exceeds the gaps between items), not against the whole training set.

Density (``density``): the mean distance of an item to its ``k`` nearest other training items, exact
distances among candidates found on a 64-component projection (images: RMS per pixel value; token
sequences of one length: Hamming fraction; text and ragged sequences: distance between normalized
bag-of-token vectors; features: Euclidean distance between unit vectors). Only cases and reference items
are scored (NaN elsewhere), so the whole analysis costs about 2 x ``sample`` nearest-neighbour queries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from protomem.memorization import near
from protomem.neighbors import nearest_hamming


@dataclass
class Neighbours:
    """The ``count`` nearest other training items of some items: (S, count) distances (ascending) and
    indices; distances in the space's own units."""

    distances: np.ndarray
    indices: np.ndarray


@dataclass
class Typicality:
    """Per-training-item columns (each (P,), NaN where not scored) and one test per score."""

    columns: dict[str, np.ndarray] = field(default_factory=dict)
    tests: dict[str, dict] = field(default_factory=dict)


def pick_items(n_train: int, copied: np.ndarray, sample: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(cases, reference): the copied items (a random ``sample`` of them if more) and ``sample`` items drawn
    uniformly from all ``n_train``; both sorted."""
    rng = np.random.default_rng(seed)
    copied = np.unique(np.asarray(copied, dtype=np.int64))
    if copied.size > sample:
        copied = np.sort(rng.choice(copied, size=sample, replace=False))
    reference = np.sort(rng.choice(n_train, size=min(sample, n_train), replace=False))
    return copied, reference


def _drop_self(distances: np.ndarray, indices: np.ndarray, items: np.ndarray, count: int) -> Neighbours:
    is_self = indices == items[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")
    indices = np.take_along_axis(indices, order, axis=1)[:, :count]
    distances = np.take_along_axis(distances, order, axis=1)[:, :count]
    return Neighbours(distances, indices)


# ------------------------------------------------------------------------------------------- neighbours


def principal_axes(
    vectors: np.ndarray, dims: int, seed: int, fit: int = 2000
) -> tuple[np.ndarray, np.ndarray]:
    """(axes (dims, D), mean (D,)): the top principal axes of up to ``fit`` random rows, by a randomized
    SVD (one power iteration), so the cost is O(fit x D x dims) whatever D."""
    rng = np.random.default_rng(seed)
    n, width = vectors.shape
    rows = np.sort(rng.choice(n, size=min(n, fit), replace=False))
    sample = np.asarray(vectors[rows], dtype=np.float32)
    mean = sample.mean(axis=0)
    sample -= mean
    probe = rng.standard_normal((width, dims + 8)).astype(np.float32)
    basis, _ = np.linalg.qr(sample @ probe)
    basis, _ = np.linalg.qr(sample @ (sample.T @ basis))
    _, _, vt = np.linalg.svd(basis.T @ sample, full_matrices=False)
    return np.ascontiguousarray(vt[:dims], dtype=np.float32), mean


def project(vectors: np.ndarray, axes: np.ndarray, mean: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """(N, dims) float32 coordinates of the rows of ``vectors`` on ``axes`` (in chunks: no (N, D) copy)."""
    out = np.empty((vectors.shape[0], axes.shape[0]), dtype=np.float32)
    for start in range(0, vectors.shape[0], chunk):
        out[start : start + chunk] = (np.asarray(vectors[start : start + chunk], np.float32) - mean) @ axes.T
    return out


def vector_neighbours(
    vectors: np.ndarray, items: np.ndarray, count: int, seed: int, dims: int = 64
) -> Neighbours:
    """Nearest other rows (Euclidean) of ``vectors[items]``: candidates from a faiss search on the top
    ``dims`` principal components (the full vectors when narrower), then exact distances, ascending."""
    n, width = vectors.shape
    count = min(count, n - 1)
    reduced = vectors
    if width > dims and n > dims:
        axes, mean = principal_axes(vectors, dims, seed)
        reduced = project(vectors, axes, mean)
    _, found = near.nearest_l2(reduced, np.asarray(reduced[items]), k=min(n, count + 1))
    found = _drop_self(np.zeros(found.shape), found, items, count).indices
    exact = np.empty(found.shape)
    for j in range(found.shape[1]):
        diff = np.asarray(vectors[found[:, j]], np.float32) - np.asarray(vectors[items], np.float32)
        exact[:, j] = np.sqrt(np.einsum("ij,ij->i", diff, diff, dtype=np.float64))
    order = np.argsort(exact, axis=1, kind="stable")
    return Neighbours(np.take_along_axis(exact, order, axis=1), np.take_along_axis(found, order, axis=1))


def token_neighbours(matrix: np.ndarray, items: np.ndarray, count: int) -> Neighbours:
    """Nearest other sequences by Hamming distance (a fraction of the length) of ``matrix[items]``."""
    count = min(count, matrix.shape[0] - 1)
    distances, indices = nearest_hamming(matrix, matrix[items], k=count + 1)
    neighbours = _drop_self(distances.astype(np.float64), indices, items, count)
    neighbours.distances /= matrix.shape[1]
    return neighbours


def bag_vectors(train: Sequence[np.ndarray], buckets: int = 2048) -> np.ndarray:
    """(P, buckets) float32 L2-normalized bag-of-token vectors (token id modulo ``buckets``)."""
    vectors = np.zeros((len(train), buckets), dtype=np.float32)
    for i, seq in enumerate(train):
        vectors[i] = np.bincount(np.asarray(seq) % buckets, minlength=buckets)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors /= np.where(norms > 0, norms, 1)
    return vectors


def density(neighbours: Neighbours, k: int) -> np.ndarray:
    """(S,) mean distance to the k nearest other items."""
    return neighbours.distances[:, :k].mean(axis=1)


# ---------------------------------------------------------------------------------------- planted copies


def detectable_images(
    train: np.ndarray,
    reference: np.ndarray,
    neighbours: Neighbours,
    noise: np.ndarray,
    thresholds: dict[str, float],
    tile_grid: int,
    rng: np.random.Generator,
    chunk: int = 256,
) -> np.ndarray:
    """(R,) bool: a copy of each reference image with Gaussian pixel noise (RMS drawn from ``noise``) is
    flagged by exact / l2 / ratio / tiled as a copy of its own source.

    Args:
        train: (P, H, W, C) float32 in [0, 1]; neighbours: of the reference images (pixel RMS units).
        noise: observed RMS distances of the audit's copies to their sources (>= 1 value).
        thresholds: {"l2", "ratio", "tiled"}.
    """
    caught = np.zeros(reference.size, dtype=bool)
    sigma = rng.choice(noise, size=reference.size)
    values = int(np.prod(train.shape[1:]))
    for start in range(0, reference.size, chunk):
        part = slice(start, start + chunk)
        source = train[reference[part]]
        step = sigma[part].reshape(-1, 1, 1, 1)
        planted = np.clip(source + rng.standard_normal(source.shape).astype(np.float32) * step, 0, 1)
        flat = planted.reshape(len(planted), -1)
        own = near.rms(np.linalg.norm(flat - source.reshape(len(source), -1), axis=1), values)
        others = np.stack(
            [
                near.rms(np.linalg.norm(flat - train[idx].reshape(len(idx), -1), axis=1), values)
                for idx in neighbours.indices[part].T
            ],
            axis=1,
        )
        closest_other = others.min(axis=1)
        d1, d2 = np.minimum(own, closest_other), np.maximum(own, closest_other)
        is_own = own <= closest_other
        tiled = near.tiled_l2(planted, source, tile_grid)
        flagged = (
            (d1 <= thresholds["l2"])
            | (near.distance_ratio(d1, d2) < thresholds["ratio"])
            | (tiled <= thresholds["tiled"])
        )
        caught[part] = (is_own & flagged) | (step.ravel() == 0)
    return caught


def detectable_sequences(
    matrix: np.ndarray,
    reference: np.ndarray,
    neighbours: Neighbours,
    changes: np.ndarray,
    thresholds: dict[str, float],
    span_tokens: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """(R,) bool: a copy of each reference sequence with m tokens changed (m drawn from ``changes``, the
    observed Hamming distances of the audit's copies) is flagged by exact / hamming / ratio / span as a
    copy of its own source. ``thresholds``: {"hamming" (fraction of the length), "ratio"}."""
    length = matrix.shape[1]
    vocabulary = max(2, int(matrix.max()) + 1)
    caught = np.zeros(reference.size, dtype=bool)
    for row, (item, m) in enumerate(zip(reference, rng.choice(changes, size=reference.size), strict=True)):
        m = int(min(m, length))
        planted = matrix[item].copy()
        where = np.sort(rng.choice(length, size=m, replace=False))
        planted[where] = (planted[where] + rng.integers(1, vocabulary, size=m)) % vocabulary
        others = (matrix[neighbours.indices[row]] != planted).sum(axis=1)
        closest = int(others.min()) if others.size else length + 1
        d1, d2 = min(m, closest), max(m, closest)
        run = int(np.diff(np.concatenate([[-1], where, [length]])).max()) - 1
        flagged = (
            m == 0
            or d1 <= thresholds["hamming"] * length
            or near.distance_ratio(np.array([d1]), np.array([d2]))[0] < thresholds["ratio"]
            or run >= span_tokens
        )
        caught[row] = m <= closest and flagged
    return caught


def detectable_features(
    unit: np.ndarray,
    reference: np.ndarray,
    neighbours: Neighbours,
    similarity: np.ndarray,
    thresholds: dict[str, float],
    rng: np.random.Generator,
) -> np.ndarray:
    """(R,) bool: a feature vector at cosine similarity s (drawn from ``similarity``, the observed copies')
    to each reference item, in a random direction, is flagged by similar / feature ratio as its copy.
    ``unit``: (P, D) unit rows; ``thresholds``: {"similarity", "ratio"}."""
    source = np.asarray(unit[reference], dtype=np.float64)
    direction = rng.standard_normal(source.shape)
    direction -= (direction * source).sum(axis=1, keepdims=True) * source
    direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-12)
    cos = np.clip(rng.choice(similarity, size=reference.size), -1, 1)[:, None]
    planted = cos * source + np.sqrt(1 - cos**2) * direction
    others = np.einsum("sd,scd->sc", planted, np.asarray(unit[neighbours.indices], dtype=np.float64))
    own_distance = np.sqrt(np.maximum(0, 2 - 2 * cos[:, 0]))
    other_distance = np.sqrt(np.maximum(0, 2 - 2 * others.max(axis=1)))
    d1, d2 = np.minimum(own_distance, other_distance), np.maximum(own_distance, other_distance)
    flagged = (cos[:, 0] >= thresholds["similarity"]) | (near.distance_ratio(d1, d2) < thresholds["ratio"])
    return (own_distance <= other_distance) & flagged


# -------------------------------------------------------------------------------------------------- test


def _auc_rows(ranks: np.ndarray, is_case: np.ndarray) -> np.ndarray:
    """AUC per row: (sum of the cases' ranks - n_c (n_c + 1) / 2) / (n_c n_r), ranks of (small) scores."""
    n_case = is_case.sum(axis=-1)
    n_ref = is_case.shape[-1] - n_case
    return ((ranks * is_case).sum(axis=-1) - n_case * (n_case + 1) / 2) / (n_case * n_ref)


def _midranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n along the last axis, ties given their mean rank."""
    from scipy.stats import rankdata

    return rankdata(values, axis=-1)


def compare(
    cases: np.ndarray, reference: np.ndarray, n_perm: int = 2000, n_boot: int = 1000, seed: int = 0
) -> dict[str, float]:
    """AUC = P(case < reference) + P(tie) / 2 with a two-sided permutation p-value (labels shuffled) and a
    percentile bootstrap 95% interval (both groups resampled); NaN where a group has < 2 values."""
    cases = np.asarray(cases, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    cases, reference = cases[np.isfinite(cases)], reference[np.isfinite(reference)]
    out = {
        "auc": float("nan"),
        "ci_low": float("nan"),
        "ci_high": float("nan"),
        "p_permutation": float("nan"),
        "n_copied": int(cases.size),
        "n_reference": int(reference.size),
    }
    if cases.size < 2 or reference.size < 2:
        return out
    rng = np.random.default_rng(seed)
    pooled = np.concatenate([cases, reference])
    labels = np.zeros(pooled.size, dtype=bool)
    labels[: cases.size] = True
    ranks = _midranks(pooled)
    auc = float(_auc_rows(ranks, labels))
    null, boot = [], []
    for start in range(0, n_perm, 200):
        rows = min(200, n_perm - start)
        shuffled = np.argsort(rng.random((rows, pooled.size)), axis=1) < cases.size
        null.append(_auc_rows(ranks[None, :], shuffled))
    for start in range(0, n_boot, 200):
        rows = min(200, n_boot - start)
        picks = np.concatenate(
            [
                rng.integers(0, cases.size, size=(rows, cases.size)),
                cases.size + rng.integers(0, reference.size, size=(rows, reference.size)),
            ],
            axis=1,
        )
        boot.append(_auc_rows(_midranks(pooled[picks]), np.broadcast_to(labels, picks.shape)))
    null_auc = np.concatenate(null)
    low, high = np.percentile(np.concatenate(boot), [2.5, 97.5])
    p = (1 + np.sum(np.abs(null_auc - 0.5) >= abs(auc - 0.5) - 1e-12)) / (1 + n_perm)
    out.update(auc=auc, ci_low=float(low), ci_high=float(high), p_permutation=float(p))
    return out


NULLS = {
    "planted": "copies of random items that the same detector catches",
    "verbatim": "random items (the verbatim criteria that flagged them catch a copy of any item alike)",
    "uncorrected": "random items (not corrected for the detector's sensitivity: no copy has a measurable "
    "distance to its source)",
}


def sentence(result: dict, score: str, low_means: str, high_means: str, null: str) -> str:
    """One sentence: which items are copied more than the null predicts, with the numbers, or that the
    data do not say. AUC > 0.5: copied items have lower scores than the reference. ``null``: a key of
    :data:`NULLS` (what the reference items are)."""
    if not np.isfinite(result["auc"]):
        return (
            f"No test of {score}: {result['n_copied']} copied and {result['n_reference']} reference items "
            "scored (need at least 2 of each)."
        )
    numbers = (
        f"AUC {result['auc']:.3f} that a copied item's {score} is below a reference item's, 95% CI "
        f"[{result['ci_low']:.3f}, {result['ci_high']:.3f}], permutation p = {result['p_permutation']:.3g}; "
        f"{result['n_copied']:,} copied items against {result['n_reference']:,} reference items: "
        f"{NULLS[null]}"
    )
    if result["p_permutation"] < 0.05:
        which = low_means if result["auc"] > 0.5 else high_means
        return f"The copied training items are {which} than the reference ({numbers})."
    return f"The data do not show whether typical or rare items are copied more ({numbers})."


# ------------------------------------------------------------------------------------------ the analysis

SCORE_WORDS = {
    "density": ("more typical (in denser regions)", "rarer (more isolated)"),
    "density_features": ("more typical in feature space", "rarer in feature space"),
}


@dataclass
class Space:
    """Where a density is measured and how a planted copy is judged there.

    Attributes:
        score: the per-training-item column it fills (``density`` or ``density_features``).
        neighbours: items -> their :class:`Neighbours` (distances in the space's units).
        detect: (reference, their neighbours, rng) -> (R,) bool, or None when no copy gave a level to
            plant at; ``None`` here: a space in which nothing is planted.
        verbatim: copies are caught by verbatim criteria only (every item alike detectable).
    """

    score: str
    neighbours: Callable[[np.ndarray], Neighbours]
    detect: Callable[[np.ndarray, Neighbours, np.random.Generator], np.ndarray | None] | None = None
    verbatim: bool = False


def assess(
    n_train: int,
    copied: np.ndarray,
    spaces: Sequence[Space],
    k: int,
    sample: int,
    seed: int,
    extra_scores: dict[str, np.ndarray] | None = None,
) -> Typicality:
    """Density of the copied and the reference items in every space, the detectability of the reference
    items, and one :func:`compare` test per score (densities and ``extra_scores``, each (P,)).

    ``copied``: indices of the training items with at least one copy among the outputs.
    """
    cases, reference = pick_items(n_train, copied, sample, seed)
    items = np.union1d(cases, reference)
    at = np.searchsorted(items, reference)
    rng = np.random.default_rng(seed + 1)
    result = Typicality()
    caught = np.zeros(reference.size, dtype=bool)
    nulls = set()
    for space in spaces:
        found = space.neighbours(items)
        column = np.full(n_train, np.nan)
        column[items] = density(found, k)
        result.columns[space.score] = column
        if space.verbatim:
            caught[:] = True
            nulls.add("verbatim")
        elif space.detect is not None:
            hits = space.detect(reference, Neighbours(found.distances[at], found.indices[at]), rng)
            if hits is not None:
                caught |= hits
                nulls.add("planted")
    null = "planted" if "planted" in nulls else "verbatim" if nulls else "uncorrected"
    if not nulls:
        caught[:] = True
    detectable = np.full(n_train, np.nan)
    detectable[reference] = caught
    result.columns["detectable"] = detectable
    scores = {name: result.columns[space.score] for name, space in ((s.score, s) for s in spaces)}
    scores.update(extra_scores or {})
    kept = reference[caught]
    for name, values in scores.items():
        values = np.asarray(values, dtype=np.float64)
        test = compare(values[cases], values[kept], seed=seed)
        low, high = SCORE_WORDS.get(name, (f"lower in {name}", f"higher in {name}"))
        test["sentence"] = sentence(test, name, low, high, null)
        test["null"] = null
        for label, group in (("median_copied", values[cases]), ("median_reference", values[kept])):
            finite = group[np.isfinite(group)]
            test[label] = float(np.median(finite)) if finite.size else None
        result.tests[name] = test
    return result
