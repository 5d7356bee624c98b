"""Calibration of the image criteria: planted copies against fresh images of several kinds.

Four families of images, none downloaded: ``digits8`` (scikit-learn's bundled 8x8 digits), ``digits32``
(the same digits enlarged 4x, bilinear: smooth images where a crop enlarged back looks like any other
digit), ``textures32`` (procedural grey textures: smooth random fields, noisy gratings, soft
checkerboards) and ``colour32`` (RGB scenes: a two-colour gradient with 3-6 random discs, boxes and
ellipses). For each family a training set and *fresh* images (never in it) are drawn, and copies of
training images are planted with one transformation each (:data:`PLANTS`).

:func:`run_family` audits fresh and planted images with every criterion switched on and returns one row
per output with its raw scores; :func:`flag_rates` turns scores into flags at given thresholds, so
thresholds can be swept without auditing again. ``benchmarks/calibrate_audit.py`` runs it and chose the
defaults in :mod:`protomem.audit.defaults` (docs/audit.md, "Calibration").
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from protomem.audit import defaults
from protomem.memorization import near

FAMILIES = ("digits8", "digits32", "textures32", "colour32")
SIZES = {  # (training images, fresh images) of each family in the calibration
    "digits8": (800, 497),
    "digits32": (800, 497),
    "textures32": (1000, 1000),
    "colour32": (1000, 1000),
}
VALIDATION_SEED = 1  # thresholds are chosen on seed 0; the published rates are those of seed 1
PLANTS = ("noise", "shift", "crop", "flip", "brightness", "partial")
# The criterion meant to catch each planted transformation.
INTENDED = {
    "noise": "l2",
    "shift": "shifted",
    "crop": "cropped",
    "flip": "flipped",
    "brightness": "normalized",
    "partial": "partial",
}
MAX_CROP = 0.25  # the crop search's reach in the calibration (crops remove 5-20% of each side)


# ----------------------------------------------------------------------------------------------- families


def _digits(size: int) -> np.ndarray:
    """All 1,797 scikit-learn digits as (N, size, size, 1) float32 in [0, 1] (bilinear enlargement)."""
    from scipy import ndimage
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32) / 16.0
    if size != 8:
        images = ndimage.zoom(images, (1, size / 8, size / 8), order=1)
    return np.clip(images, 0, 1)[..., None].astype(np.float32)


def textures(count: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """(count, size, size, 1) procedural grey textures in [0, 1]: a smooth random field, a sum of two
    noisy gratings, or a soft checkerboard, at a random mean grey and contrast."""
    from scipy import ndimage

    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    out = np.empty((count, size, size, 1), dtype=np.float32)
    for i in range(count):
        kind = rng.integers(0, 3)
        if kind == 0:
            field = ndimage.gaussian_filter(rng.standard_normal((size, size)), rng.uniform(1, 4), mode="wrap")
        elif kind == 1:
            field = np.zeros((size, size))
            for _ in range(2):
                f, angle, phase = rng.uniform(1.5, 6), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
                field += rng.uniform(0.5, 1) * np.sin(
                    2 * np.pi * f * (x * np.cos(angle) + y * np.sin(angle)) + phase
                )
            field += 0.3 * rng.standard_normal((size, size))
        else:
            f1, f2, p1, p2 = rng.uniform(1, 4), rng.uniform(1, 4), rng.uniform(0, 6.3), rng.uniform(0, 6.3)
            field = np.tanh(3 * np.sin(2 * np.pi * f1 * x + p1) * np.sin(2 * np.pi * f2 * y + p2))
            field = ndimage.gaussian_filter(field, 0.7) + 0.1 * rng.standard_normal((size, size))
        field = (field - field.mean()) / max(field.std(), 1e-6)
        out[i, ..., 0] = np.clip(rng.uniform(0.35, 0.65) + rng.uniform(0.08, 0.2) * field, 0, 1)
    return out


def colour_scenes(count: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """(count, size, size, 3) RGB scenes in [0, 1]: a gradient between two random colours in a random
    direction, 3-6 random discs / boxes / ellipses in random colours, 1% pixel noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    out = np.empty((count, size, size, 3), dtype=np.float32)
    for i in range(count):
        start, end = rng.uniform(0, 1, size=(2, 3))
        angle = rng.uniform(0, 2 * np.pi)
        ramp = x * np.cos(angle) + y * np.sin(angle)
        ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-6)
        image = start + (end - start) * ramp[..., None]
        for _ in range(rng.integers(3, 7)):
            cx, cy = rng.uniform(0, size, 2)
            rx, ry = rng.uniform(3, 9, 2)
            kind = rng.integers(0, 3)
            if kind == 0:
                mask = (x - cx) ** 2 + (y - cy) ** 2 < rx**2
            elif kind == 1:
                mask = (np.abs(x - cx) < rx) & (np.abs(y - cy) < ry)
            else:
                turn = rng.uniform(0, np.pi)
                u = (x - cx) * np.cos(turn) + (y - cy) * np.sin(turn)
                v = -(x - cx) * np.sin(turn) + (y - cy) * np.cos(turn)
                mask = (u / rx) ** 2 + (v / ry) ** 2 < 1
            image[mask] = rng.uniform(0, 1, 3)
        out[i] = np.clip(image + 0.01 * rng.standard_normal(image.shape), 0, 1)
    return out


def family(name: str, n_train: int, n_fresh: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, fresh, spare): images of one family, float32 in [0, 1]; ``spare`` (as many as ``n_fresh``,
    disjoint from both) fills the rest of partial copies. Digits: a random split of the 1,797 digits
    (n_train + 2 n_fresh <= 1,797)."""
    rng = np.random.default_rng(seed)
    if name.startswith("digits"):
        pool = _digits(int(name.removeprefix("digits")))
        order = rng.permutation(len(pool))
        if n_train + 2 * n_fresh > len(pool):
            raise ValueError(f"digits: {n_train} + 2 x {n_fresh} > {len(pool)}")
        picks = np.split(order[: n_train + 2 * n_fresh], [n_train, n_train + n_fresh])
        return tuple(pool[p] for p in picks)
    make: Callable[[int, np.random.Generator], np.ndarray] = {
        "textures32": textures,
        "colour32": colour_scenes,
    }[name]
    images = make(n_train + 2 * n_fresh, rng)
    return images[:n_train], images[n_train : n_train + n_fresh], images[n_train + n_fresh :]


# --------------------------------------------------------------------------------------------- planting


def _enlarge(window: np.ndarray, height: int, width: int) -> np.ndarray:
    from scipy import ndimage

    zoom = (height / window.shape[0], width / window.shape[1], 1)
    return np.clip(ndimage.zoom(window, zoom, order=1), 0, 1)[:height, :width]


def plant(kind: str, sources: np.ndarray, spare: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Copies of ``sources`` (N, H, W, C) made with one transformation:

    noise: Gaussian pixel noise of RMS 0.01-0.06 (uniform); shift: translated by 1-2 pixels (edges
    replicated); crop: a window keeping 80-95% of each side, enlarged back (bilinear); flip: mirrored
    left-right; brightness: contrast x0.7-0.9 or x1.1-1.3 about the mean, brightness +-0.1; partial: the
    top or left half of the source, the rest from a ``spare`` image. Every kind but noise then gets 1%
    Gaussian pixel noise (a model's copies are not perfect).
    """
    count, height, width, _ = sources.shape
    out = np.empty_like(sources)
    for i, image in enumerate(sources):
        if kind == "noise":
            out[i] = image + rng.normal(0, rng.uniform(0.01, 0.06), image.shape)
        elif kind == "shift":
            step = int(rng.integers(1, 3))
            dy, dx = [(step, 0), (0, step), (-step, 0), (0, -step), (step, step)][rng.integers(0, 5)]
            out[i] = near.shift_image(image[None], dy, dx)[0]
        elif kind == "crop":
            keep = rng.uniform(0.8, 0.95)
            h = max(1, min(height - 1, round(keep * height)))
            w = max(1, round(h * width / height))
            top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
            out[i] = _enlarge(image[top : top + h, left : left + w], height, width)
        elif kind == "flip":
            out[i] = image[:, ::-1]
        elif kind == "brightness":
            factor = rng.uniform(0.7, 0.9) if rng.random() < 0.5 else rng.uniform(1.1, 1.3)
            mean = image.mean()
            out[i] = (image - mean) * factor + mean + rng.uniform(-0.1, 0.1)
        elif kind == "partial":
            other = spare[rng.integers(0, len(spare))].copy()
            if rng.random() < 0.5:
                other[: height // 2] = image[: height // 2]
            else:
                other[:, : width // 2] = image[:, : width // 2]
            out[i] = other
        else:
            raise ValueError(f"unknown plant {kind!r}")
        if kind != "noise":
            out[i] += rng.normal(0, 0.01, image.shape)
    return np.clip(out, 0, 1).astype(np.float32)


# -------------------------------------------------------------------------------------------- measuring


PARTIAL_THRESHOLDS = (0.01, 0.02, 0.03, 0.05, 0.08)


def partial_fractions(
    train: np.ndarray, outputs: np.ndarray, candidates: int = 16, grid: int = 4
) -> np.ndarray:
    """(K, len(PARTIAL_THRESHOLDS)) the partial criterion's statistic at each per-tile threshold: the
    largest fraction of informative tiles matching one of the ``candidates`` nearest training images."""
    flat = train.reshape(len(train), -1)
    _, indices = near.nearest_l2(flat, outputs.reshape(len(outputs), -1), k=min(candidates, len(train)))
    spread = near.tile_spread(train, grid)
    out = np.zeros((len(outputs), len(PARTIAL_THRESHOLDS)))
    for j in range(indices.shape[1]):
        tiles = near.tile_rms(outputs, train[indices[:, j]], grid)
        informative = spread[indices[:, j]] > 0.02
        for t, threshold in enumerate(PARTIAL_THRESHOLDS):
            out[:, t] = np.maximum(out[:, t], near.matched_tile_fraction(tiles, informative, threshold))
    return out


def run_family(
    name: str, n_train: int, n_fresh: int, n_plant: int, seed: int, max_shift: int | None = None
) -> pd.DataFrame:
    """Audit ``n_fresh`` fresh images and ``n_plant`` planted copies of each kind against ``n_train``
    training images of family ``name``, every criterion on; one row per output: ``family``, ``kind``
    ("fresh" or a plant), ``source`` (the training image copied, -1 for fresh) and the raw scores."""
    from protomem.audit.core import AuditConfig, audit_images

    train, fresh, spare = family(name, n_train, n_fresh, seed)
    rng = np.random.default_rng(seed + 1000)
    outputs, kinds, sources = [fresh], ["fresh"] * len(fresh), [np.full(len(fresh), -1)]
    for kind in PLANTS:
        picked = rng.choice(n_train, size=n_plant, replace=False)
        outputs.append(plant(kind, train[picked], spare, rng))
        kinds += [kind] * n_plant
        sources.append(picked)
    generated = np.concatenate(outputs)
    height = train.shape[1]
    config = AuditConfig(
        max_shift=max_shift if max_shift is not None else min(2, height // 4),
        max_crop=MAX_CROP,
        flips=True,
        normalized=True,
        prototypicality=False,
    )
    m = audit_images(train, generated, config).matches
    table = m.drop(columns=[c for c in m.columns if m[c].dtype == bool]).copy()
    table.insert(0, "family", name)
    table.insert(1, "kind", kinds)
    table.insert(2, "source", np.concatenate(sources))
    fractions = partial_fractions(train, generated)
    for t, threshold in enumerate(PARTIAL_THRESHOLDS):
        table[f"partial_at_{threshold:g}"] = fractions[:, t]
    return table


def flag_rates(
    table: pd.DataFrame,
    l2: float = defaults.L2_THRESHOLD,
    ratio: float = 1 / 3,
    tiled: float = defaults.TILED_THRESHOLD,
    shift: float = defaults.SHIFT_THRESHOLD,
    crop: float = defaults.CROP_THRESHOLD,
    normalized: float = defaults.NORMALIZED_THRESHOLD,
    partial: float = defaults.PARTIAL_THRESHOLD,
    partial_fraction: float = defaults.PARTIAL_FRACTION,
) -> pd.DataFrame:
    """Every criterion's flag at the given thresholds, from the raw scores of :func:`run_family` rows
    (the same rules as :func:`protomem.audit.core.audit_images`); one bool column per criterion."""
    flags = pd.DataFrame(index=table.index)
    flags["exact"] = table["exact_train"] >= 0
    flags["l2"] = table["d1"] <= l2
    flags["ratio"] = table["d1_over_d2"] < ratio
    flags["tiled"] = table["tiled_l2"] <= tiled
    flags["shifted"] = table["shift_rms"] <= shift
    flags["cropped"] = table["crop_rms"] <= crop
    flags["flipped"] = (
        (table["flip_d1"] <= l2) | (table["flip_d1_over_d2"] < ratio) | (table["flip_tiled_l2"] <= tiled)
    )
    flags["normalized"] = (table["normalized_rms"] <= normalized) & (table["pixel_std"] > 0.02)
    column = f"partial_at_{partial:g}"
    if column not in table.columns:
        raise ValueError(f"partial threshold {partial} not among {PARTIAL_THRESHOLDS}")
    flags["partial"] = table[column] >= partial_fraction
    flags["copied (defaults)"] = flags[["exact", "l2", "ratio", "tiled"]].any(axis=1)
    flags["copied (all)"] = flags.drop(columns=["partial", "copied (defaults)"]).any(axis=1)
    return flags


def rate_table(table: pd.DataFrame, flags: pd.DataFrame) -> pd.DataFrame:
    """Per family and kind, the fraction of outputs each criterion flags (fresh: false-positive rates)."""
    joined = pd.concat([table[["family", "kind"]], flags], axis=1)
    return joined.groupby(["family", "kind"], sort=False).mean()
