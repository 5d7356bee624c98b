"""``protomem train`` and ``protomem sample``: train a discrete diffusion model, draw strings from it."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer
from rich.console import Console

from protomem.diffusion.device import DEVICE_CHOICES, device_label, resolve_device
from protomem.errors import ProtomemError

console = Console(stderr=True)


class Process(StrEnum):
    uniform = "uniform"
    masked = "masked"


class Model(StrEnum):
    tree_unet = "tree_unet"
    transformer = "transformer"


def train(
    data: Path = typer.Option(..., "--data", help="Training strings (.parquet, .jsonl or .txt)."),
    out: Path = typer.Option(..., "--out", help="Run directory (checkpoints, metrics, config)."),
    config: Path = typer.Option(None, "--config", help="YAML file of DiffusionConfig fields."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's latest checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory."),
    grammar: Path = typer.Option(
        None, "--grammar", help="grammar.json: takes vocab size and branching from it (else from the data)."
    ),
    conditional: bool = typer.Option(
        False, "--conditional", help="Condition on the strings' classes (the file's 'class' column)."
    ),
    process: Process = typer.Option(None, "--process", help="Noise process (overrides the config)."),
    model: Model = typer.Option(None, "--model", help="Denoiser (overrides the config)."),
    width: int = typer.Option(None, "--width", help="Model width (overrides the config)."),
    steps: int = typer.Option(None, "--steps", help="Training steps (overrides the config)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Batch size (overrides the config)."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (overrides the config)."),
    seed: int = typer.Option(None, "--seed", help="Seed (overrides the config)."),
    threads: int = typer.Option(None, "--threads", help="Torch threads (default: probe)."),
    device: str = typer.Option(
        None, "--device", help=f"{DEVICE_CHOICES} (overrides the config; default auto: CUDA if present)."
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Train a discrete diffusion model on a file of equal-length token strings."""
    import numpy as np

    from protomem import limits
    from protomem.diffusion.config import config_from_dict
    from protomem.diffusion.models import check_model_size
    from protomem.diffusion.processes import build_process
    from protomem.diffusion.trainer import train as train_run
    from protomem.io import is_non_empty_dir, read_strings
    from protomem.outputs import check_output_dir
    from protomem.textio import load_yaml

    # Everything is checked before the run directory is touched: a refused run leaves no trace.
    check_output_dir(out, overwrite=overwrite and not resume, inputs=[data, config, grammar])
    if is_non_empty_dir(out) and not (resume or overwrite):
        raise ProtomemError("run directory exists and is not empty (pass --resume or --overwrite)", path=out)
    overrides = {
        "process": None if process is None else process.value,
        "model": None if model is None else model.value,
        "width": width,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "threads": threads,
        "device": device,
    }
    if device is not None:
        resolve_device(device)  # a device this machine lacks fails before reading the data
    vocab_size = branching = None
    n_classes = None
    if grammar is not None:
        from protomem.grammar import load_grammar

        rhm = load_grammar(grammar)
        vocab_size, branching, n_classes = rhm.vocab_size, rhm.branching, rhm.n_classes
    table = read_strings(data, vocab_size=vocab_size)
    tokens = table.tokens
    if vocab_size is None:
        limits.VOCAB.check(int(tokens.max()) + 1, "vocabulary (largest token + 1)", path=data)
    classes = None
    if conditional:
        if table.classes is None or (table.classes < 0).any():
            raise ProtomemError("--conditional needs a class for every string", path=data)
        classes = table.classes
        if n_classes is None:
            limits.VOCAB.check(int(classes.max()) + 1, "classes (largest class + 1)", path=data)
            n_classes = int(classes.max()) + 1
    inferred = {
        "vocab_size": vocab_size if vocab_size is not None else int(tokens.max()) + 1,
        "seq_len": tokens.shape[1],
        "n_classes": n_classes if conditional else 0,
    }
    if branching is not None:
        inferred["branching"] = branching
    doc = {}
    if config is not None:
        doc = load_yaml(config, "config file")
        doc = {} if doc is None else doc
        if not isinstance(doc, dict):
            raise ProtomemError("a diffusion config must be a mapping of field: value", path=config)
    fields = {**inferred, **doc, **{k: v for k, v in overrides.items() if v is not None}}
    cfg = config_from_dict(fields, path=config)
    if int(tokens.max()) >= cfg.vocab_size:
        raise ProtomemError(f"holds token {int(tokens.max())}, beyond vocab_size {cfg.vocab_size}", path=data)
    n_params = check_model_size(cfg, build_process(cfg).n_input_tokens)

    def announce(start_step: int) -> None:
        resumed = f", resuming at step {start_step}" if start_step else ""
        console.print(
            f"training {cfg.model} (width {cfg.width}, {n_params:,} parameters), {cfg.process} process, "
            f"{len(tokens)} strings of {cfg.seq_len} tokens, {cfg.steps} steps{resumed} on "
            f"{device_label(resolve_device(cfg.device))} -> {out}"
        )

    result = train_run(
        cfg,
        np.asarray(tokens),
        out,
        resume=resume,
        overwrite=overwrite,
        progress=not quiet,
        classes=classes,
        on_start=announce,
    )
    console.print(
        f"done: step {result.step}, loss {result.final_loss:.4f}, {result.seconds:.1f} s, "
        f"{result.threads} thread(s), {result.device}; checkpoints in {out}/checkpoints"
    )


def sample(
    run: Path = typer.Option(..., "--run", help="Run directory written by `protomem train`."),
    out: Path = typer.Option(..., "--out", help="Output strings file (.parquet, .jsonl or .txt)."),
    count: int = typer.Option(1000, "--count", help="Strings to draw."),
    step: int = typer.Option(None, "--step", help="Checkpoint step (default: latest)."),
    sampling_steps: int = typer.Option(None, "--sampling-steps", help="Denoising steps (default: config)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    batch_size: int = typer.Option(512, "--batch-size", help="Sequences denoised at once."),
    threads: int = typer.Option(None, "--threads", help="Torch threads (default: torch's)."),
    device: str = typer.Option("auto", "--device", help=f"{DEVICE_CHOICES} (auto: CUDA if present)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
) -> None:
    """Draw strings from a trained checkpoint (same file format as `protomem grammar sample`)."""
    import numpy as np
    import torch

    from protomem import limits
    from protomem.diffusion.checkpoint import load_checkpoint
    from protomem.diffusion.sampling import generate, seeded_generator
    from protomem.io import string_format_of, write_strings
    from protomem.outputs import check_output_file

    if count < 1:
        raise ProtomemError(f"--count must be at least 1, got {count}")
    if batch_size < 1:
        raise ProtomemError(f"--batch-size must be at least 1, got {batch_size}")
    if not 0 <= seed < 1 << 63:
        raise ProtomemError(f"--seed must lie in [0, 2^63), got {seed}")
    if threads is not None and threads < 1:
        raise ProtomemError(f"--threads must be at least 1, got {threads}")
    string_format_of(out)  # refuse a bad extension before the work
    check_output_file(out, overwrite=overwrite)
    target = resolve_device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    loaded = load_checkpoint(run, step, device=target)
    limits.TOTAL_TOKENS.check(count * loaded.config.seq_len, "--count x sequence length")
    classes = None
    if loaded.config.n_classes > 0:
        generator = seeded_generator(seed, 1)
        classes = torch.randint(0, loaded.config.n_classes, (count,), generator=generator).numpy()
    tokens = generate(
        loaded, count, sampling_steps=sampling_steps, seed=seed, classes=classes, batch_size=batch_size
    )
    write_strings(out, tokens, classes=None if classes is None else np.asarray(classes))
    console.print(f"wrote {count} strings from step {loaded.step} of {run} to {out} ({target})")


def register(app: typer.Typer) -> None:
    """Add ``train`` and ``sample`` as top-level commands of the protomem app."""
    app.command("train")(train)
    app.command("sample")(sample)
