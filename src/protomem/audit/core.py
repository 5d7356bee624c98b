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
text          exact (same whitespace tokens); span; covered (as above, on whitespace tokens)
images        exact (same 8-bit pixels); l2 (RMS per value <= ``l2_threshold``); ratio (d1/d2 on L2);
              tiled (tiled L2 <= ``tiled_threshold``); shifted (only with ``max_shift`` > 0: RMS on the
              overlap after the best translation <= ``l2_threshold``); cropped (only with ``max_crop``
              > 0: RMS between the output shrunk back and the best window of a training image <=
              ``crop_threshold``); partial (>= half of the tiles within ``tiled_threshold`` of one
              training image; not a copy flag)
============  =================================================================================

Hamming, d1/d2 and the ``hamming`` / ``ratio`` flags of sequences exist when every *training* sequence
has one length L; they are computed for the outputs of length L. Outputs of another length get NaN
``d1`` / ``d2`` / ``d1_over_d2``, -1 ``nearest_train`` / ``second_train`` and neither flag (exact, span
and covered still apply to them). Ragged training sequences: no Hamming columns at all.

The generated side may be a list (or array) or a stream: an iterable of (start, batch) pairs, consumed
once, batch by batch, so only the per-output result rows are kept (see :mod:`protomem.audit.run`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protomem.audit.inputs import image_bytes_keys
from protomem.audit.stats import describe_direction, spearman_test
from protomem.errors import ProtomemError
from protomem.memorization import near, text
from protomem.neighbors import exact_match_index, nearest_hamming

Progress = Callable[[int], None]

COPY_FLAGS = {
    "sequences": ("exact", "hamming", "ratio", "span"),
    "text": ("exact", "span"),
    "images": ("exact", "l2", "ratio", "tiled", "shifted", "cropped"),
}
OTHER_FLAGS = {"sequences": ("covered",), "text": ("covered",), "images": ("partial",)}


class AuditConfig(BaseModel):
    """Every threshold of the audit, validated. Distances of images are RMS per pixel value in [0, 1]."""

    model_config = ConfigDict(extra="forbid")

    modality: Literal["auto", "sequences", "text", "images"] = "auto"
    ratio_threshold: float = Field(1 / 3, gt=0, le=1)
    hamming_threshold: float = Field(0.1, ge=0, le=1)
    span_tokens: int = Field(50, ge=1)
    coverage_threshold: float = Field(0.5, gt=0, le=1)
    l2_threshold: float = Field(0.05, ge=0)
    tiled_threshold: float = Field(0.08, ge=0)
    tile_grid: int = Field(4, ge=1)
    max_shift: int = Field(0, ge=0, le=16)
    max_crop: float = Field(0.0, ge=0, lt=1)  # largest fraction of each side a crop may remove
    crop_threshold: float = Field(0.08, ge=0)
    candidates: int = Field(16, ge=2)
    density_k: int = Field(5, ge=1)
    density_budget: float = Field(2e11, gt=0)  # multiply-adds allowed for the density (k-NN) pass
    batch_size: int = Field(1024, ge=1)
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


# ------------------------------------------------------------------------------------------ prototypicality


def _scored_subset(n: int, cost_per_item: float, budget: float, must: np.ndarray, seed: int) -> np.ndarray:
    """Indices of training items to score: all if the budget allows, else a random sample plus ``must``."""
    if n * cost_per_item <= budget:
        return np.arange(n)
    size = max(1, min(n, int(budget / max(cost_per_item, 1.0))))
    rng = np.random.default_rng(seed)
    sample = rng.choice(n, size=size, replace=False)
    return np.unique(np.concatenate([sample, must.astype(np.int64)]))


def _knn_mean_excluding(reference: np.ndarray, subset: np.ndarray, k: int) -> np.ndarray:
    """Mean L2 distance of reference[subset] to its k nearest other reference rows (faiss)."""
    k = min(k, reference.shape[0] - 1)
    if k < 1:
        return np.full(subset.size, np.nan)
    distances, indices = near.nearest_l2(reference, reference[subset], k=k + 1)
    is_self = indices == subset[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")
    distances = np.take_along_axis(distances, order, axis=1)[:, :k]
    return distances.mean(axis=1)


def image_density(
    train_flat: np.ndarray, k: int, budget: float, must: np.ndarray, seed: int = 0
) -> np.ndarray:
    """(P,) RMS-per-value mean distance to the k nearest training images (NaN where not scored).

    Images wider than 64 values are first projected on their top 64 principal components (fitted on up
    to 5,000 images), so the k-NN pass costs P x S x 64 multiply-adds; S (the items scored) is cut to fit
    ``budget``, keeping every item in ``must``.
    """
    n, width = train_flat.shape
    vectors = train_flat.astype(np.float32)
    if width > 64 and n > 64:
        rng = np.random.default_rng(seed)
        fit = vectors[rng.choice(n, size=min(n, 5000), replace=False)]
        mean = fit.mean(axis=0)
        _, _, vt = np.linalg.svd(fit - mean, full_matrices=False)
        vectors = np.ascontiguousarray((vectors - mean) @ vt[:64].T, dtype=np.float32)
    subset = _scored_subset(n, n * vectors.shape[1], budget, must, seed)
    out = np.full(n, np.nan)
    out[subset] = near.rms(_knn_mean_excluding(vectors, subset, k), width)
    return out


def sequence_density(
    train: Sequence[np.ndarray],
    matrix: np.ndarray | None,
    k: int,
    budget: float,
    must: np.ndarray,
    seed: int = 0,
) -> np.ndarray:
    """(P,) density of token sequences: mean distance to the k nearest other training sequences.

    Equal lengths: Hamming distance as a fraction of the length. Otherwise (and for text): Euclidean
    distance between L2-normalized bag-of-token vectors (token id modulo 2,048 buckets), in [0, sqrt 2].
    """
    n = len(train)
    out = np.full(n, np.nan)
    if n < 2:
        return out
    if matrix is not None:
        length = matrix.shape[1]
        subset = _scored_subset(n, n * length, budget, must, seed)
        kk = min(k, n - 1)
        distances, indices = nearest_hamming(matrix, matrix[subset], k=kk + 1)
        is_self = indices == subset[:, None]
        order = np.argsort(is_self, axis=1, kind="stable")
        distances = np.take_along_axis(distances, order, axis=1)[:, :kk]
        out[subset] = distances.mean(axis=1) / length
        return out
    buckets = 2048
    vectors = np.zeros((n, buckets), dtype=np.float32)
    for i, seq in enumerate(train):
        vectors[i] = np.bincount(np.asarray(seq) % buckets, minlength=buckets)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors /= np.where(norms > 0, norms, 1)
    subset = _scored_subset(n, n * buckets, budget, must, seed)
    out[subset] = _knn_mean_excluding(vectors, subset, k)
    return out


# ------------------------------------------------------------------------------------------------- summary


def _copies_per_train(matches: pd.DataFrame, n_train: int) -> np.ndarray:
    hits = matches.loc[matches["copied"] & (matches["train_index"] >= 0), "train_index"].to_numpy()
    return np.bincount(hits.astype(np.int64), minlength=n_train)


def summarize(
    modality: str,
    matches: pd.DataFrame,
    per_train: pd.DataFrame,
    config: AuditConfig,
    seconds: float,
    score_columns: Sequence[str] = ("density",),
) -> dict:
    """Counts per criterion and the typical-vs-rare statistics, ready for summary.json."""
    flags = [f for f in (*COPY_FLAGS[modality], *OTHER_FLAGS[modality]) if f in matches.columns]
    counts = {f: int(matches[f].sum()) for f in flags}
    copied = int(matches["copied"].sum())
    copies = per_train["copies"].to_numpy()
    scores = {}
    for column in score_columns:
        if column not in per_train.columns:
            continue
        result = spearman_test(per_train[column].to_numpy(), copies, seed=config.seed)
        low, high = ("typical (dense)", "rare (isolated)") if column == "density" else ("low", "high")
        result["sentence"] = describe_direction(result, column, low_means=low, high_means=high)
        copied_items = per_train[column][copies > 0]
        other_items = per_train[column][copies == 0]
        result["median_copied"] = float(np.nanmedian(copied_items)) if copied_items.notna().any() else None
        result["median_not_copied"] = float(np.nanmedian(other_items)) if other_items.notna().any() else None
        scores[column] = result
    verdict = (
        scores["density"]["sentence"] if "density" in scores else "No prototypicality score was computed."
    )
    return {
        "modality": modality,
        "n_train": int(len(per_train)),
        "n_generated": int(len(matches)),
        "n_copied_outputs": copied,
        "fraction_copied_outputs": copied / max(1, len(matches)),
        "n_train_items_copied": int((copies > 0).sum()),
        "counts": counts,
        "copy_flags": [f for f in COPY_FLAGS[modality] if f in matches.columns],
        "prototypicality": scores,
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


# -------------------------------------------------------------------------------------------------- images


def audit_images(
    train: np.ndarray,
    generated: np.ndarray | Iterable[tuple[int, np.ndarray]],
    config: AuditConfig,
    on_batch: Progress | None = None,
    density: bool = True,
) -> AuditResult:
    """Audit generated images against training images.

    Args:
        train: (P, H, W, C) float32 in [0, 1], held in memory.
        generated: (K, H, W, C) float32 in [0, 1], or an iterable of (start, batch) pairs (streamed).
        on_batch: called with the number of outputs done after each batch.
        density: compute the density prototypicality of the training items (skip for speed).
    """
    started = time.perf_counter()
    train = np.ascontiguousarray(train, dtype=np.float32)
    n_train = train.shape[0]
    if n_train < 2:
        raise ProtomemError("the training set needs at least 2 images (d1/d2 uses the second nearest)")
    side = min(train.shape[1], train.shape[2])
    if 2 * config.max_shift > side:
        raise ProtomemError(
            f"--max-shift {config.max_shift} is more than half the images' smaller side ({side} pixels): "
            f"use at most {side // 2}"
        )
    values = int(np.prod(train.shape[1:]))
    flat_train = train.reshape(n_train, -1)
    train_keys = image_bytes_keys(train)
    n_cand = min(config.candidates, n_train)
    parts = []
    for start, batch in _as_batches(generated, config.batch_size):
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.shape[1:] != train.shape[1:]:
            raise ProtomemError(f"generated images are {batch.shape[1:]}, training images {train.shape[1:]}")
        count = batch.shape[0]
        exact_index = exact_match_index(train_keys, image_bytes_keys(batch))
        distances, indices = near.nearest_l2(flat_train, batch.reshape(count, -1), k=n_cand)
        d1, d2 = near.rms(distances[:, 0], values), near.rms(distances[:, 1], values)
        tiled = np.full(count, np.inf)
        tiled_index = np.full(count, -1, dtype=np.int64)
        partial = np.zeros(count)
        for j in range(n_cand):
            cand = indices[:, j]
            score = near.tiled_l2(batch, train[cand], config.tile_grid)
            better = score < tiled
            tiled[better], tiled_index[better] = score[better], cand[better]
            partial = np.maximum(
                partial,
                near.tile_match_fraction(batch, train[cand], config.tiled_threshold, config.tile_grid),
            )
        part = {
            "output": np.arange(start, start + count),
            "nearest_train": indices[:, 0],
            "second_train": indices[:, 1],
            "d1": d1,
            "d2": d2,
            "ratio": near.distance_ratio(d1, d2),
            "tiled_l2": tiled,
            "tiled_train": tiled_index,
            "tile_fraction": partial,
            "exact_train": exact_index,
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
        parts.append(pd.DataFrame(part))
        if on_batch is not None:
            on_batch(count)
    if not parts:
        raise ProtomemError("no generated images")
    matches = pd.concat(parts, ignore_index=True)
    matches["exact"] = matches["exact_train"] >= 0
    matches["l2"] = matches["d1"] <= config.l2_threshold
    matches["ratio_flag"] = matches["ratio"] < config.ratio_threshold
    matches["tiled"] = matches["tiled_l2"] <= config.tiled_threshold
    matches["partial"] = matches["tile_fraction"] >= 0.5
    if config.max_shift > 0:
        matches["shifted"] = matches["shift_rms"] <= config.l2_threshold
    if config.max_crop > 0:
        matches["cropped"] = matches["crop_rms"] <= config.crop_threshold
    matches = matches.rename(columns={"ratio": "d1_over_d2"}).rename(columns={"ratio_flag": "ratio"})
    copy_flags = [f for f in COPY_FLAGS["images"] if f in matches.columns]
    matches["copied"] = matches[copy_flags].any(axis=1)
    # Which training item each output copies: exact > nearest L2 > best tile match > best shift > best crop.
    train_index = np.where(matches["copied"], matches["nearest_train"], -1)
    for flag, column, stronger in (
        ("cropped", "crop_train", ["exact", "l2", "ratio", "tiled", "shifted"]),
        ("shifted", "shift_train", ["exact", "l2", "ratio", "tiled"]),
        ("tiled", "tiled_train", ["exact", "l2", "ratio"]),
    ):
        if flag in matches.columns:
            only = matches[flag] & ~matches[[f for f in stronger if f in matches.columns]].any(axis=1)
            train_index = np.where(only, matches[column], train_index)
    train_index = np.where(matches["exact"], matches["exact_train"], train_index)
    matches["train_index"] = train_index.astype(np.int64)
    copies = _copies_per_train(matches, n_train)
    per_train = pd.DataFrame({"train_index": np.arange(n_train), "copies": copies})
    if density:
        per_train["density"] = image_density(
            flat_train, config.density_k, config.density_budget, np.flatnonzero(copies), config.seed
        )
    summary = summarize("images", matches, per_train, config, time.perf_counter() - started)
    summary["image_shape"] = list(train.shape[1:])
    return AuditResult("images", matches, per_train, summary)


# --------------------------------------------------------------------------------------- sequences and text


def _first_index_by_content(train: Sequence[np.ndarray]) -> dict[bytes, int]:
    """{token bytes: index of the first training sequence with exactly these tokens}."""
    first: dict[bytes, int] = {}
    for i, seq in enumerate(train):
        first.setdefault(np.asarray(seq, dtype=np.int64).tobytes(), i)
    return first


def _exact_ragged(first: dict[bytes, int], outputs: Sequence[np.ndarray]) -> np.ndarray:
    return np.array([first.get(np.asarray(o, dtype=np.int64).tobytes(), -1) for o in outputs], dtype=np.int64)


def _hamming_columns(matrix: np.ndarray, outputs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Exact match and the two nearest training sequences (Hamming) of the outputs as long as the rows of
    ``matrix`` (P, L); the other outputs get -1 indices and NaN distances."""
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
    columns["exact_train"][fits] = exact_match_index(matrix, same)
    distances, indices = nearest_hamming(matrix, same, k=min(2, n_train))
    d1 = distances[:, 0].astype(np.float64)
    d2 = distances[:, 1].astype(np.float64) if n_train > 1 else np.full(fits.size, np.inf)
    columns["nearest_train"][fits] = indices[:, 0]
    if n_train > 1:
        columns["second_train"][fits] = indices[:, 1]
    columns["d1"][fits], columns["d2"][fits] = d1, d2
    columns["d1_over_d2"][fits] = near.distance_ratio(d1, d2)
    return columns


def _token_audit(
    modality: str,
    train: Sequence[np.ndarray],
    batches: Iterable[tuple[int, Sequence[np.ndarray]]],
    config: AuditConfig,
    on_batch: Progress | None,
    density: bool,
    score_table: dict[str, np.ndarray] | None = None,
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
    parts = []
    for start, batch in batches:
        chunk = list(batch)
        count = len(chunk)
        spans = text.shared_spans(index, chunk)
        if matrix is not None:
            hamming = _hamming_columns(matrix, chunk)
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
        parts.append(pd.DataFrame(part))
        if on_batch is not None:
            on_batch(count)
    if not parts:
        raise ProtomemError("no generated outputs")
    matches = pd.concat(parts, ignore_index=True)
    matches["exact"] = matches["exact_train"] >= 0
    matches["span"] = matches["longest_span"] >= config.span_tokens
    matches["covered"] = matches["covered_fraction"] >= config.coverage_threshold
    train_index = np.where(matches["span"], matches["span_train"], -1)
    if matrix is not None:  # NaN distances (outputs of another length) compare False: no flag
        matches["hamming"] = matches["d1"] <= config.hamming_threshold * matrix.shape[1]
        matches["ratio"] = matches["d1_over_d2"] < config.ratio_threshold
        near_flag = matches["hamming"] | matches["ratio"]
        train_index = np.where(near_flag, matches["nearest_train"], train_index)
    copy_flags = [f for f in COPY_FLAGS[modality] if f in matches.columns]
    matches["copied"] = matches[copy_flags].any(axis=1)
    train_index = np.where(matches["exact"], matches["exact_train"], train_index)
    matches["train_index"] = train_index.astype(np.int64)
    copies = _copies_per_train(matches, n_train)
    per_train = pd.DataFrame(
        {"train_index": np.arange(n_train), "length": [len(s) for s in train], "copies": copies}
    )
    columns = ["density"]
    if density:
        per_train["density"] = sequence_density(
            train, matrix, config.density_k, config.density_budget, np.flatnonzero(copies), config.seed
        )
    for name, values in (score_table or {}).items():
        per_train[name] = values
        columns.append(name)
    summary = summarize(modality, matches, per_train, config, time.perf_counter() - started, columns)
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
) -> AuditResult:
    """Audit token sequences of any lengths (Hamming and d1/d2 when the training sequences share one length,
    for the outputs of that length).

    Args:
        train: (n_i,) int64 token arrays, held in memory.
        generated: a list of (m_j,) int64 token arrays, or an iterable of (start, list of arrays) pairs
            (streamed; see :func:`protomem.audit.inputs.batches`).
        on_batch: called with the number of outputs done after each batch.
        grammar: an RHM (protomem.grammar) — adds its block / rule frequency scores per training item.
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
    return _token_audit("sequences", train, batches, config, on_batch, density, table)


def audit_text(
    train_docs: Sequence[str],
    generated_docs: Sequence[str] | Iterable[tuple[int, Sequence[str]]],
    config: AuditConfig,
    on_batch: Progress | None = None,
    density: bool = True,
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

    result = _token_audit("text", train, encoded(), config, on_batch, density)
    result.extras["train_tokens"] = train
    if kept is not None:
        result.extras["output_tokens"] = kept
    return result
