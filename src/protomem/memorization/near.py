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

import math
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


def tile_rms(images_a: np.ndarray, images_b: np.ndarray, grid: int = 4) -> np.ndarray:
    """(K, T) RMS difference per value in each of the T tiles of :func:`tile_slices`, paired row by row.

    Args:
        images_a, images_b: (K, H, W, C) float arrays in [0, 1].
    """
    a = np.asarray(images_a, dtype=np.float32)
    b = np.asarray(images_b, dtype=np.float32)
    if a.shape != b.shape or a.ndim != 4:
        raise ProtomemError(f"tiles need two (K, H, W, C) arrays of one shape, got {a.shape}, {b.shape}")
    count, height, width, channels = a.shape
    squared = a - b
    squared *= squared
    rows, cols = min(grid, height), min(grid, width)
    if height % rows == 0 and width % cols == 0:  # equal tiles: reshapes instead of a loop
        tile_h, tile_w = height // rows, width // cols
        # the contiguous run of a tile's row (tile_w pixels x channels) first, then its rows: two fast sums
        row_sums = squared.reshape(count, rows, tile_h, cols, tile_w * channels).sum(axis=4)
        sums = row_sums.sum(axis=2).astype(np.float64)  # float32 sums of a tile's squares
        return np.sqrt(sums / (tile_h * tile_w * channels)).reshape(count, rows * cols)
    return np.stack(
        [
            np.sqrt(squared[:, r, c, :].mean(axis=(1, 2, 3), dtype=np.float64))
            for r, c in tile_slices(height, width, grid)
        ],
        axis=1,
    )


def tile_spread(images: np.ndarray, grid: int = 4) -> np.ndarray:
    """(K, T) standard deviation of the pixel values inside each tile (flat tiles carry no evidence)."""
    images = np.asarray(images, dtype=np.float32)
    count, height, width, channels = images.shape
    rows, cols = min(grid, height), min(grid, width)
    if height % rows == 0 and width % cols == 0:  # equal tiles: one (K, T, values) copy, one std
        blocks = images.reshape(count, rows, height // rows, cols, width // cols, channels)
        return blocks.transpose(0, 1, 3, 2, 4, 5).reshape(count, rows * cols, -1).std(axis=2)
    return np.stack(
        [images[:, r, c, :].reshape(count, -1).std(axis=1) for r, c in tile_slices(height, width, grid)],
        axis=1,
    )


def tiled_l2(images_a: np.ndarray, images_b: np.ndarray, grid: int = 4) -> np.ndarray:
    """Tiled L2 of Carlini et al. 2023: the largest per-tile RMS difference between paired images.

    Args:
        images_a, images_b: (K, H, W, C) float arrays in [0, 1], paired row by row.

    Returns:
        (K,) float64: max over tiles of the tile's RMS difference per value.
    """
    return tile_rms(images_a, images_b, grid).max(axis=1)


def matched_tile_fraction(
    tiles: np.ndarray, informative: np.ndarray, threshold: float, min_informative: int = 2
) -> np.ndarray:
    """(K,) fraction of the informative tiles whose RMS difference is below ``threshold``; 0 for an image
    with fewer than ``min_informative`` informative tiles. ``tiles``, ``informative``: (K, T)."""
    hits = (informative & (tiles < threshold)).sum(axis=1)
    count = informative.sum(axis=1)
    return np.where(count >= min_informative, hits / np.maximum(count, 1), 0.0)


def tile_match_fraction(
    images_a: np.ndarray, images_b: np.ndarray, threshold: float, grid: int = 4, flat: float = 0.02
) -> np.ndarray:
    """(K,) fraction of the informative tiles of b whose RMS difference to a is below ``threshold``.

    A partial (region-wise) copy: part of a training image reproduced, the rest not. Tiles that are flat
    in the training image ``b`` (pixel standard deviation <= ``flat``, e.g. empty background) carry no
    evidence and are left out; an image with fewer than two informative tiles scores 0.
    """
    informative = tile_spread(images_b, grid) > flat
    return matched_tile_fraction(tile_rms(images_a, images_b, grid), informative, threshold)


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


def area_resize_matrix(source: int, target: int) -> np.ndarray:
    """(target, source) float32 weights of box (area) resampling along one axis.

    Output pixel i averages the source interval [i * source/target, (i + 1) * source/target), each source
    pixel weighted by its overlap with it: anti-aliased when shrinking, independent of any grid convention.
    """
    edges = np.arange(target + 1) * (source / target)
    pixel = np.arange(source)[None, :]
    overlap = np.clip(np.minimum(edges[1:, None], pixel + 1) - np.maximum(edges[:-1, None], pixel), 0, None)
    return (overlap / overlap.sum(axis=1, keepdims=True)).astype(np.float32)


def resize_images(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """(K, H, W, C) -> (K, height, width, C) float32 by area resampling (two small matrix products)."""
    rows = area_resize_matrix(images.shape[1], height)
    cols = area_resize_matrix(images.shape[2], width)
    return np.einsum("ah,khwc,bw->kabc", rows, images, cols, optimize=True).astype(np.float32, copy=False)


def crop_sizes(height: int, width: int, max_crop: float) -> list[tuple[int, int]]:
    """Every (h, w) a crop keeping >= 1 - max_crop of each side (same aspect ratio, h < height) can have."""
    smallest = max(1, math.ceil((1 - max_crop) * height - 1e-9))
    return [(h, max(1, round(h * width / height))) for h in range(smallest, height)]


def _coarse_positions(span: int, count: int = 3) -> np.ndarray:
    return np.unique(np.linspace(0, span, min(count, span + 1)).round().astype(np.int64))


def nearest_cropped(
    reference: np.ndarray,
    queries: np.ndarray,
    max_crop: float,
    candidates: int = 4,
    retrieval_side: int = 12,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop-tolerant nearest neighbour: is a query a training image cropped and resized back to full size?

    For every crop size (h, w) of :func:`crop_sizes` the query is shrunk to (h, w) by area resampling
    (undoing the enlargement) and compared with the training images' (h, w) windows. Candidates come from
    a faiss search at a coarse grid of window positions (3 x 3: corners, edges, centre) at a resolution
    of at most ``retrieval_side`` pixels, which tolerates the misalignment; each candidate is then
    re-scored exactly at full resolution at every integer position near the coarse one.

    Args:
        reference: (P, H, W, C) float32 training images; queries: (K, H, W, C).
        max_crop: the largest fraction of each side a crop may remove, in (0, 1).

    Returns:
        rms (K,) float64 RMS per value between the shrunk query and the best window, index (K,) int64 of
        that training image, box (K, 4) int64 (top, left, height, width) of the window in it.
    """
    n_ref, height, width, _ = reference.shape
    n_query = queries.shape[0]
    best = np.full(n_query, np.inf)
    best_index = np.full(n_query, -1, dtype=np.int64)
    best_box = np.zeros((n_query, 4), dtype=np.int64)
    for h, w in crop_sizes(height, width, max_crop):
        small = resize_images(queries, h, w)  # (K, h, w, C)
        low_h = min(h, retrieval_side)
        low_w = max(1, round(low_h * w / h))
        small_low = small if (low_h, low_w) == (h, w) else resize_images(small, low_h, low_w)
        tops, lefts = _coarse_positions(height - h), _coarse_positions(width - w)
        reach_top = math.ceil(np.diff(tops).max(initial=0) / 2)
        reach_left = math.ceil(np.diff(lefts).max(initial=0) / 2)
        for top in tops:
            for left in lefts:
                window = reference[:, top : top + h, left : left + w]
                if (low_h, low_w) != (h, w):
                    window = resize_images(window, low_h, low_w)
                _, found = nearest_l2(window.reshape(n_ref, -1), small_low.reshape(n_query, -1), k=candidates)
                for j in range(found.shape[1]):
                    rows = np.flatnonzero(found[:, j] >= 0)
                    candidate = reference[found[rows, j]]
                    for t in range(max(0, top - reach_top), min(height - h, top + reach_top) + 1):
                        for u in range(max(0, left - reach_left), min(width - w, left + reach_left) + 1):
                            diff = small[rows] - candidate[:, t : t + h, u : u + w]
                            score = np.sqrt(np.mean(diff * diff, axis=(1, 2, 3), dtype=np.float64))
                            better = score < best[rows]
                            hit = rows[better]
                            best[hit] = score[better]
                            best_index[hit] = found[hit, j]
                            best_box[hit] = (t, u, h, w)
    return best, best_index, best_box


def mean_knn_distance(vectors: np.ndarray, k: int = 5, batch_size: int = DEFAULT_BATCH) -> np.ndarray:
    """Density prototypicality: (P,) mean Euclidean distance of every row to its k nearest other rows.

    Small = the item sits in a dense region of the training set (typical); large = rare.
    """
    k = min(k, max(1, vectors.shape[0] - 1))
    distances, _ = nearest_l2(vectors, vectors, k=k, exclude_self=True, batch_size=batch_size)
    finite = np.where(np.isfinite(distances), distances, np.nan)
    return np.nanmean(finite, axis=1) if finite.size else np.zeros(vectors.shape[0])
