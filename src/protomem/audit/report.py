"""The audit's self-contained report.html: counts per criterion, distance histograms, flagged pairs."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from markupsafe import Markup, escape

from protomem.audit.core import COPY_FLAGS, OTHER_FLAGS, AuditResult

CRITERIA = {
    "exact": ("identical item (hash of tokens / 8-bit pixels)", "—", "exact duplicates"),
    "hamming": (
        "nearest training sequence within a fraction of the length in differing tokens",
        "hamming_threshold",
        "Hamming nearest neighbour",
    ),
    "ratio": (
        "nearest / second-nearest training distance below the threshold",
        "ratio_threshold",
        "Yoon et al. 2023; Gu et al. 2023",
    ),
    "span": (
        "a run of at least k tokens shared verbatim with one training item",
        "span_tokens",
        "Carlini et al. 2021, 2023; Nasr et al. 2023",
    ),
    "covered": (
        "fraction of the output's tokens inside k-grams found in training (not a copy flag)",
        "coverage_threshold",
        "extractable memorization",
    ),
    "l2": (
        "RMS pixel difference to the nearest training image",
        "l2_threshold",
        "Euclidean nearest neighbour",
    ),
    "tiled": (
        "largest per-tile RMS difference (4x4 tiles) to a training image",
        "tiled_threshold",
        "Carlini et al. 2023 (tiled L2)",
    ),
    "shifted": (
        "RMS difference on the overlap after the best translation (up to max_shift pixels)",
        "shift_threshold",
        "translation-tolerant L2",
    ),
    "cropped": (
        "RMS difference between the output shrunk back and the best window of a training image",
        "crop_threshold",
        "crop-tolerant L2 (crops keeping >= 1 - max_crop of each side)",
    ),
    "partial": (
        "enough of the informative tiles match one training image (not a copy flag)",
        "partial_threshold",
        "region-wise partial copy",
    ),
    "flipped": (
        "the mirrored output passes l2, ratio or tiled",
        "l2_threshold",
        "mirror-tolerant L2",
    ),
    "normalized": (
        "RMS difference after standardizing each image (brightness and contrast removed)",
        "normalized_threshold",
        "brightness/contrast-tolerant L2",
    ),
    "similar": (
        "cosine similarity of the feature vectors to the nearest training item",
        "similarity_threshold",
        "SSCD convention 0.5 (Pizzi et al. 2022; Somepalli et al. 2023)",
    ),
    "feature_ratio": (
        "nearest / second-nearest distance between unit feature vectors below the threshold",
        "ratio_threshold",
        "Yoon et al. 2023, in feature space",
    ),
}


def image_data_uri(image: np.ndarray, display: int = 96) -> str:
    """(H, W, C) float in [0, 1] -> PNG data URI, upscaled (nearest neighbour) to about ``display`` px."""
    from PIL import Image

    array = np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)
    array = array[..., 0] if array.shape[-1] == 1 else array
    picture = Image.fromarray(array)
    scale = max(1, display // max(1, picture.width))
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def highlight(words: Sequence[str], start: int, length: int, context: int = 40) -> Markup:
    """Words joined by spaces, words[start:start+length] in <mark>, trimmed to ``context`` words around."""
    low = max(0, start - context)
    high = min(len(words), start + length + context)
    before = " ".join(words[low:start])
    inside = " ".join(words[start : start + length])
    after = " ".join(words[start + length : high])
    text = (
        ("… " if low > 0 else "")
        + str(escape(before))
        + (" " if before else "")
        + (f"<mark>{escape(inside)}</mark>" if length > 0 else "")
        + (" " if after else "")
        + str(escape(after))
        + (" …" if high < len(words) else "")
    )
    return Markup(text)


def _histogram(values: np.ndarray, threshold: float | None, xlabel: str, title: str):
    from protomem.htmlreport import figure_img, subplots

    fig, ax = subplots(figsize=(6.4, 3.0))
    counts, edges = np.histogram(values[np.isfinite(values)], bins=50)
    ax.stairs(counts, edges, fill=True, color="#2d6ca2")  # one artist, not 50 bars: the report draws faster
    if threshold is not None:
        ax.axvline(threshold, color="#b33", linestyle="--", label=f"threshold {threshold:.3g}")
        ax.legend()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("outputs")
    ax.set_title(title)
    return figure_img(fig, title)


def _density_figure(per_train) -> Markup | None:
    from protomem.htmlreport import figure_img, subplots

    if "density" not in per_train.columns or per_train["density"].notna().sum() < 3:
        return None
    scored = per_train[per_train["density"].notna()]  # the copied items and the random reference
    fig, ax = subplots(figsize=(6.4, 3.2))
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(scored))
    copied = scored["copies"] > 0
    ax.scatter(
        scored["density"][~copied], jitter[~copied], s=6, alpha=0.35, color="#888", label="random, not copied"
    )
    ax.scatter(
        scored["density"][copied],
        scored["copies"][copied] + jitter[copied],
        s=14,
        color="#b33",
        label="copied",
    )
    ax.set_xlabel("density score: mean distance to the k nearest training items (small = typical)")
    ax.set_ylabel("copies among the outputs")
    ax.legend()
    ax.set_title("Are the copied training items typical or rare?")
    return figure_img(fig, "copies against density prototypicality")


MAX_PAIRS = 24  # flagged pairs drawn in the report


def pairs_to_show(matches: pd.DataFrame, modality: str, max_pairs: int = MAX_PAIRS) -> pd.DataFrame:
    """The rows of ``matches`` whose pairs the report draws: flagged outputs (a copy flag or a partial /
    covered one), the most certain first (smallest d1/d2, else longest shared span), at most ``max_pairs``.

    The CLI reads exactly these outputs back from a streamed file, so keep this the report's only rule.
    """
    flagged = matches[matches["copied"] | matches[list(OTHER_FLAGS[modality])].any(axis=1)]
    sort_key = "d1_over_d2" if "d1_over_d2" in flagged.columns else "longest_span"
    return flagged.sort_values(sort_key, ascending=sort_key == "d1_over_d2").head(max_pairs)


def write_report(
    result: AuditResult,
    out_path: str | Path,
    *,
    inputs: dict[str, str],
    output_item: Callable[[int], object],
    train_item: Callable[[int], object],
    max_pairs: int = MAX_PAIRS,
) -> None:
    """Render report.html for an audit.

    Args:
        output_item, train_item: index -> the item to draw: an (H, W, C) image in [0, 1] for images, a
            list of words / tokens for text and sequences. ``output_item`` is only asked for the outputs
            of :func:`pairs_to_show` (same ``max_pairs``).
    """
    from protomem.htmlreport import render_page

    modality = result.modality
    matches, summary, config = result.matches, result.summary, result.summary["config"]
    rows = []
    for flag in (*COPY_FLAGS[modality], *OTHER_FLAGS[modality]):
        if flag not in matches.columns:
            continue
        meaning, knob, source = CRITERIA[flag]
        value = "—" if knob == "—" else f"{knob.replace('_', '-')} = {config[knob]:.4g}"
        rows.append(
            {
                "name": flag,
                "space": summary.get("spaces", {}).get(flag, ""),
                "meaning": meaning,
                "threshold": value,
                "source": source,
                "count": int(matches[flag].sum()),
            }
        )
    figures = []
    if "d1_over_d2" in matches.columns and np.isfinite(matches["d1_over_d2"]).any():
        figures.append(
            _histogram(
                matches["d1_over_d2"].to_numpy(),
                config["ratio_threshold"],
                "d1 / d2 (nearest over second-nearest training distance)",
                "Histogram of d1/d2",
            )
        )
    if modality == "images":
        figures.append(
            _histogram(
                matches["d1"].to_numpy(), config["l2_threshold"], "RMS distance to nearest", "Nearest L2"
            )
        )
    if "longest_span" in matches.columns:
        figures.append(
            _histogram(
                matches["covered_fraction"].to_numpy(),
                config["coverage_threshold"],
                "fraction of the output inside k-grams found in training",
                "Covered fraction",
            )
        )
    density_figure = _density_figure(result.per_train)
    pairs = []
    for _, row in pairs_to_show(matches, modality, max_pairs).iterrows():
        out_i = int(row["output"])
        if modality == "images":
            train_i = int(row["train_index"]) if row["train_index"] >= 0 else int(row["tiled_train"])
            pair = {
                "output": out_i,
                "train": train_i,
                "output_img": image_data_uri(output_item(out_i)),
                "train_img": image_data_uri(train_item(train_i)),
                "flags": [f for f in (*COPY_FLAGS[modality], "partial") if f in row.index and bool(row[f])],
                "numbers": (
                    f"RMS {row['d1']:.3f} · d1/d2 {row['d1_over_d2']:.3f} · tiled {row['tiled_l2']:.3f}"
                ),
            }
            if bool(row.get("cropped", False)):
                pair["numbers"] += (
                    f" · crop {int(row['crop_height'])}×{int(row['crop_width'])} at "
                    f"({int(row['crop_top'])}, {int(row['crop_left'])}), RMS {row['crop_rms']:.3f}"
                )
        else:
            train_i = int(row["train_index"]) if row["train_index"] >= 0 else int(row["span_train"])
            out_words = [str(w) for w in output_item(out_i)]
            train_words = [str(w) for w in train_item(train_i)] if train_i >= 0 else []
            length = int(row["longest_span"])
            if bool(row["exact"]):
                out_start, train_start, length = 0, 0, len(out_words)
            else:
                out_start, train_start = int(row["span_output_start"]), int(row["span_train_start"])
            numbers = f"longest shared span {length} tokens · covered {row['covered_fraction']:.0%}"
            if "d1" in row.index and np.isfinite(row["d1"]):  # NaN: an output of another length
                numbers += f" · Hamming {int(row['d1'])} · d1/d2 {row['d1_over_d2']:.3f}"
            pair = {
                "output": out_i,
                "train": train_i,
                "output_text": highlight(out_words, out_start, length),
                "train_text": highlight(train_words, train_start, length) if train_words else "",
                "flags": [
                    f
                    for f in (*COPY_FLAGS[modality], *OTHER_FLAGS[modality])
                    if f in row.index and bool(row[f])
                ],
                "numbers": numbers,
            }
        pairs.append(pair)
    import protomem

    render_page(
        "audit.html.j2",
        out_path,
        summary=summary,
        inputs=inputs,
        criteria=rows,
        figures=figures,
        density_figure=density_figure,
        pairs=pairs,
        n_flagged=int(matches["copied"].sum()),
        protomem_version=getattr(protomem, "__version__", ""),
    )
