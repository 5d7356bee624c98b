"""``protomem audit``: flag the outputs of any model that copy its training data."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer
from rich.console import Console

from protomem.audit import defaults
from protomem.errors import ProtomemError

console = Console(stderr=True)


class Modality(StrEnum):
    auto = "auto"
    sequences = "sequences"
    text = "text"
    images = "images"


def _three_numbers(text: str, flag: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise ProtomemError(f"{flag} takes three numbers separated by commas (one per channel), got {text!r}")
    return values


def set_threads(threads: int, torch_too: bool = False) -> None:
    """Limit faiss (OpenMP), the BLAS libraries loaded so far (numpy's, faiss's) and, if asked, torch to
    ``threads`` threads each."""
    import faiss
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(threads)
    threadpool_limits(limits=threads)
    if torch_too:
        import torch

        torch.set_num_threads(threads)


def audit(
    train: Path = typer.Option(..., "--train", help="Training data: file or folder (see docs/audit.md)."),
    generated: Path = typer.Option(..., "--generated", help="The model's outputs: file or folder."),
    out: Path = typer.Option(
        ..., "--out", help="Output directory (matches.parquet, summary.json, report.html)."
    ),
    modality: Modality = typer.Option(
        Modality.auto, "--modality", help="Force the modality (default: detect)."
    ),
    grammar: Path = typer.Option(None, "--grammar", help="grammar.json: add RHM block/rule prototypicality."),
    ratio: float = typer.Option(
        1 / 3, "--ratio-threshold", help="Flag d1/d2 below this (Yoon/Gu et al. 2023)."
    ),
    hamming: float = typer.Option(
        0.1,
        "--hamming-threshold",
        help="Sequences: flag <= this fraction of tokens differing from the nearest.",
    ),
    span_tokens: int = typer.Option(
        50, "--span-tokens", help="Text/sequences: shared span length k (tokens)."
    ),
    coverage: float = typer.Option(
        0.5,
        "--coverage-threshold",
        help="Text/sequences: flag outputs this much covered by training k-grams.",
    ),
    l2: float = typer.Option(
        defaults.L2_THRESHOLD, "--l2-threshold", help="Images: RMS pixel distance (0..1 scale) to flag."
    ),
    tiled: float = typer.Option(
        defaults.TILED_THRESHOLD, "--tiled-threshold", help="Images: tiled L2 (Carlini et al. 2023) to flag."
    ),
    tile_grid: int = typer.Option(4, "--tile-grid", help="Images: tiles per side for tiled L2."),
    partial_threshold: float = typer.Option(
        defaults.PARTIAL_THRESHOLD,
        "--partial-threshold",
        help="Images: per-tile RMS of a partial copy's tiles.",
    ),
    max_shift: int = typer.Option(
        0, "--max-shift", help="Images: also search translations up to this many pixels."
    ),
    shift_threshold: float = typer.Option(
        defaults.SHIFT_THRESHOLD,
        "--shift-threshold",
        help="Images: RMS on the overlap after the best translation to flag.",
    ),
    max_crop: float = typer.Option(
        0.0, "--max-crop", help="Images: also search crops removing up to this fraction of each side."
    ),
    crop_threshold: float = typer.Option(
        defaults.CROP_THRESHOLD,
        "--crop-threshold",
        help="Images: RMS of the output shrunk back to the crop to flag.",
    ),
    flips: bool = typer.Option(False, "--flips", help="Images: also search the mirrored outputs."),
    normalized: bool = typer.Option(
        False, "--normalized", help="Images: also compare brightness/contrast-standardized images."
    ),
    normalized_threshold: float = typer.Option(
        defaults.NORMALIZED_THRESHOLD,
        "--normalized-threshold",
        help="Images: RMS between standardized images (pixel std units) to flag.",
    ),
    features_train: Path = typer.Option(
        None, "--features-train", help="Feature vectors of the training items (.npy, or .npz:key)."
    ),
    features_generated: Path = typer.Option(
        None, "--features-generated", help="Feature vectors of the outputs (.npy, or .npz:key)."
    ),
    embedder: Path = typer.Option(
        None, "--embedder", help="Images: a TorchScript embedder (e.g. SSCD) to compute the feature vectors."
    ),
    embedder_size: int = typer.Option(
        None, "--embedder-size", help="Resize images to this square size for the embedder."
    ),
    embedder_mean: str = typer.Option(
        "0,0,0", "--embedder-mean", help="Per-channel mean to subtract (SSCD: 0.485,0.456,0.406)."
    ),
    embedder_std: str = typer.Option(
        "1,1,1", "--embedder-std", help="Per-channel std to divide by (SSCD: 0.229,0.224,0.225)."
    ),
    similarity: float = typer.Option(
        0.5, "--similarity-threshold", help="Features: flag cosine similarity >= this (SSCD convention 0.5)."
    ),
    prototypicality: bool = typer.Option(
        True,
        "--prototypicality/--no-prototypicality",
        help="Whether the copied items are typical or rare (off: only the copies).",
    ),
    density_k: int = typer.Option(5, "--density-k", help="Neighbours for the density prototypicality score."),
    batch_size: int = typer.Option(1024, "--batch-size", help="Outputs per batch (bounds memory)."),
    max_image_pixels: int = typer.Option(
        None,
        "--max-image-pixels",
        help="Images: refuse images declaring more pixels [default: $PROTOMEM_MAX_IMAGE_PIXELS or 67108864].",
    ),
    resize: bool = typer.Option(False, "--resize", help="Images: resize every image to the training size."),
    lowercase: bool = typer.Option(False, "--lowercase", help="Text: compare lower-cased words."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    threads: int = typer.Option(
        None, "--threads", min=1, help="Threads for faiss, BLAS and torch (default: all cores)."
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Audit a model's outputs (token sequences, text or images) for copies of its training data."""
    from protomem.audit.core import AuditConfig
    from protomem.audit.run import run_audit
    from protomem.outputs import check_output_dir

    check_output_dir(out, overwrite=overwrite, inputs=[train, generated, grammar])
    if threads is not None:
        set_threads(threads, torch_too=embedder is not None)
    config = AuditConfig.make(
        modality=modality.value,
        ratio_threshold=ratio,
        hamming_threshold=hamming,
        span_tokens=span_tokens,
        coverage_threshold=coverage,
        l2_threshold=l2,
        tiled_threshold=tiled,
        tile_grid=tile_grid,
        partial_threshold=partial_threshold,
        max_shift=max_shift,
        shift_threshold=shift_threshold,
        max_crop=max_crop,
        crop_threshold=crop_threshold,
        flips=flips,
        normalized=normalized,
        normalized_threshold=normalized_threshold,
        similarity_threshold=similarity,
        prototypicality=prototypicality,
        density_k=density_k,
        batch_size=batch_size,
        max_image_pixels=max_image_pixels,
        resize=resize,
        lowercase=lowercase,
    )
    model = None
    if embedder is not None:
        from protomem.audit.features import Embedder

        model = Embedder(
            embedder,
            size=embedder_size,
            mean=_three_numbers(embedder_mean, "--embedder-mean"),
            std=_three_numbers(embedder_std, "--embedder-std"),
        )
    out_dir, result = run_audit(
        train,
        generated,
        out,
        config,
        grammar_path=grammar,
        features_train=features_train,
        features_generated=features_generated,
        embedder=model,
        overwrite=overwrite,
        progress=not quiet,
    )
    s = result.summary
    console.print(
        f"{s['modality']}: {s['n_copied_outputs']} of {s['n_generated']} outputs flagged as copies of "
        f"{s['n_train_items_copied']} training items; "
        + ", ".join(f"{k} {v}" for k, v in s["counts"].items())
    )
    console.print(s["verdict"])
    console.print(f"report: {out_dir / 'report.html'}")


def register(app: typer.Typer) -> None:
    """Add ``audit`` as a top-level command of the protomem app."""
    app.command("audit")(audit)
