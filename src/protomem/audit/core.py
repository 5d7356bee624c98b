"""The audit itself: every generated output against the training set, for sequences, text and images.

Arrays in, tables out: :func:`audit_images`, :func:`audit_sequences` and :func:`audit_text` take the
loaded data and an :class:`AuditConfig` and return an :class:`AuditResult` (the per-output table
``matches``, the per-training-item table ``per_train`` and a JSON-ready ``summary``). The CLI
(``protomem audit``) and the image study call the same functions.

Criteria per modality (a flag column each; ``copied`` = any of the copy flags):

============  =================================================================================
sequences     exact (hash of the tokens); hamming (nearest training sequence within
              ``hamming_threshold`` x length differing tokens); ratio (d1/d2 < ``ratio_threshold``,
              Hamming); span (a run of >= ``span_tokens`` tokens shared with one training sequence);
              covered (>= ``coverage_threshold`` of the tokens inside shared k-grams; not a copy flag)
text          exact (same whitespace tokens; an empty document matches nothing); span; covered
images        exact (same 8-bit pixels); l2 (RMS per value <= ``l2_threshold``); ratio (d1/d2 on L2);
              tiled (tiled L2 <= ``tiled_threshold``); shifted (only with ``max_shift`` > 0: RMS on the
              overlap after the best translation <= ``shift_threshold``); cropped (only with ``max_crop``
              > 0: RMS between the output shrunk back and the best window of a training image <=
              ``crop_threshold``); flipped (only with ``flips``: the mirrored output passes l2, ratio or
              tiled); normalized (only with ``normalized``: RMS between the per-image standardized
              output and training image <= ``normalized_threshold``); partial (>= ``partial_fraction`` of
              the informative tiles within ``partial_threshold`` of one training image; not a copy flag)
features      (any modality, with a :class:`~protomem.audit.features.FeatureSpace`) similar (cosine
              similarity to the nearest training item >= ``similarity_threshold``); feature_ratio (d1/d2
              of unit-vector distances < ``ratio_threshold``)
============  =================================================================================

Hamming, d1/d2 and the ``hamming`` / ``ratio`` flags of sequences exist when every *training* sequence
has one length L; they are computed for the outputs of length L. Outputs of another length get NaN
``d1`` / ``d2`` / ``d1_over_d2``, -1 ``nearest_train`` / ``second_train`` and neither flag (exact, span
and covered still apply to them). Ragged training sequences: no Hamming columns at all.

The generated side may be a list (or array) or a stream: an iterable of (start, batch) pairs, consumed
once, batch by batch, so only the per-output result rows are kept (see :mod:`protomem.audit.run`).

Whether the copied items are typical or rare: :mod:`protomem.audit.typicality` (skipped with
``prototypicality=False``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protomem.audit import defaults, typicality
from protomem.audit.features import FeatureSpace, feature_columns
from protomem.audit.inputs import image_bytes_keys
from protomem.errors import ProtomemError
from protomem.memorization import near, text
from protomem.neighbors import ExactIndex, nearest_hamming, row_hashes

Progress = Callable[[int], None]

FEATURE_FLAGS = ("similar", "feature_ratio")
COPY_FLAGS = {
    "sequences": ("exact", "hamming", "ratio", "span", *FEATURE_FLAGS),
    "text": ("exact", "span", *FEATURE_FLAGS),
    "images": (
        "exact",
        "l2",
        "ratio",
        "tiled",
        "shifted",
        "cropped",
        "flipped",
        "normalized",
        *FEATURE_FLAGS,
    ),
}
OTHER_FLAGS = {"sequences": ("covered",), "text": ("covered",), "images": ("partial",)}
# Which training item an output copies, by the strongest flag it has (earlier = stronger).
SOURCE_OF_FLAG = (
    ("exact", "exact_train"),
    ("l2", "nearest_train"),
    ("hamming", "nearest_train"),
    ("ratio", "nearest_train"),
    ("tiled", "tiled_train"),
    ("span", "span_train"),
    ("shifted", "shift_train"),
    ("cropped", "crop_train"),
    ("flipped", "flip_train"),
    ("normalized", "normalized_train"),
    ("similar", "feature_train"),
    ("feature_ratio", "feature_train"),
)
SPACES = {
    "images": {
        "exact": "8-bit pixels",
        "l2": "pixels",
        "ratio": "pixels",
        "tiled": "pixels",
        "partial": "pixels",
        "shifted": "translated pixels",
        "cropped": "cropped and enlarged pixels",
        "flipped": "mirrored pixels",
        "normalized": "standardized pixels (brightness and contrast removed)",
    },
    "sequences": dict.fromkeys(("exact", "hamming", "ratio", "span", "covered"), "tokens"),
    "text": dict.fromkeys(("exact", "span", "covered"), "words (whitespace tokens)"),
}
FLAT = 0.02  # pixel standard deviation at or below which a tile or an image carries no evidence


class AuditConfig(BaseModel):
    """Every threshold of the audit, validated. Distances of images are RMS per pixel value in [0, 1].

    The image thresholds are calibrated (``benchmarks/calibrate_audit.py``, docs/results/audit.md): each
    one flags under 1% of fresh images of four kinds (digits at 8x8 and 32x32, textures, colour scenes).
    """

    model_config = ConfigDict(extra="forbid")

    modality: Literal["auto", "sequences", "text", "images"] = "auto"
    ratio_threshold: float = Field(1 / 3, gt=0, le=1)
    hamming_threshold: float = Field(0.1, ge=0, le=1)
    span_tokens: int = Field(50, ge=1)
    coverage_threshold: float = Field(0.5, gt=0, le=1)
    l2_threshold: float = Field(defaults.L2_THRESHOLD, ge=0)
    tiled_threshold: float = Field(defaults.TILED_THRESHOLD, ge=0)
    tile_grid: int = Field(4, ge=1)
    partial_threshold: float = Field(defaults.PARTIAL_THRESHOLD, ge=0)
    partial_fraction: float = Field(defaults.PARTIAL_FRACTION, gt=0, le=1)
    max_shift: int = Field(0, ge=0, le=16)
    shift_threshold: float = Field(defaults.SHIFT_THRESHOLD, ge=0)
    max_crop: float = Field(0.0, ge=0, lt=1)  # largest fraction of each side a crop may remove
    crop_threshold: float = Field(defaults.CROP_THRESHOLD, ge=0)
    flips: bool = False
    normalized: bool = False
    normalized_threshold: float = Field(defaults.NORMALIZED_THRESHOLD, ge=0)
    similarity_threshold: float = Field(0.5, ge=-1, le=1)
    candidates: int = Field(16, ge=2)
    prototypicality: bool = True
    density_k: int = Field(5, ge=1)
    density_sample: int = Field(1000, ge=2)  # copies and random reference items used for the verdict
    density_budget: float = Field(2e10, gt=0)  # token comparisons allowed for the Hamming neighbours
    batch_size: int = Field(1024, ge=1)
    max_image_pixels: int | None = Field(None, ge=1)
    resize: bool = False
    lowercase: bool = False
    seed: int = 0

    @classmethod
    def make(cls, **fields: object) -> AuditConfig:
        """Like the constructor, but a ProtomemError naming every bad field instead of ValidationError."""
        try:
            return cls(**fields)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ProtomemError(f"invalid audit settings: {problems}") from None


@dataclass
class AuditResult:
    modality: str
    matches: pd.DataFrame
    per_train: pd.DataFrame
    summary: dict
    extras: dict = field(default_factory=dict)


def check_training_images(count: int, path: object = None) -> None:
    """Refuse fewer than 2 training images (d1/d2 needs a second nearest), naming ``path`` if given."""
    if count < 2:
        raise ProtomemError(
            f"the training set holds {count} image(s); the audit needs at least 2 "
            "(d1/d2 uses the second nearest)",
            path=path,
        )


def check_image_settings(config: AuditConfig, shape: Sequence[int], path: object = None) -> None:
    """Refuse settings that do not fit images of ``shape`` (H, W, C), naming ``path`` if given."""
    height, width = int(shape[0]), int(shape[1])
    most = min(height, width) // 4
    if config.max_shift > most:
        raise ProtomemError(
            f"--max-shift {config.max_shift} is too large for {height}x{width} images: at most {most} "
            "(a quarter of the shorter side, so that enough of the image overlaps)",
            path=path,
        )


# ------------------------------------------------------------------------------------------------- summary


def _copies_per_train(matches: pd.DataFrame, n_train: int) -> np.ndarray:
    hits = matches.loc[matches["copied"] & (matches["train_index"] >= 0), "train_index"].to_numpy()
    return np.bincount(hits.astype(np.int64), minlength=n_train)


def _finish_flags(matches: pd.DataFrame, modality: str) -> None:
    """Add ``copied`` (any copy flag) and ``train_index`` (the item copied, by the strongest flag)."""
    copy_flags = [f for f in COPY_FLAGS[modality] if f in matches.columns]
    matches["copied"] = matches[copy_flags].any(axis=1)
    train_index = np.full(len(matches), -1, dtype=np.int64)
    for flag, column in reversed(SOURCE_OF_FLAG):
        if flag in matches.columns:
            train_index = np.where(matches[flag], matches[column], train_index)
    matches["train_index"] = train_index.astype(np.int64)


def _feature_flags(matches: pd.DataFrame, config: AuditConfig) -> None:
    if "feature_similarity" in matches.columns:
        matches["similar"] = matches["feature_similarity"] >= config.similarity_threshold
        matches["feature_ratio"] = matches["feature_d1_over_d2"] < config.ratio_threshold


def summarize(
    modality: str,
    matches: pd.DataFrame,
    per_train: pd.DataFrame,
    config: AuditConfig,
    seconds: float,
    tests: dict[str, dict] | None = None,
    features: FeatureSpace | None = None,
) -> dict:
    """Counts per criterion, the space each was computed in, and the typical-vs-rare tests."""
    flags = [f for f in (*COPY_FLAGS[modality], *OTHER_FLAGS[modality]) if f in matches.columns]
    counts = {f: int(matches[f].sum()) for f in flags}
    copied = int(matches["copied"].sum())
    copies = per_train["copies"].to_numpy()
    spaces = {f: SPACES[modality].get(f, features.label if features is not None else "") for f in flags}
    if tests is None:
        verdict = "Typical or rare: not computed (prototypicality off)."
    elif "density" in tests:
        verdict = tests["density"]["sentence"]
    else:
        verdict = "No prototypicality score was computed."
    return {
        "modality": modality,
        "n_train": int(len(per_train)),
        "n_generated": int(len(matches)),
        "n_copied_outputs": copied,
        "fraction_copied_outputs": copied / max(1, len(matches)),
        "n_train_items_copied": int((copies > 0).sum()),
        "counts": counts,
        "copy_flags": [f for f in COPY_FLAGS[modality] if f in matches.columns],
        "spaces": spaces,
        "prototypicality": tests or {},
        "verdict": verdict,
        "config": config.model_dump(),
        "seconds": seconds,
    }


def _as_batches(generated: Sequence | np.ndarray | Iterable[tuple[int, Sequence]], batch_size: int):
    """(start, batch) pairs: an array or a list is sliced into batches of ``batch_size`` items; anything
    else is taken to be an iterable of (start, batch) pairs already (a stream, consumed once)."""
    if isinstance(generated, (np.ndarray, Sequence)):
        return ((s, generated[s : s + batch_size]) for s in range(0, len(generated), batch_size))
    return iter(generated)


def _typicality(
    n_train: int,
    matches: pd.DataFrame,
    main: typicality.Space,
    modelled: np.ndarray,
    level: np.ndarray,
    features: FeatureSpace | None,
    config: AuditConfig,
    sample: int,
    extra_scores: dict[str, np.ndarray] | None = None,
) -> typicality.Typicality:
    """The typical-vs-rare analysis of an audit's copies.

    Args:
        main: the modality's space (pixels or tokens); ``modelled``: (K,) bool, outputs whose copy flags
            have a copy model in it, ``level``: (K,) their distance to the copied item there.
        features: adds the feature space; copies flagged there only are planted there (cosine levels).
    """
    copied = matches["copied"].to_numpy() & (matches["train_index"].to_numpy() >= 0)
    space = np.where(copied & modelled, 0, -1)
    levels = np.where(space == 0, level, 0.0)
    spaces = [main]
    if features is not None:
        by_features = copied & (space == -1) & (matches["similar"] | matches["feature_ratio"]).to_numpy()
        space = np.where(by_features, 1, space)
        levels = np.where(by_features, matches["feature_similarity"].to_numpy(), levels)
        thresholds = {"similarity": config.similarity_threshold, "ratio": config.ratio_threshold}

        def plant(reference, found, at, rng) -> np.ndarray:
            return typicality.plant_features(features.train, reference, found, at, thresholds, rng)

        def neighbours(items: np.ndarray) -> typicality.Neighbours:
            return typicality.vector_neighbours(features.train, items, config.candidates, config.seed)

        spaces.append(typicality.Space("density_features", neighbours, plant))
    copies = typicality.Copies(matches["train_index"].to_numpy()[copied], space[copied], levels[copied])
    return typicality.assess(n_train, copies, spaces, config.density_k, sample, config.seed, extra_scores)


# -------------------------------------------------------------------------------------------------- images


def _standardized(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """((N, D) float32 per-image standardized pixels (x - mean) / std, (N,) std): brightness (an added
    constant) and contrast (a factor) removed. Flat images (std <= FLAT) are divided by FLAT instead."""
    flat = np.asarray(images, dtype=np.float32).reshape(len(images), -1)
    mean = flat.mean(axis=1, keepdims=True)
    spread = flat.std(axis=1, keepdims=True)
    return (flat - mean) / np.maximum(spread, FLAT), spread[:, 0]


class _TileSpread:
    """Pixel std per tile of the training images, computed for the images asked for and kept (``chunk``
    images at a time, so the copies it takes stay small whatever the image size)."""

    def __init__(self, train: np.ndarray, grid: int, chunk: int = 1024) -> None:
        self.train, self.grid, self.chunk = train, grid, chunk
        self.values: np.ndarray | None = None

    def __getitem__(self, indices: np.ndarray) -> np.ndarray:
        if self.values is None:
            count = len(near.tile_slices(*self.train.shape[1:3], self.grid))
            self.values = np.full((len(self.train), count), np.nan, dtype=np.float32)
        missing = np.unique(indices[np.isnan(self.values[indices, 0])])
        for start in range(0, missing.size, self.chunk):
            part = missing[start : start + self.chunk]
            self.values[part] = near.tile_spread(self.train[part], self.grid)
        return self.values[indices]


class _ImageExactIndex:
    """Exact 8-bit pixel matches: a 64-bit hash of each training image's bytes, sorted once (8 bytes per
    image instead of a copy of the images); a hash match is verified byte by byte."""

    def __init__(self, train: np.ndarray, chunk: int = 8192) -> None:
        self.train = train
        hashes = np.concatenate(
            [row_hashes(image_bytes_keys(train[s : s + chunk])) for s in range(0, len(train), chunk)]
        )
        self.order = np.argsort(hashes, kind="stable")  # equal hashes keep index order: first one first
        self.sorted = hashes[self.order]

    def find(self, batch: np.ndarray) -> np.ndarray:
        """(K,) int64: the first training image with exactly the 8-bit pixels of each output, or -1."""
        keys = image_bytes_keys(batch)
        hashes = row_hashes(keys)
        out = np.full(len(batch), -1, dtype=np.int64)
        start = np.searchsorted(self.sorted, hashes, side="left")
        stop = np.searchsorted(self.sorted, hashes, side="right")
        for row in np.flatnonzero(stop > start):
            for position in range(start[row], stop[row]):
                index = int(self.order[position])
                if np.array_equal(image_bytes_keys(self.train[index : index + 1])[0], keys[row]):
                    out[row] = index
                    break
        return out


def _pixel_columns(
    train: np.ndarray,
    flat_train: np.ndarray,
    spread: _TileSpread,
    batch: np.ndarray,
    config: AuditConfig,
    n_cand: int,
    found: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Nearest training images of a batch (faiss, unless ``found`` gives them), d1/d2, and tiled L2 and
    matched-tile fraction over the ``n_cand`` nearest. ``spread``: the training images' pixel std per
    tile."""
    count, values = batch.shape[0], int(np.prod(train.shape[1:]))
    if found is None:
        found = near.nearest_l2(flat_train, batch.reshape(count, -1), k=n_cand)
    distances, indices = found
    d1, d2 = near.rms(distances[:, 0], values), near.rms(distances[:, 1], values)
    tiled = np.full(count, np.inf)
    tiled_index = np.full(count, -1, dtype=np.int64)
    fraction = np.zeros(count)
    for j in range(n_cand):
        cand = indices[:, j]
        tiles = near.tile_rms(batch, train[cand], config.tile_grid)
        score = tiles.max(axis=1)
        better = score < tiled
        tiled[better], tiled_index[better] = score[better], cand[better]
        informative = spread[cand] > FLAT
        fraction = np.maximum(
            fraction, near.matched_tile_fraction(tiles, informative, config.partial_threshold)
        )
    return {
        "nearest_train": indices[:, 0],
        "second_train": indices[:, 1],
        "d1": d1,
        "d2": d2,
        "d1_over_d2": near.distance_ratio(d1, d2),
        "tiled_l2": tiled,
        "tiled_train": tiled_index,
        "tile_fraction": fraction,
    }


def _image_flags(matches: pd.DataFrame, config: AuditConfig) -> None:
    """The image flags from the distance columns (thresholds of ``config``)."""
    matches["exact"] = matches["exact_train"] >= 0
    matches["l2"] = matches["d1"] <= config.l2_threshold
    matches["ratio"] = matches["d1_over_d2"] < config.ratio_threshold
    matches["tiled"] = matches["tiled_l2"] <= config.tiled_threshold
    matches["partial"] = matches["tile_fraction"] >= config.partial_fraction
    if "shift_rms" in matches.columns:
        matches["shifted"] = matches["shift_rms"] <= config.shift_threshold
    if "crop_rms" in matches.columns:
        matches["cropped"] = matches["crop_rms"] <= config.crop_threshold
    if "flip_d1" in matches.columns:
        by_distance = (matches["flip_d1"] <= config.l2_threshold) | (
            matches["flip_d1_over_d2"] < config.ratio_threshold
        )
        matches["flipped"] = by_distance | (matches["flip_tiled_l2"] <= config.tiled_threshold)
        matches["flip_train"] = np.where(
            by_distance, matches["flip_nearest_train"], matches["flip_tiled_train"]
        )
    if "normalized_rms" in matches.columns:
        matches["normalized"] = (matches["normalized_rms"] <= config.normalized_threshold) & (
            matches["pixel_std"] > FLAT
        )
    _feature_flags(matches, config)


def audit_images(
    train: np.ndarray,
    generated: np.ndarray | Iterable[tuple[int, np.ndarray]],
    config: AuditConfig,
    on_batch: Progress | None = None,
    density: bool = True,
    features: FeatureSpace | None = None,
) -> AuditResult:
    """Audit generated images against training images.

    Args:
        train: (P, H, W, C) float32 in [0, 1], held in memory.
        generated: (K, H, W, C) float32 in [0, 1], or an iterable of (start, batch) pairs (streamed).
        on_batch: called with the number of outputs done after each batch.
        density: whether the copied items are typical or rare (also off with ``config.prototypicality``).
        features: a feature space (precomputed vectors or an embedder) for the feature criteria.
    """
    started = time.perf_counter()
    train = np.ascontiguousarray(train, dtype=np.float32)
    n_train = train.shape[0]
    check_training_images(n_train)
    check_image_settings(config, train.shape[1:])
    values = int(np.prod(train.shape[1:]))
    flat_train = train.reshape(n_train, -1)
    exact = _ImageExactIndex(train)
    spread = _TileSpread(train, config.tile_grid)
    standardized_train = _standardized(train)[0] if config.normalized else None
    n_cand = min(config.candidates, n_train)

    def rest_of_batch(start: int, batch: np.ndarray, found: tuple[np.ndarray, np.ndarray]) -> pd.DataFrame:
        part = {
            "output": np.arange(start, start + len(batch)),
            **_pixel_columns(train, flat_train, spread, batch, config, n_cand, found),
            "exact_train": exact.find(batch),
        }
        if config.max_shift > 0:
            shifted, shifted_index, shift = near.nearest_shifted(train, batch, config.max_shift, candidates=4)
            part.update(
                shift_rms=shifted, shift_train=shifted_index, shift_dy=shift[:, 0], shift_dx=shift[:, 1]
            )
        if config.max_crop > 0:
            cropped, cropped_index, box = near.nearest_cropped(train, batch, config.max_crop, candidates=4)
            part.update(crop_rms=cropped, crop_train=cropped_index)
            part.update(
                {f"crop_{name}": box[:, i] for i, name in enumerate(("top", "left", "height", "width"))}
            )
        if config.flips:
            mirrored = _pixel_columns(train, flat_train, spread, batch[:, :, ::-1], config, n_cand)
            part.update({f"flip_{k}": mirrored[k] for k in ("nearest_train", "d1", "d1_over_d2")})
            part.update(flip_tiled_l2=mirrored["tiled_l2"], flip_tiled_train=mirrored["tiled_train"])
        if standardized_train is not None:
            queries, pixel_std = _standardized(batch)
            distances, indices = near.nearest_l2(standardized_train, queries, k=1)
            part.update(
                normalized_rms=near.rms(distances[:, 0], values),
                normalized_train=indices[:, 0],
                pixel_std=pixel_std,
            )
        if features is not None:
            part.update(feature_columns(features, start, batch))
        return pd.DataFrame(part)

    # The main search of batch b + 1 (faiss, all threads) overlaps the rest of batch b (numpy, mostly one
    # thread) in a worker thread; the results do not depend on the timing.
    parts: list[pd.DataFrame] = []
    pending = None
    with ThreadPoolExecutor(max_workers=1) as worker:
        for start, batch in _as_batches(generated, config.batch_size):
            batch = np.ascontiguousarray(batch, dtype=np.float32)
            if batch.shape[1:] != train.shape[1:]:
                raise ProtomemError(
                    f"generated images are {batch.shape[1:]}, training images {train.shape[1:]}"
                )
            found = near.nearest_l2(flat_train, batch.reshape(len(batch), -1), k=n_cand)
            if pending is not None:
                parts.append(pending.result())
                if on_batch is not None:
                    on_batch(len(parts[-1]))
            pending = worker.submit(rest_of_batch, start, batch, found)
        if pending is not None:
            parts.append(pending.result())
            if on_batch is not None:
                on_batch(len(parts[-1]))
    if not parts:
        raise ProtomemError("no generated images")
    matches = pd.concat(parts, ignore_index=True)
    _image_flags(matches, config)
    _finish_flags(matches, "images")
    copies = _copies_per_train(matches, n_train)
    per_train = pd.DataFrame({"train_index": np.arange(n_train), "copies": copies})
    tests = None
    if density and config.prototypicality:
        thresholds = {
            "l2": config.l2_threshold,
            "ratio": config.ratio_threshold,
            "tiled": config.tiled_threshold,
        }

        def neighbours(items: np.ndarray) -> typicality.Neighbours:
            found = typicality.vector_neighbours(flat_train, items, config.candidates, config.seed)
            found.distances = near.rms(found.distances, values)
            return found

        def plant(reference, found, levels, rng) -> np.ndarray:
            return typicality.plant_images(train, reference, found, levels, thresholds, config.tile_grid, rng)

        by_pixels = matches[["exact", "l2", "ratio", "tiled"]].any(axis=1).to_numpy()
        level = np.where(matches["exact"], 0.0, matches["d1"])
        space = typicality.Space("density", neighbours, plant)
        assessed = _typicality(
            n_train, matches, space, by_pixels, level, features, config, config.density_sample
        )
        for name, column in assessed.columns.items():
            per_train[name] = column
        tests = assessed.tests
    summary = summarize("images", matches, per_train, config, time.perf_counter() - started, tests, features)
    summary["image_shape"] = list(train.shape[1:])
    return AuditResult("images", matches, per_train, summary)


# --------------------------------------------------------------------------------------- sequences and text


def _first_index_by_content(train: Sequence[np.ndarray]) -> dict[bytes, int]:
    """{token bytes: index of the first training sequence with exactly these tokens} (empty ones left out)."""
    first: dict[bytes, int] = {}
    for i, seq in enumerate(train):
        if len(seq):
            first.setdefault(np.asarray(seq, dtype=np.int64).tobytes(), i)
    return first


def _exact_ragged(first: dict[bytes, int], outputs: Sequence[np.ndarray]) -> np.ndarray:
    """(K,) index of the training item with exactly the tokens of each output; -1 (an empty output matches
    nothing)."""
    keys = (np.asarray(o, dtype=np.int64).tobytes() for o in outputs)
    return np.array([first.get(key, -1) if key else -1 for key in keys], dtype=np.int64)


def _hamming_columns(
    matrix: np.ndarray, exact: ExactIndex, outputs: Sequence[np.ndarray]
) -> dict[str, np.ndarray]:
    """Exact match and the two nearest training sequences (Hamming) of the outputs as long as the rows of
    ``matrix`` (P, L) (``exact``: its index); the other outputs get -1 indices and NaN distances."""
    count, n_train = len(outputs), matrix.shape[0]
    fits = np.flatnonzero([len(o) == matrix.shape[1] for o in outputs])
    columns = {
        "exact_train": np.full(count, -1, dtype=np.int64),
        "nearest_train": np.full(count, -1, dtype=np.int64),
        "second_train": np.full(count, -1, dtype=np.int64),
        "d1": np.full(count, np.nan),
        "d2": np.full(count, np.nan),
        "d1_over_d2": np.full(count, np.nan),
    }
    if fits.size == 0:
        return columns
    same = np.stack([outputs[i] for i in fits])
    columns["exact_train"][fits] = exact.find(same)
    distances, indices = nearest_hamming(matrix, same, k=min(2, n_train))
    columns["nearest_train"][fits] = indices[:, 0]
    columns["d1"][fits] = distances[:, 0]
    if n_train > 1:  # one training sequence: no second-nearest, no ratio (as in feature space)
        columns["second_train"][fits] = indices[:, 1]
        columns["d2"][fits] = distances[:, 1]
        columns["d1_over_d2"][fits] = near.distance_ratio(distances[:, 0], distances[:, 1])
    return columns


def _token_space(
    train: Sequence[np.ndarray], matrix: np.ndarray | None, config: AuditConfig
) -> typicality.Space:
    """Where the density of token items is measured and how a copy is planted there: sequences of one
    length by Hamming distance (copies with that many changed tokens), others by bag-of-token vectors
    (caught by verbatim criteria only: no planting)."""
    if matrix is None:
        vectors = typicality.bag_vectors(train)
        return typicality.Space(
            "density",
            lambda items: typicality.vector_neighbours(vectors, items, config.candidates, config.seed),
        )
    thresholds = {"hamming": config.hamming_threshold, "ratio": config.ratio_threshold}

    def plant(reference, found, levels, rng) -> np.ndarray:
        return typicality.plant_sequences(
            matrix, reference, found, levels, thresholds, config.span_tokens, rng
        )

    return typicality.Space(
        "density", lambda items: typicality.token_neighbours(matrix, items, config.candidates), plant
    )


def _token_audit(
    modality: str,
    train: Sequence[np.ndarray],
    batches: Iterable[tuple[int, Sequence[np.ndarray]]],
    config: AuditConfig,
    on_batch: Progress | None,
    density: bool,
    score_table: dict[str, np.ndarray] | None = None,
    features: FeatureSpace | None = None,
) -> AuditResult:
    """The audit of token arrays (sequences, encoded text); ``batches`` yields (start, outputs) pairs."""
    started = time.perf_counter()
    n_train = len(train)
    if n_train < 1:
        raise ProtomemError("empty training set")
    matrix = None
    if modality == "sequences" and len({len(s) for s in train}) == 1:
        matrix = np.stack(train)
    index = text.build_kgram_index(train, config.span_tokens)
    by_content = _first_index_by_content(train) if matrix is None else None
    exact = ExactIndex(matrix) if matrix is not None else None
    parts = []
    for start, batch in batches:
        chunk = list(batch)
        count = len(chunk)
        spans = text.shared_spans(index, chunk)
        if matrix is not None:
            hamming = _hamming_columns(matrix, exact, chunk)
        else:
            hamming = {"exact_train": _exact_ragged(by_content, chunk)}
        part = {
            "output": np.arange(start, start + count),
            "length": np.array([len(c) for c in chunk], dtype=np.int64),
            "exact_train": hamming.pop("exact_train"),
            "longest_span": spans.longest_span,
            "span_train": spans.train_index,
            "span_output_start": spans.output_start,
            "span_train_start": spans.train_start,
            "covered_fraction": spans.covered_fraction,
            **hamming,
        }
        if features is not None:
            part.update(feature_columns(features, start, chunk))
        parts.append(pd.DataFrame(part))
        if on_batch is not None:
            on_batch(count)
    if not parts:
        raise ProtomemError("no generated outputs")
    matches = pd.concat(parts, ignore_index=True)
    matches["exact"] = matches["exact_train"] >= 0
    matches["span"] = matches["longest_span"] >= config.span_tokens
    matches["covered"] = matches["covered_fraction"] >= config.coverage_threshold
    if matrix is not None:  # NaN distances (outputs of another length) compare False: no flag
        matches["hamming"] = matches["d1"] <= config.hamming_threshold * matrix.shape[1]
        matches["ratio"] = matches["d1_over_d2"] < config.ratio_threshold
    _feature_flags(matches, config)
    _finish_flags(matches, modality)
    copies = _copies_per_train(matches, n_train)
    per_train = pd.DataFrame(
        {"train_index": np.arange(n_train), "length": [len(s) for s in train], "copies": copies}
    )
    for name, values in (score_table or {}).items():
        per_train[name] = values
    tests = None
    if density and config.prototypicality:
        sample = config.density_sample
        modelled = np.zeros(len(matches), dtype=bool)
        level = np.zeros(len(matches))
        if matrix is not None:  # the Hamming neighbours cost (copies + reference) x P x L comparisons
            sample = int(min(sample, max(50, config.density_budget // (2 * matrix.size))))
            modelled = matches[["exact", "hamming", "ratio"]].any(axis=1).to_numpy()
            level = np.where(matches["exact"], 0.0, matches["d1"].fillna(0.0))
        space = _token_space(train, matrix, config)
        assessed = _typicality(
            n_train, matches, space, modelled, level, features, config, sample, score_table
        )
        for name, column in assessed.columns.items():
            per_train[name] = column
        tests = assessed.tests
    summary = summarize(modality, matches, per_train, config, time.perf_counter() - started, tests, features)
    summary["span_tokens"] = config.span_tokens
    if matrix is not None:
        summary["hamming_length"] = int(matrix.shape[1])
        summary["n_outputs_other_length"] = int((matches["length"] != matrix.shape[1]).sum())
    return AuditResult(modality, matches, per_train, summary)


def audit_sequences(
    train: Sequence[np.ndarray],
    generated: Sequence[np.ndarray] | Iterable[tuple[int, Sequence[np.ndarray]]],
    config: AuditConfig,
    on_batch: Progress | None = None,
    density: bool = True,
    grammar: object | None = None,
    features: FeatureSpace | None = None,
) -> AuditResult:
    """Audit token sequences of any lengths (Hamming and d1/d2 when the training sequences share one length,
    for the outputs of that length).

    Args:
        train: (n_i,) int64 token arrays, held in memory.
        generated: a list of (m_j,) int64 token arrays, or an iterable of (start, list of arrays) pairs
            (streamed; see :func:`protomem.audit.inputs.batches`).
        on_batch: called with the number of outputs done after each batch.
        grammar: an RHM (protomem.grammar) — adds its block / rule frequency scores per training item.
        features: a feature space for the feature criteria (one vector per sequence).
    """
    table = None
    if grammar is not None:
        from protomem.grammar.prototypicality import prototypicality_table

        if len({len(s) for s in train}) != 1 or len(train[0]) != grammar.length:
            raise ProtomemError(
                f"--grammar needs training sequences of the grammar's length {grammar.length}"
            )
        table = prototypicality_table(grammar, np.stack(train))
    batches = _as_batches(generated, config.batch_size)
    return _token_audit("sequences", train, batches, config, on_batch, density, table, features)


def audit_text(
    train_docs: Sequence[str],
    generated_docs: Sequence[str] | Iterable[tuple[int, Sequence[str]]],
    config: AuditConfig,
    on_batch: Progress | None = None,
    density: bool = True,
    features: FeatureSpace | None = None,
) -> AuditResult:
    """Audit plain-text documents: whitespace tokens (lower-cased if ``config.lowercase``).

    The training documents are encoded at once (their vocabulary), the outputs batch by batch with that
    vocabulary. ``generated_docs``: a list of documents or an iterable of (start, list of documents)
    pairs (streamed). ``result.extras``: ``train_tokens`` (the encoded training documents) and, only
    when ``generated_docs`` is a list, ``output_tokens`` (the encoded outputs; a stream is not kept).
    """
    prepare = (lambda d: d.lower()) if config.lowercase else (lambda d: d)
    train, vocabulary = text.whitespace_tokens([prepare(d) for d in train_docs])
    kept: list[np.ndarray] | None = [] if isinstance(generated_docs, Sequence) else None

    def encoded() -> Iterator[tuple[int, list[np.ndarray]]]:
        for start, docs in _as_batches(generated_docs, config.batch_size):
            # words the training documents never use can match nothing in them: one shared id, so the
            # vocabulary (and memory) does not grow with the outputs
            tokens = text.encode_with([prepare(d) for d in docs], vocabulary, unknown=len(vocabulary))
            if kept is not None:
                kept.extend(tokens)
            yield start, tokens

    result = _token_audit("text", train, encoded(), config, on_batch, density, features=features)
    result.extras["train_tokens"] = train
    if kept is not None:
        result.extras["output_tokens"] = kept
    return result
