"""``protomem sweep ...``: run a sweep on Ray, query its database, write its report.

``protomem sweep SWEEP.yaml`` is short for ``protomem sweep run SWEEP.yaml``: a first argument that is
not a subcommand but a file (or ends in .yaml / .yml) runs it.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console
from typer.core import TyperGroup

from protomem.diffusion.device import DEFAULT_GPU_TFLOPS
from protomem.errors import ProtomemError
from protomem.outputs import check_output_dir

console = Console(stderr=True, soft_wrap=True)  # summary lines stay whole in logs


class SweepGroup(TyperGroup):
    """A group where ``sweep FILE ...`` means ``sweep run FILE ...``."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            first = args[0]
            if Path(first).is_file() or first.endswith((".yaml", ".yml")):
                args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=SweepGroup,
    no_args_is_help=True,
    help=(
        "Parameter sweeps on Ray: every point of a grid is a study run.\n\n"
        "protomem sweep SWEEP.yaml [--address ADDR] [--retries N] [--out DIR]   (same as `sweep run`)\n\n"
        'protomem sweep query SWEEP_DIR "SELECT ..."\n\n'
        "protomem sweep report SWEEP_DIR"
    ),
)

MEM_HELP = "τ_mem threshold: fraction of samples that are exact training copies (default 0.1)."
GEN_HELP = "τ_gen threshold: fraction of samples that are novel valid strings (default 0.1)."


@app.command("run")
def run_command(
    sweep_file: Path = typer.Argument(..., help="Sweep file (YAML): base condition plus grid and/or points."),
    address: str = typer.Option(
        None,
        "--address",
        help="Join this Ray cluster (e.g. ray://head:10001) instead of starting a local Ray. "
        "Every node needs protomem installed and must see --out (shared filesystem).",
    ),
    retries: int = typer.Option(
        None,
        "--retries",
        help="Extra attempts per failed or killed point (overrides the sweep file's retries).",
        show_default="2",
    ),
    out: Path = typer.Option(
        None, "--out", help="Sweep directory (made absolute).", show_default="runs/sweeps/<sweep name>"
    ),
    cpus: int = typer.Option(
        None, "--cpus", help="CPUs of the local Ray, one point per CPU.", show_default="all cores"
    ),
    mem_threshold: float = typer.Option(None, "--mem-threshold", help=MEM_HELP),
    gen_threshold: float = typer.Option(None, "--gen-threshold", help=GEN_HELP),
    report: bool = typer.Option(True, "--report/--no-report", help="Write SWEEP_DIR/report.html at the end."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Validate every point and list them with their state; run nothing."
    ),
    device: str = typer.Option(
        None, "--device", help="Every point's device: auto, cpu, cuda or mps [default: the sweep file's]."
    ),
    plan: bool = typer.Option(
        False, "--plan", help="List the points, their cost and an estimated wall time here; run nothing."
    ),
    gpu_tflops: float = typer.Option(
        DEFAULT_GPU_TFLOPS, "--gpu-tflops", min=0.001, help="--plan: sustained GPU throughput assumed."
    ),
) -> None:
    """Run every point of SWEEP_FILE (re-running skips finished points and resumes interrupted ones)."""
    from protomem.sweep.runner import require_ray, run_sweep
    from protomem.sweep.spec import check_sweep_device, load_spec

    spec = load_spec(sweep_file)
    if device is not None:
        try:
            check_sweep_device(device)
        except ValueError as exc:
            raise ProtomemError(f"--device: {exc}") from None
        spec = spec.model_copy(update={"device": device})
    out_dir = Path(os.path.abspath(out if out is not None else Path("runs") / "sweeps" / str(spec.name)))
    check_output_dir(out_dir)
    check_thresholds(mem_threshold, gen_threshold)
    from protomem.sweep.conditions import point_configs
    from protomem.sweep.spec import expand_points

    try:  # every point is validated before anything runs; errors name the sweep file
        configs = point_configs(spec, expand_points(spec), path=sweep_file)
    except ProtomemError as exc:
        if exc.path is not None:
            raise
        raise ProtomemError(exc.message, path=sweep_file, where=exc.where) from None
    if dry_run or plan:
        _print_plan(spec, out_dir, configs)
        if plan:
            _print_estimate(spec, out_dir, cpus if address is None else None, gpu_tflops)
        return
    require_ray()  # fail before any work when the extra is missing
    result = run_sweep(
        spec,
        out_dir,
        configs=configs,
        address=address,
        num_cpus=cpus,
        retries=retries,
        progress=progress,
        spec_text=sweep_file.read_text(encoding="utf-8"),
        mem_threshold=mem_threshold,
        gen_threshold=gen_threshold,
    )
    console.print(
        f"sweep {spec.name}: {len(result.points)} points, {len(result.skipped)} already finished, "
        f"{len(result.completed)} finished now, {len(result.failed)} failed, {result.seconds:.0f} s"
    )
    console.print(f"database: {result.layout.database} (and *.parquet beside it)")
    if report and (result.completed or result.skipped):
        from protomem.sweep.report import build_report

        path = build_report(out_dir, mem_threshold=mem_threshold, gen_threshold=gen_threshold)
        console.print(f"report: {path}")
    from protomem.sweep.layout import is_complete

    unfinished = [p.name for p in result.points if not is_complete(result.layout.run_dir(p.name))]
    if unfinished:
        console.print(
            f"[red]{len(unfinished)} of {len(result.points)} point(s) not complete[/red] "
            f"(errors in {out_dir}/attempts/ and the points table); run the same command again to retry",
            highlight=False,
        )
        raise typer.Exit(1)


def check_thresholds(mem_threshold: float | None, gen_threshold: float | None) -> None:
    """--mem-threshold / --gen-threshold: fractions in (0, 1] (NaN and infinity refused)."""
    for name, value in (("--mem-threshold", mem_threshold), ("--gen-threshold", gen_threshold)):
        if value is not None and not 0 < value <= 1:
            raise ProtomemError(f"{name} must lie in (0, 1], got {value}")


def _print_plan(spec, out_dir: Path, configs: dict) -> None:
    """The points of ``spec``, their run directories and whether they are finished, started or new."""
    from rich.console import Console as StdoutConsole
    from rich.table import Table

    from protomem.sweep.conditions import config_to_dict
    from protomem.sweep.layout import SweepLayout, has_started, is_complete
    from protomem.sweep.runner import check_existing_configs
    from protomem.sweep.spec import expand_points

    points = expand_points(spec)
    layout = SweepLayout(out_dir)
    check_existing_configs(layout, points, {name: config_to_dict(c) for name, c in configs.items()})
    table = Table(title=f"sweep {spec.name}: {len(points)} points in {out_dir}")
    table.add_column("point", overflow="fold")
    table.add_column("parameters", overflow="fold")
    table.add_column("state")
    for point in points:
        run_dir = layout.run_dir(point.name)
        state = "finished" if is_complete(run_dir) else "started" if has_started(run_dir) else "new"
        table.add_row(point.name, ", ".join(f"{k}={v}" for k, v in point.params.items()), state)
    out = StdoutConsole()
    if not out.is_terminal:
        out = StdoutConsole(width=250)
    out.print(table)


def _print_estimate(spec, out_dir: Path, cpus: int | None, tflops: float) -> None:
    """``sweep --plan``: the unfinished points' cost and wall time, one torch thread per point, as many
    points at once as the local Ray has CPUs."""
    import os

    from rich.console import Console as StdoutConsole

    from protomem.study.plan import plan_conditions, plan_summary, plan_table
    from protomem.sweep.conditions import point_configs
    from protomem.sweep.layout import SweepLayout, is_complete
    from protomem.sweep.spec import expand_points

    layout = SweepLayout(out_dir)
    todo = [p for p in expand_points(spec) if not is_complete(layout.run_dir(p.name))]
    out = StdoutConsole()
    if not out.is_terminal:
        out = StdoutConsole(width=250)
    if not todo:
        out.print("every point is finished: nothing to run")
        return
    configs = point_configs(spec, todo)
    jobs = min(len(todo), cpus or os.cpu_count() or 1)
    estimate = plan_conditions(
        [configs[p.name] for p in todo],
        jobs=jobs,
        threads=1,
        names=[p.name for p in todo],
        on_measure=console.print,
        longest_first_order=False,  # Ray starts the points in the spec's order
    )
    out.print(plan_table(estimate, f"sweep {spec.name}: {len(todo)} point(s) to run, {jobs} at a time"))
    for line in plan_summary(estimate, tflops):
        out.print(line, highlight=False)
    out.print("(a cluster given by --address runs as many points at once as it has CPUs, or GPUs for cuda)")


@app.command("query")
def query_command(
    sweep_dir: Path = typer.Argument(..., help="A sweep directory."),
    sql: str = typer.Argument(
        ..., help='SQL over tables points, checkpoints, examples, e.g. "SELECT * FROM points".'
    ),
    limit: int = typer.Option(50, "--limit", help="Rows to print (0 = all)."),
) -> None:
    """Run SQL on SWEEP_DIR/sweep.duckdb and print the result as a table."""
    from rich.console import Console as StdoutConsole

    from protomem.sweep.layout import require_sweep_dir
    from protomem.sweep.query import rich_table, run_query

    if limit < 0:
        raise ProtomemError(f"--limit must be at least 0, got {limit}")
    frame = run_query(require_sweep_dir(sweep_dir), sql)
    out = StdoutConsole()
    if not out.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
        out = StdoutConsole(width=250)
    out.print(rich_table(frame, limit=limit or None))


@app.command("report")
def report_command(
    sweep_dir: Path = typer.Argument(..., help="A sweep directory."),
    out: Path = typer.Option(
        None, "--out", help="Report file (rebuilt in place there).", show_default="SWEEP_DIR/report.html"
    ),
    mem_threshold: float = typer.Option(None, "--mem-threshold", help=MEM_HELP),
    gen_threshold: float = typer.Option(None, "--gen-threshold", help=GEN_HELP),
    figures: Path = typer.Option(None, "--figures", help="Also save every figure as PNG in this directory."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing --out file or PNGs in --figures."
    ),
) -> None:
    """Write a self-contained HTML report: τ_mem and τ_gen vs P, phase diagram, Zipf skew effects."""
    from protomem.outputs import check_output_file
    from protomem.sweep.report import build_report

    check_thresholds(mem_threshold, gen_threshold)
    if out is not None:
        check_output_file(out, overwrite=overwrite, inputs=[sweep_dir])
    if figures is not None:
        check_output_dir(figures, inputs=[sweep_dir])
        existing = sorted(figures.glob("*.png")) if figures.is_dir() else []
        if existing and not overwrite:
            raise ProtomemError("holds PNG files already (pass --overwrite to replace them)", path=figures)

    path = build_report(
        sweep_dir, out, mem_threshold=mem_threshold, gen_threshold=gen_threshold, figures_dir=figures
    )
    console.print(f"report: {path}")
