"""Are the copied training items the typical or the rare ones? Corrected for what the detector can see.

A detector does not catch every copy equally well: a noisy copy of an item with a close twin has a small
second-nearest distance d2 and fails d1/d2 < 1/3, while the same copy of an isolated item passes. So even
a model that copies items chosen uniformly at random yields "copied" items that differ in density from the
training set, and a plain correlation between density and copies calls that random choice typical or rare
(in the calibration, a uniform copier of digits was called typical or rare in 20% of runs at p < 0.05).

The test here is a conditional randomization test:

1. *Copies*: every copied output (up to ``sample`` of them), with the training item it is attributed to
   and its *level*: its distance to that item (RMS per pixel value; changed tokens; in feature space, the
   cosine similarity). Copies flagged only by criteria without a copy model here (shift, crop, flip,
   brightness, verbatim spans) have none.
2. *Reference*: ``sample`` training items drawn uniformly at random. For each quantile bin of the copies'
   levels, every reference item gets a planted copy at a level drawn from that bin (pixel noise scaled to
   the exact distance; that many changed tokens; a vector at that cosine) and the audit's own criteria
   decide whether the planted copy is caught.
3. Each copy is compared with the reference items caught at its level: AUC_i = P(its item's score < a
   caught item's score). Under the null (the copied item is a random item, caught by the same detector at
   the same level) the mean AUC is 0.5 and its distribution is simulated by drawing each copy's item from
   its caught set. Conditioning on the level removes the unknown distribution of copy levels (only the
   caught copies' levels are seen, so planting at those levels alone would under-correct).

Copies without a copy model, and all copies of text and of token sequences of several lengths (flagged
by verbatim criteria, whose success does not depend on the other training items), are compared with all
reference items.

A planted copy is scored exactly against the item itself and its nearest training items (the candidates
found around the item), not against the whole training set, and it counts as caught when it is flagged as
a copy of any of them, as in the audit.

Density (``density``): the mean distance of an item to its ``k`` nearest other training items, exact
distances among candidates found on a 64-component projection (images: RMS per pixel value; token
sequences of one length: Hamming fraction; text and ragged sequences: distance between normalized
bag-of-token vectors; features: Euclidean distance between unit vectors). Only copied and reference items
are scored (NaN elsewhere), so the whole analysis costs about 2 x ``sample`` nearest-neighbour queries and
one planted copy per reference item and level bin.
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
    """(S,) mean distance to the k nearest other items; NaN when there are none (one training item)."""
    nearest = neighbours.distances[:, :k]
    if nearest.shape[1] == 0:
        return np.full(nearest.shape[0], np.nan)
    return nearest.mean(axis=1)


# ---------------------------------------------------------------------------------------- planted copies


def _flagged(d1: np.ndarray, d2: np.ndarray, within: float, ratio: float) -> np.ndarray:
    return (d1 <= within) | (near.distance_ratio(d1, d2) < ratio)


def plant_images(
    train: np.ndarray,
    reference: np.ndarray,
    neighbours: Neighbours,
    levels: np.ndarray,
    thresholds: dict[str, float],
    tile_grid: int,
    rng: np.random.Generator,
    chunk: int = 256,
) -> np.ndarray:
    """(R,) bool: a copy of each reference image at RMS distance ``levels[r]`` from it (Gaussian pixel
    noise, clipped to [0, 1], then scaled to exactly that distance) is flagged by exact / l2 / ratio /
    tiled (as a copy of whichever training image is nearest, like the audit).

    Args:
        train: (P, H, W, C) float32 in [0, 1]; neighbours: of the reference images, nearest first.
        levels: (R,) RMS distances; thresholds: {"l2", "ratio", "tiled"}.
    """
    caught = np.zeros(reference.size, dtype=bool)
    values = int(np.prod(train.shape[1:]))
    for start in range(0, reference.size, chunk):
        part = slice(start, start + chunk)
        source = train[reference[part]].reshape(-1, values)
        level = levels[part][:, None]
        step = np.clip(source + rng.standard_normal(source.shape).astype(np.float32) * level, 0, 1) - source
        size = near.rms(np.linalg.norm(step, axis=1), values)[:, None]
        planted = source + step * np.where(size > 0, level / np.maximum(size, 1e-12), 0).astype(np.float32)
        own = np.abs(levels[part])
        others = np.stack(
            [
                near.rms(np.linalg.norm(planted - train[idx].reshape(-1, values), axis=1), values)
                for idx in neighbours.indices[part].T
            ],
            axis=1,
        )
        closest = others.argmin(axis=1)
        other = others[np.arange(len(closest)), closest]
        d1, d2 = np.minimum(own, other), np.maximum(own, other)
        shape = (-1, *train.shape[1:])
        nearest = np.where(
            (own <= other)[:, None],
            source,
            train[neighbours.indices[part][np.arange(len(closest)), closest]].reshape(-1, values),
        )
        tiled = near.tiled_l2(planted.reshape(shape), nearest.reshape(shape), tile_grid)
        caught[part] = (
            _flagged(d1, d2, thresholds["l2"], thresholds["ratio"])
            | (tiled <= thresholds["tiled"])
            | (own == 0)
        )
    return caught


def plant_sequences(
    matrix: np.ndarray,
    reference: np.ndarray,
    neighbours: Neighbours,
    levels: np.ndarray,
    thresholds: dict[str, float],
    span_tokens: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """(R,) bool: a copy of each reference sequence with ``levels[r]`` tokens changed (at random positions,
    to other tokens) is flagged by exact / hamming / ratio / span (as a copy of any training sequence).
    ``thresholds``: {"hamming" (fraction of the length), "ratio"}."""
    length = matrix.shape[1]
    vocabulary = max(2, int(matrix.max()) + 1)
    caught = np.zeros(reference.size, dtype=bool)
    for row, (item, m) in enumerate(zip(reference, levels, strict=True)):
        m = int(min(m, length))
        planted = matrix[item].copy()
        where = np.sort(rng.choice(length, size=m, replace=False))
        planted[where] = (planted[where] + rng.integers(1, vocabulary, size=m)) % vocabulary
        others = (matrix[neighbours.indices[row]] != planted).sum(axis=1)
        closest = int(others.min()) if others.size else length + 1
        d1, d2 = np.array([min(m, closest)], float), np.array([max(m, closest)], float)
        run = int(np.diff(np.concatenate([[-1], where, [length]])).max()) - 1
        caught[row] = (
            m == 0
            or run >= span_tokens
            or bool(_flagged(d1, d2, thresholds["hamming"] * length, thresholds["ratio"])[0])
        )
    return caught


def plant_features(
    unit: np.ndarray,
    reference: np.ndarray,
    neighbours: Neighbours,
    levels: np.ndarray,
    thresholds: dict[str, float],
    rng: np.random.Generator,
) -> np.ndarray:
    """(R,) bool: a unit vector at cosine similarity ``levels[r]`` to each reference item, in a random
    direction, is flagged by similar / feature ratio (as a copy of any training item). ``unit``: (P, D)
    unit rows; ``thresholds``: {"similarity", "ratio"}."""
    source = np.asarray(unit[reference], dtype=np.float64)
    direction = rng.standard_normal(source.shape)
    direction -= (direction * source).sum(axis=1, keepdims=True) * source
    direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-12)
    cos = np.clip(levels, -1, 1)[:, None]
    planted = cos * source + np.sqrt(1 - cos**2) * direction
    others = np.einsum("sd,scd->sc", planted, np.asarray(unit[neighbours.indices], dtype=np.float64))
    best = np.maximum(cos[:, 0], others.max(axis=1))
    own_distance = np.sqrt(np.maximum(0, 2 - 2 * cos[:, 0]))
    other_distance = np.sqrt(np.maximum(0, 2 - 2 * others.max(axis=1)))
    d1, d2 = np.minimum(own_distance, other_distance), np.maximum(own_distance, other_distance)
    return (best >= thresholds["similarity"]) | (near.distance_ratio(d1, d2) < thresholds["ratio"])


# -------------------------------------------------------------------------------------------------- test


def level_bins(levels: np.ndarray, most: int = 8, per_bin: int = 5) -> np.ndarray:
    """(N,) bin of each level: up to ``most`` quantile bins of at least about ``per_bin`` levels each."""
    levels = np.asarray(levels, dtype=np.float64)
    count = max(1, min(most, levels.size // per_bin))
    edges = np.quantile(levels, np.linspace(0, 1, count + 1)[1:-1]) if count > 1 else np.zeros(0)
    return np.searchsorted(edges, levels, side="right")


def _below_share(values: np.ndarray, sorted_reference: np.ndarray) -> np.ndarray:
    """P(value < reference) + P(value = reference) / 2 for each value, against a sorted reference."""
    left = np.searchsorted(sorted_reference, values, side="left")
    right = np.searchsorted(sorted_reference, values, side="right")
    return (sorted_reference.size - right + 0.5 * (right - left)) / sorted_reference.size


def conditional_test(
    case_scores: np.ndarray,
    reference_scores: np.ndarray,
    groups: Sequence[np.ndarray],
    group_of_case: np.ndarray,
    n_null: int = 2000,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Is a copy's score below those of the items the detector would catch at its level? (A conditional
    randomization test.)

    Each case (one copy) is compared with the reference items of its group (``groups[g]``: (R,) bool, the
    items whose planted copy at the case's level was caught): AUC_i = P(case < item) + P(tie) / 2. The
    statistic is the mean AUC over the cases. Null: each case's item replaced by a uniform draw from its
    group (the source of a random copy that the same detector caught), ``n_null`` times; two-sided
    p-value around 0.5 (the null's exact mean). 95% interval: percentile bootstrap over the cases.
    """
    out = {
        "auc": float("nan"),
        "ci_low": float("nan"),
        "ci_high": float("nan"),
        "p_permutation": float("nan"),
        "n_copies": 0,
        "n_reference": int(np.isfinite(reference_scores).sum()),
    }
    rng = np.random.default_rng(seed)
    reference_scores = np.asarray(reference_scores, dtype=np.float64)
    case_scores = np.asarray(case_scores, dtype=np.float64)
    shares, members = [], []
    for g, mask in enumerate(groups):
        scores = np.sort(reference_scores[mask & np.isfinite(reference_scores)])
        mine = case_scores[(group_of_case == g) & np.isfinite(case_scores)]
        if scores.size < 2 or mine.size == 0:
            continue
        shares.append(_below_share(mine, scores))
        members.append((mine.size, _below_share(scores, scores)))
    if not shares:
        return out
    observed = np.concatenate(shares)
    if observed.size < 2:
        return out
    null = np.zeros(n_null)
    for size, values in members:
        null += values[rng.integers(0, values.size, size=(n_null, size))].sum(axis=1)
    null /= observed.size
    boot = observed[rng.integers(0, observed.size, size=(n_boot, observed.size))].mean(axis=1)
    auc = float(observed.mean())
    p = (1 + np.sum(np.abs(null - 0.5) >= abs(auc - 0.5) - 1e-12)) / (1 + n_null)
    low, high = np.percentile(boot, [2.5, 97.5])
    out.update(
        auc=auc, ci_low=float(low), ci_high=float(high), p_permutation=float(p), n_copies=int(observed.size)
    )
    return out


NULLS = {
    "planted": "for each copy, the random items whose planted copy at the same distance the detector catches",
    "verbatim": "random items (the verbatim criteria that flagged the copies catch a copy of any item alike)",
    "uncorrected": "random items (not corrected for the detector's sensitivity: no copy has a measurable "
    "distance to its source)",
}


def sentence(result: dict, score: str, low_means: str, high_means: str, null: str) -> str:
    """One sentence: which items are copied more than the null predicts, with the numbers, or that the
    data do not say. AUC > 0.5: copies have lower scores than the reference. ``null``: a key of
    :data:`NULLS` (what the reference items are)."""
    if not np.isfinite(result["auc"]):
        return (
            f"No test of {score}: {result['n_copies']} copies and {result['n_reference']} reference items "
            "scored (need at least 2 copies and 2 reference items)."
        )
    numbers = (
        f"AUC {result['auc']:.3f} that a copied item's {score} is below a reference item's, 95% CI "
        f"[{result['ci_low']:.3f}, {result['ci_high']:.3f}], randomization p = "
        f"{result['p_permutation']:.3g}; "
        f"{result['n_copies']:,} copies against {result['n_reference']:,} reference items: {NULLS[null]}"
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
    """Where a density is measured and how a copy is planted there.

    Attributes:
        score: the per-training-item column it fills (``density`` or ``density_features``).
        neighbours: items -> their :class:`Neighbours` (distances in the space's units).
        plant: (reference, their neighbours, (R,) levels, rng) -> (R,) bool, whether a copy planted at
            each level is caught; None: copies in this space are caught by verbatim criteria, whatever
            the item (every item alike detectable).
    """

    score: str
    neighbours: Callable[[np.ndarray], Neighbours]
    plant: Callable[[np.ndarray, Neighbours, np.ndarray, np.random.Generator], np.ndarray] | None = None


@dataclass
class Copies:
    """The audit's copies, one per copied output: the training item each is attributed to, the space whose
    criteria flagged it (an index into the spaces given to :func:`assess`; -1: none with a copy model,
    compared with every reference item) and its level there (distance or similarity to that item)."""

    items: np.ndarray
    space: np.ndarray
    level: np.ndarray


def assess(
    n_train: int,
    copies: Copies,
    spaces: Sequence[Space],
    k: int,
    sample: int,
    seed: int,
    extra_scores: dict[str, np.ndarray] | None = None,
) -> Typicality:
    """Density of the copied and the reference items in every space, which reference items the detector
    catches at each copy level, and one :func:`conditional_test` per score (densities, ``extra_scores``).

    At most ``sample`` copies (drawn at random) and ``sample`` reference items are used.
    """
    rng = np.random.default_rng(seed)
    if copies.items.size > sample:
        keep = np.sort(rng.choice(copies.items.size, size=sample, replace=False))
        copies = Copies(copies.items[keep], copies.space[keep], copies.level[keep])
    reference = np.sort(rng.choice(n_train, size=min(sample, n_train), replace=False))
    items = np.union1d(np.unique(copies.items), reference)
    at = np.searchsorted(items, reference)
    result = Typicality()
    groups: list[np.ndarray] = [np.ones(reference.size, dtype=bool)]
    group_of_case = np.zeros(copies.items.size, dtype=np.int64)
    planted = False
    for index, space in enumerate(spaces):
        found = space.neighbours(items)
        column = np.full(n_train, np.nan)
        column[items] = density(found, k)
        result.columns[space.score] = column
        mine = np.flatnonzero(copies.space == index)
        if space.plant is None or mine.size == 0:
            continue
        around = Neighbours(found.distances[at], found.indices[at])
        bins = level_bins(copies.level[mine])
        for b in np.unique(bins):
            cases = mine[bins == b]
            levels = copies.level[cases]
            groups.append(space.plant(reference, around, rng.choice(levels, size=reference.size), rng))
            group_of_case[cases] = len(groups) - 1
            planted = True
    null = "planted" if planted else ("verbatim" if any(s.plant is None for s in spaces) else "uncorrected")
    detectable = np.full(n_train, np.nan)
    detectable[reference] = np.mean(groups[1:], axis=0) if len(groups) > 1 else 1.0
    result.columns["detectable"] = detectable
    scores = {space.score: result.columns[space.score] for space in spaces}
    scores.update(extra_scores or {})
    for name, values in scores.items():
        values = np.asarray(values, dtype=np.float64)
        test = conditional_test(values[copies.items], values[reference], groups, group_of_case, seed=seed)
        test["n_copied_items"] = int(np.unique(copies.items).size)
        low, high = SCORE_WORDS.get(name, (f"lower in {name}", f"higher in {name}"))
        test["sentence"] = sentence(test, name, low, high, null)
        test["null"] = null
        for label, group in (
            ("median_copied", values[copies.items]),
            ("median_reference", values[reference]),
        ):
            finite = group[np.isfinite(group)]
            test[label] = float(np.median(finite)) if finite.size else None
        result.tests[name] = test
    return result
