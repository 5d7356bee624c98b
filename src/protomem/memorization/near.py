"""Near-copy detectors: nearest training items by Hamming, L2 and tiled L2 distance, and the d1/d2 ratio.

Sources of the criteria:

- **d1/d2 ratio** (nearest over second-nearest training distance < 1/3): Yoon et al. 2023, "Diffusion
  probabilistic models generalize when they fail to memorize" (ICML SPIGM workshop) and Gu et al. 2023,
  "On memorization in diffusion models". An output much closer to one training item than to any other
  is a copy of that item, whatever the absolute scale of the distances.
- **tiled L2**: Carlini et al. 2023, "Extracting training data from diffusion models" (USENIX Security):
  cut both images into a grid of non-overlapping tiles (4 x 4 by default) and take the *largest* per-tile
  distance, so an output counts as a copy only if every region of it is close to the training image.
- **Hamming**: number of differing tokens between equal-length sequences (protomem.neighbors).

Images are compared as float32 vectors with pixels in [0, 1]; distances are reported as RMS per pixel
value (L2 / sqrt(number of values)), so thresholds do not depend on image size. Nearest neighbours come
from faiss exact (brute-force, BLAS) search in batches: memory is the training matrix plus one
(batch x training) block of distances inside faiss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from protomem.errors import ProtomemError

DEFAULT_BATCH = 1024


def distance_ratio(d1: np.ndarray, d2: np.ndarray) -> np.ndarray:
    """(K,) d1/d2; 0 where both are 0 (a duplicated training item copied), inf where only d2 is 0.

    Args:
        d1, d2: (K,) distances to the nearest and the second-nearest training item (d1 <= d2).
    """
    d1 = np.asarray(d1, dtype=np.float64)
    d2 = np.asarray(d2, dtype=np.float64)
    out = np.full(d1.shape, np.inf)
    positive = d2 > 0
    out[positive] = d1[positive] / d2[positive]
    out[(d2 == 0) & (d1 == 0)] = 0.0
    return out


def _batches(count: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, count, batch_size):
        yield slice(start, min(count, start + batch_size))


def nearest_l2(
    reference: np.ndarray,
    queries: np.ndarray,
    k: int = 2,
    exclude_self: bool = False,
    batch_size: int = DEFAULT_BATCH,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest reference rows of every query row by Euclidean distance (faiss exact search).

    Args:
        reference: (P, D) float32 vectors (e.g. flattened training images in [0, 1]).
        queries: (K, D) float32 vectors.
        exclude_self: queries are the reference rows (same order); a row is not its own neighbour.
        on_batch: called with the number of queries done after each batch (progress bars).

    Returns:
        distances (K, k) float64 Euclidean (not squared, not normalized), ascending; indices (K, k) int64.
        Where fewer than k candidates exist: distance inf, index -1.
    """
    import faiss

    reference = np.ascontiguousarray(reference, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if reference.ndim != 2 or queries.ndim != 2 or reference.shape[1] != queries.shape[1]:
        raise ProtomemError(
            f"vectors must be 2-D with equal widths, got {reference.shape} and {queries.shape}"
        )
    if exclude_self and reference.shape != queries.shape:
        raise ProtomemError("exclude_self needs queries identical to the reference rows")
    n_query = queries.shape[0]
    distances = np.full((n_query, k), np.inf)
    indices = np.full((n_query, k), -1, dtype=np.int64)
    if reference.shape[0] == 0 or n_query == 0:
        return distances, indices
    search_k = min(reference.shape[0], k + 1 if exclude_self else k)
    for part in _batches(n_query, batch_size):
        squared, found = faiss.knn(queries[part], reference, search_k)
        squared = np.maximum(squared.astype(np.float64), 0.0)
        found = found.astype(np.int64)
        if exclude_self:
            own = np.arange(part.start, part.stop)[:, None]
            is_self = found == own
            # move the row itself to the end, keep the others in order
            order = np.argsort(is_self, axis=1, kind="stable")
            found = np.take_along_axis(found, order, axis=1)[:, : search_k - 1]
            squared = np.take_along_axis(squared, order, axis=1)[:, : search_k - 1]
        take = min(k, found.shape[1])
        distances[part, :take] = np.sqrt(squared[:, :take])
        indices[part, :take] = found[:, :take]
        if on_batch is not None:
            on_batch(part.stop - part.start)
    return distances, indices


def rms(distance: np.ndarray, n_values: int) -> np.ndarray:
    """Euclidean distance -> root-mean-square difference per value (pixel channel)."""
    return np.asarray(distance, dtype=np.float64) / np.sqrt(max(1, n_values))


def tile_slices(height: int, width: int, grid: int = 4) -> list[tuple[slice, slice]]:
    """Non-overlapping tiles covering an image: a grid x grid split (fewer when the image is smaller)."""
    rows = np.array_split(np.arange(height), min(grid, height))
    cols = np.array_split(np.arange(width), min(grid, width))
    return [(slice(r[0], r[-1] + 1), slice(c[0], c[-1] + 1)) for r in rows for c in cols]


def tiled_l2(images_a: np.ndarray, images_b: np.ndarray, grid: int = 4) -> np.ndarray:
    """Tiled L2 of Carlini et al. 2023: the largest per-tile RMS difference between paired images.

    Args:
        images_a, images_b: (K, H, W, C) float arrays in [0, 1], paired row by row.

    Returns:
        (K,) float64: max over tiles of the tile's RMS difference per value.
    """
    a = np.asarray(images_a, dtype=np.float32)
    b = np.asarray(images_b, dtype=np.float32)
    if a.shape != b.shape or a.ndim != 4:
        raise ProtomemError(f"tiled_l2 needs two (K, H, W, C) arrays of one shape, got {a.shape}, {b.shape}")
    squared = (a - b) ** 2
    worst = np.zeros(a.shape[0])
    for rows, cols in tile_slices(a.shape[1], a.shape[2], grid):
        worst = np.maximum(worst, np.sqrt(squared[:, rows, cols, :].mean(axis=(1, 2, 3), dtype=np.float64)))
    return worst


def tile_match_fraction(
    images_a: np.ndarray, images_b: np.ndarray, threshold: float, grid: int = 4, flat: float = 0.02
) -> np.ndarray:
    """(K,) fraction of the informative tiles of b whose RMS difference to a is below ``threshold``.

    A partial (region-wise) copy: part of a training image reproduced, the rest not. Tiles that are flat
    in the training image ``b`` (pixel standard deviation <= ``flat``, e.g. empty background) carry no
    evidence and are left out; an image with fewer than two informative tiles scores 0.
    """
    a = np.asarray(images_a, dtype=np.float32)
    b = np.asarray(images_b, dtype=np.float32)
    hits = np.zeros(a.shape[0])
    informative = np.zeros(a.shape[0])
    for rows, cols in tile_slices(a.shape[1], a.shape[2], grid):
        tile_b = b[:, rows, cols, :]
        diff = np.sqrt(((a[:, rows, cols, :] - tile_b) ** 2).mean(axis=(1, 2, 3), dtype=np.float64))
        useful = tile_b.reshape(len(b), -1).std(axis=1) > flat
        informative += useful
        hits += useful & (diff < threshold)
    return np.where(informative >= 2, hits / np.maximum(informative, 1), 0.0)


def shift_image(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """(K, H, W, C) images translated by (dy, dx) pixels, the uncovered border filled by edge replication."""
    height, width = images.shape[1], images.shape[2]
    pad = max(abs(dy), abs(dx))
    if pad == 0:
        return images
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    top, left = pad - dy, pad - dx
    return padded[:, top : top + height, left : left + width, :]


def overlap_rms(query: np.ndarray, reference: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """(K,) RMS difference between reference images and queries translated by (dy, dx), on the overlap only.

    Args:
        query: (K, H, W, C); reference: (K, H, W, C) paired row by row. Compares query[i, j] with
            reference[i + dy, j + dx], so a query equal to the reference translated by (-dy, -dx) scores 0.
    """
    height, width = query.shape[1], query.shape[2]
    q_rows = slice(max(0, -dy), height - max(0, dy))
    r_rows = slice(max(0, dy), height - max(0, -dy))
    q_cols = slice(max(0, -dx), width - max(0, dx))
    r_cols = slice(max(0, dx), width - max(0, -dx))
    diff = query[:, q_rows, q_cols, :].astype(np.float32) - reference[:, r_rows, r_cols, :].astype(np.float32)
    return np.sqrt((diff**2).mean(axis=(1, 2, 3), dtype=np.float64))


def nearest_shifted(
    reference: np.ndarray, queries: np.ndarray, max_shift: int, candidates: int = 8
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shift-tolerant nearest neighbour: the smallest overlap RMS over translations |dy|, |dx| <= max_shift.

    Each translated query is searched with faiss for ``candidates`` neighbours (border filled by edge
    replication), then the candidates are re-scored exactly on the overlapping region.

    Args:
        reference: (P, H, W, C) float32 training images; queries: (K, H, W, C).

    Returns:
        rms (K,) float64, index (K,) int64 of the best training image, shift (K, 2) int64 (dy, dx).
    """
    n_query = queries.shape[0]
    flat_reference = reference.reshape(reference.shape[0], -1)
    best = np.full(n_query, np.inf)
    best_index = np.full(n_query, -1, dtype=np.int64)
    best_shift = np.zeros((n_query, 2), dtype=np.int64)
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            moved = shift_image(queries, dy, dx)
            _, found = nearest_l2(flat_reference, moved.reshape(n_query, -1), k=candidates)
            for j in range(found.shape[1]):
                ok = found[:, j] >= 0
                score = np.full(n_query, np.inf)
                score[ok] = overlap_rms(queries[ok], reference[found[ok, j]], dy, dx)
                better = score < best
                best[better] = score[better]
                best_index[better] = found[better, j]
                best_shift[better] = (dy, dx)
    return best, best_index, best_shift


def mean_knn_distance(vectors: np.ndarray, k: int = 5, batch_size: int = DEFAULT_BATCH) -> np.ndarray:
    """Density prototypicality: (P,) mean Euclidean distance of every row to its k nearest other rows.

    Small = the item sits in a dense region of the training set (typical); large = rare.
    """
    k = min(k, max(1, vectors.shape[0] - 1))
    distances, _ = nearest_l2(vectors, vectors, k=k, exclude_self=True, batch_size=batch_size)
    finite = np.where(np.isfinite(distances), distances, np.nan)
    return np.nanmean(finite, axis=1) if finite.size else np.zeros(vectors.shape[0])
