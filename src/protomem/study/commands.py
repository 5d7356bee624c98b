"""``protomem study`` (the whole experiment) and ``protomem report RUN_DIR`` (rebuild its report)."""

from __future__ import annotations

import time
from enum import StrEnum
from pathlib import Path

import typer
from rich.console import Console

from protomem.diffusion.device import DEFAULT_GPU_TFLOPS, DEVICE_CHOICES
from protomem.errors import ProtomemError

console = Console(stderr=True)


class Preset(StrEnum):
    quick = "quick"
    default = "default"
    decisive = "decisive"
    zipf_levels = "zipf-levels"
    copy_first = "copy-first"
    generalize_first = "generalize-first"
    generalize_first_replication = "generalize-first-replication"
    paper = "paper"


class Modality(StrEnum):
    strings = "strings"
    images = "images"


def study(
    preset: Preset = typer.Option(
        Preset.default,
        "--preset",
        help="quick (<1 min), default (<=5 min, the paper's regime), decisive (the pre-specified test), "
        "zipf-levels (claim b), copy-first (the earlier default), generalize-first and its -replication, "
        "paper (hours).",
    ),
    out: Path = typer.Option(None, "--out", help="Run directory (default: runs/study-<UTC timestamp>)."),
    resume: Path = typer.Option(None, "--resume", help="Continue the killed study in this run directory."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing, non-empty --out directory."
    ),
    threads: int = typer.Option(
        None,
        "--threads",
        min=1,
        help="Torch threads per condition (default 1, conditions in parallel; --jobs 1: probe).",
    ),
    jobs: int = typer.Option(
        None,
        "--jobs",
        min=1,
        help="Conditions run at once (default: cores // threads; 1 = one after another).",
    ),
    modality: Modality = typer.Option(Modality.strings, "--modality", help="strings (RHM) or images."),
    device: str = typer.Option(
        None, "--device", help=f"{DEVICE_CHOICES} for every condition [default: auto, CUDA if present]."
    ),
    plan: bool = typer.Option(
        False, "--plan", help="Print the conditions, their cost and an estimated wall time; run nothing."
    ),
    gpu_tflops: float = typer.Option(
        DEFAULT_GPU_TFLOPS, "--gpu-tflops", min=0.001, help="--plan: sustained GPU throughput assumed."
    ),
) -> None:
    """Run the memorization study end to end: train, detect copies, relate them to prototypicality, report."""
    if plan:
        if modality == Modality.images:
            raise ProtomemError("--plan estimates the string study; it does not cover --modality images")
        _print_plan(preset.value, threads, jobs, device, gpu_tflops)
        return
    if resume is not None and out is not None and Path(out) != Path(resume):
        raise ProtomemError("give either --out or --resume, not both")
    run_dir = Path(resume) if resume is not None else out
    if run_dir is None:
        run_dir = Path("runs") / time.strftime("study-%Y%m%d-%H%M%S", time.gmtime())
    from protomem.outputs import check_output_dir

    check_output_dir(run_dir, overwrite=overwrite and resume is None)
    if modality == Modality.images:
        from protomem.study.images import run_image_study

        path = run_image_study(
            run_dir,
            preset=preset.value,
            overwrite=overwrite,
            resume=resume is not None,
            progress=True,
            threads=threads,
            device=device,
        )
        console.print(f"report: {Path(path) / 'report.html' if Path(path).is_dir() else path}")
        typer.echo(str(Path(path) / "report.html" if Path(path).is_dir() else path))
        return
    from protomem.study.runner import run_study, summary_paragraph

    path = run_study(
        run_dir,
        preset=preset.value,
        resume=resume is not None,
        overwrite=overwrite,
        progress=True,
        threads=threads,
        jobs=jobs,
        device=device,
    )
    console.print(summary_paragraph(path), highlight=False)
    typer.echo(str(path / "report.html"))


def _print_plan(
    preset: str, threads: int | None, jobs: int | None, device: str | None, tflops: float
) -> None:
    """``study --plan``: time the preset's models here and print the estimate (stdout)."""
    from rich.console import Console as StdoutConsole

    from protomem.diffusion.device import resolve_device
    from protomem.study.plan import plan_conditions, plan_summary, plan_table
    from protomem.study.presets import get_preset
    from protomem.study.runner import parallel_settings, with_device

    if device is not None:
        resolve_device(device)
    chosen = get_preset(preset)
    conditions = with_device(chosen.conditions, device)
    threads, jobs = parallel_settings(len(conditions), threads, jobs)
    estimate = plan_conditions(conditions, jobs=jobs, threads=threads or 1, on_measure=console.print)
    out = StdoutConsole()
    if not out.is_terminal:
        out = StdoutConsole(width=250)
    title = f"study plan: preset {preset} ({chosen.description}), {len(conditions)} condition(s)"
    out.print(plan_table(estimate, title))
    for line in plan_summary(estimate, tflops):
        out.print(line, highlight=False)


def report(
    run_dir: Path = typer.Argument(..., help="A study run directory or one condition's directory."),
) -> None:
    """Rebuild report.html of a study run from its tables alone."""
    from protomem.study.report import render_report

    path = render_report(run_dir)
    typer.echo(str(path))


def register(app: typer.Typer) -> None:
    """Add ``study`` and ``report`` as top-level commands of the protomem app."""
    app.command("study")(study)
    app.command("report")(report)
