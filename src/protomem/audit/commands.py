"""``protomem audit``: flag the outputs of any model that copy its training data."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer
from rich.console import Console

console = Console(stderr=True)


class Modality(StrEnum):
    auto = "auto"
    sequences = "sequences"
    text = "text"
    images = "images"


def audit(
    train: Path = typer.Option(..., "--train", help="Training data: file or folder (see README)."),
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
    l2: float = typer.Option(0.05, "--l2-threshold", help="Images: RMS pixel distance (0..1 scale) to flag."),
    tiled: float = typer.Option(
        0.08, "--tiled-threshold", help="Images: tiled L2 (Carlini et al. 2023) to flag."
    ),
    tile_grid: int = typer.Option(4, "--tile-grid", help="Images: tiles per side for tiled L2."),
    max_shift: int = typer.Option(
        0, "--max-shift", help="Images: also search translations up to this many pixels."
    ),
    max_crop: float = typer.Option(
        0.0, "--max-crop", help="Images: also search crops removing up to this fraction of each side."
    ),
    crop_threshold: float = typer.Option(
        0.08, "--crop-threshold", help="Images: RMS of the output shrunk back to the crop to flag."
    ),
    density_k: int = typer.Option(5, "--density-k", help="Neighbours for the density prototypicality score."),
    batch_size: int = typer.Option(1024, "--batch-size", help="Outputs per batch (bounds memory)."),
    resize: bool = typer.Option(False, "--resize", help="Images: resize every image to the training size."),
    lowercase: bool = typer.Option(False, "--lowercase", help="Text: compare lower-cased words."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    threads: int = typer.Option(None, "--threads", help="faiss / BLAS threads (default: all cores)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Audit a model's outputs (token sequences, text or images) for copies of its training data."""
    from protomem.audit.core import AuditConfig
    from protomem.audit.run import run_audit
    from protomem.outputs import check_output_dir

    check_output_dir(out, overwrite=overwrite, inputs=[train, generated, grammar])
    if threads is not None:
        import faiss

        faiss.omp_set_num_threads(threads)
    config = AuditConfig.make(
        modality=modality.value,
        ratio_threshold=ratio,
        hamming_threshold=hamming,
        span_tokens=span_tokens,
        coverage_threshold=coverage,
        l2_threshold=l2,
        tiled_threshold=tiled,
        tile_grid=tile_grid,
        max_shift=max_shift,
        max_crop=max_crop,
        crop_threshold=crop_threshold,
        density_k=density_k,
        batch_size=batch_size,
        resize=resize,
        lowercase=lowercase,
    )
    out_dir, result = run_audit(
        train, generated, out, config, grammar_path=grammar, overwrite=overwrite, progress=not quiet
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
