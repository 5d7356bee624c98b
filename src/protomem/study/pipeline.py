"""Run one condition of the study end to end: grammar, training set, training with evaluations, analysis.

``run_condition(config, out_dir)`` writes into ``out_dir``:

    config.yaml          the resolved condition, seeds, package versions, the device trained on
    grammar.json         the RHM
    train.parquet        the P training strings (tokens, class, logprob): a plain or a matched draw
    heldout.parquet      held-out grammar strings (not in the training set) for the likelihood endpoint
    train/               the diffusion run (checkpoints/, its own config.yaml and loss log metrics.parquet)
    evals/               per evaluation step: the samples (step_*.parquet) and the ELBO of every training and
                         held-out string (likelihood_step_*.parquet): the resumable record of the evaluations
    samples.parquet      every generated sample with its classification
    metrics.parquet      one row per evaluation step
    per_example.parquet  every training string: prototypicality scores, copies over time, first memorized step
    slop.parquet         per evaluation step, level, position and training block: training / sample counts,
                         grammar probability
    nulls.parquet        the Monte Carlo null draws of the correlations (for pooling across conditions)
    summary.json         the verdict and its numbers; "status": "complete" is written last
    report.html          the self-contained report (``protomem report`` rebuilds it from the tables)

Killed at any point, ``run_condition(..., resume=True)`` continues from the last checkpoint and evaluation.
"""

from __future__ import annotations

import platform
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from protomem.diffusion.config import RESUME_FREE_FIELDS
from protomem.diffusion.device import device_label, resolve_device
from protomem.errors import ProtomemError
from protomem.grammar import (
    RHM,
    Derivations,
    load_grammar,
    sample_distinct_strings,
    sample_grammar,
    save_grammar,
)
from protomem.io import (
    atomic_path,
    is_non_empty_dir,
    start_fresh_run_dir,
    write_json_atomic,
    write_strings,
    write_text_atomic,
)
from protomem.memorization.hierarchy import Classification, classify_samples
from protomem.neighbors import row_keys
from protomem.study.config import ConditionConfig, condition_from_dict
from protomem.study.design import TrainingSet, draw_training_set
from protomem.textio import load_json, load_yaml, require_inside

if TYPE_CHECKING:
    import torch

EVALS_DIR = "evals"
TRAIN_DIR = "train"


def _versions() -> dict[str, str]:
    import numpy
    import scipy
    import torch

    import protomem

    return {
        "protomem": str(getattr(protomem, "__version__", "0")),
        "python": platform.python_version(),
        "numpy": str(numpy.__version__),
        "scipy": str(scipy.__version__),
        "torch": str(torch.__version__),
    }


def write_table(path: Path, columns: dict[str, Any]) -> None:
    """Write a dict of equal-length columns as Parquet, atomically."""
    table = pa.table({k: (v if isinstance(v, list) else np.asarray(v)) for k, v in columns.items()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_summary(out_dir: Path) -> dict[str, Any] | None:
    """summary.json of a condition, or None when it is missing or unreadable (a run killed mid-write,
    or a damaged file: the condition is then not complete and runs again)."""
    path = Path(out_dir) / "summary.json"
    if not path.is_file():
        return None
    try:
        doc = load_json(require_inside(out_dir, path), "summary")
    except ProtomemError:
        return None
    return doc if isinstance(doc, dict) else None


def is_complete(out_dir: Path) -> bool:
    summary = read_summary(out_dir)
    return bool(summary and summary.get("status") == "complete")


def load_condition_config(out_dir: Path) -> ConditionConfig:
    path = Path(out_dir) / "config.yaml"
    if not path.exists():
        raise ProtomemError("not a study condition directory (no config.yaml)", path=out_dir)
    doc = load_yaml(require_inside(out_dir, path), "condition config")
    if not isinstance(doc, dict):
        raise ProtomemError("not a condition config written by protomem (no 'condition')", path=path)
    return condition_from_dict(doc.get("condition"), path=path)


def build_grammar(config: ConditionConfig) -> RHM:
    g = config.grammar
    return sample_grammar(
        g.vocab_size,
        g.n_classes,
        g.rules_per_symbol,
        g.branching,
        g.depth,
        seed=g.seed,
        zipf_exponent=g.zipf_exponent,
        zipf_levels=g.zipf_levels,
    )


def _prepare_dir(config: ConditionConfig, out_dir: Path, resume: bool, overwrite: bool) -> None:
    if not (resume and is_non_empty_dir(out_dir)):
        start_fresh_run_dir(out_dir, overwrite)
        return
    if not (out_dir / "config.yaml").is_file():
        # killed before anything but the deterministic grammar / training set was written: start afresh
        shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        return
    saved = load_condition_config(out_dir).model_dump(mode="json")
    mine = config.model_dump(mode="json")
    for free in RESUME_FREE_FIELDS:  # threads and device may change between a run and its resumption
        saved["diffusion"].pop(free, None)
        mine["diffusion"].pop(free, None)
    if saved != mine:
        raise ProtomemError(
            "the run directory holds a different condition; resume it with its own config", path=out_dir
        )


def _samples_columns(step: int, sampler: str, samples: np.ndarray, result: Classification) -> dict[str, Any]:
    columns: dict[str, Any] = {
        "step": np.full(len(samples), step, dtype=np.int64),
        "sampler": [sampler] * len(samples),
        "sample": np.arange(len(samples), dtype=np.int64),
        "tokens": samples.tolist(),
        "status": result.status.astype(str).tolist(),
        "copy_index": result.copy_index,
        "failing_level": result.failing_level,
        "nn_hamming": result.nn_hamming,
        "nn_index": result.nn_index,
        "logprob": result.logprob,
    }
    for level, (copied, holders) in enumerate(zip(result.block_copied, result.block_holders, strict=True)):
        columns[f"copied_l{level}"] = copied.tolist()
        columns[f"holders_l{level}"] = holders.tolist()
    return columns


def _eval_path(out_dir: Path, step: int) -> Path:
    return out_dir / EVALS_DIR / f"step_{step:08d}.parquet"


def run_condition(
    config: ConditionConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Run one condition into ``out_dir`` (see the module docstring) and return ``out_dir``.

    Args:
        resume: continue a killed run (its config must match, apart from threads and device); a complete
            run is returned as is.
        overwrite: replace a non-empty ``out_dir`` (otherwise refused).
        progress: show progress bars and stage messages.
    """
    from protomem.diffusion import train

    out_dir = Path(out_dir)
    _prepare_dir(config, out_dir, resume, overwrite)
    if resume and is_complete(out_dir):
        return out_dir
    say = _stage_printer(progress, config.name)
    cpu_start = time.process_time()
    clock = time.perf_counter()
    timings: dict[str, float] = {}

    grammar = build_grammar(config)
    save_grammar(grammar, out_dir / "grammar.json")
    training = build_training_set(config, grammar)
    data = training.strings
    write_strings(out_dir / "train.parquet", data.tokens, classes=data.classes, logprobs=data.logprob)
    heldout = draw_heldout(config, grammar, data) if config.likelihood_draws() else None
    if heldout is not None:
        write_strings(
            out_dir / "heldout.parquet", heldout.tokens, classes=heldout.classes, logprobs=heldout.logprob
        )
    diffusion_config = config.diffusion_config()
    device = resolve_device(diffusion_config.device)
    doc = {
        "condition": config.model_dump(mode="json"),
        "diffusion_config": diffusion_config.model_dump(mode="json"),
        "seeds": {
            "grammar": config.grammar.seed,
            "data": config.data.seed,
            "model": config.diffusion.seed,
            "analysis": config.analysis.seed,
        },
        "versions": _versions(),
        "device": str(device),
        "device_label": device_label(device),
    }
    write_text_atomic(out_dir / "config.yaml", yaml.safe_dump(doc, sort_keys=False))
    timings["setup"] = time.perf_counter() - clock

    def on_eval(step: int, _samples: np.ndarray, info: dict[str, Any]) -> None:
        # Sample from the checkpoint just written, through the same load_checkpoint + generate path that
        # `protomem sample` and the finer-sampler check use, so every sample can be regenerated later.
        from protomem.diffusion import load_checkpoint

        loaded = load_checkpoint(out_dir / TRAIN_DIR, step, device=device)
        samples = _sample_loaded(loaded, config.evaluation.n_samples, None, config.diffusion.seed)
        result = classify_samples(grammar, data.tokens, samples)
        columns = _samples_columns(step, "train", samples, result)
        columns["loss"] = np.full(len(samples), info["loss"])
        columns["seconds"] = np.full(len(samples), info["seconds"])
        if heldout is not None:
            write_table(_likelihood_path(out_dir, step), _likelihood_columns(config, loaded, data, heldout))
        write_table(_eval_path(out_dir, step), columns)

    say(f"training ({diffusion_config.steps} steps, evaluations at {diffusion_config.resolved_eval_steps()})")
    clock = time.perf_counter()
    classes = data.classes if config.data.class_conditional else None
    result = train(
        diffusion_config.model_copy(update={"eval_samples": 0}),
        data.tokens,
        out_dir / TRAIN_DIR,
        eval_callback=on_eval,
        resume=True,
        progress=progress,
        classes=classes,
    )
    timings["train"] = time.perf_counter() - clock

    clock = time.perf_counter()
    finer_path = out_dir / EVALS_DIR / "finer.parquet"
    if not finer_path.is_file():
        say(f"finer-sampler check on the final checkpoint ({config.finer_sampling_steps()} steps)")
        _finer_check(config, out_dir, grammar, data.tokens, finer_path, result.threads, device)
    timings["finer_sampler"] = time.perf_counter() - clock

    from protomem.study.analysis import analyze_condition

    clock = time.perf_counter()
    say("analysis (detectors, prototypicality, Monte Carlo nulls, slop)")
    summary = analyze_condition(config, out_dir, grammar, data, progress=progress)
    timings["analysis"] = time.perf_counter() - clock

    summary["training_set"] = training.summary()
    summary["min_excess"] = config.analysis.min_excess
    summary["threads"] = int(result.threads)
    summary["device"] = result.device
    summary["train_seconds"] = float(result.seconds)
    summary["status"] = "analysed"
    write_json_atomic(out_dir / "summary.json", summary)

    from protomem.study.report import render_condition_report

    clock = time.perf_counter()
    render_condition_report(out_dir, summary)
    timings["report"] = time.perf_counter() - clock
    summary["stage_seconds"] = timings
    # CPU seconds of this process (all threads) since the call: on a loaded machine the wall times above
    # stretch, this does not.
    summary["cpu_seconds"] = time.process_time() - cpu_start
    summary["status"] = "complete"
    write_json_atomic(out_dir / "summary.json", summary)
    if progress:
        say(f"done: {summary['verdict']}")
    return out_dir


def _sample_checkpoint(
    out_dir: Path,
    step: int | None,
    count: int,
    sampling_steps: int | None,
    seed: int,
    device: torch.device,
) -> np.ndarray:
    """(count, N) samples (numpy) of the checkpoint at ``step`` (latest if None) drawn on ``device``,
    seeded by (seed, step)."""
    from protomem.diffusion import load_checkpoint

    loaded = load_checkpoint(out_dir / TRAIN_DIR, step, device=device)
    return _sample_loaded(loaded, count, sampling_steps, seed)


def _sample_loaded(loaded: Any, count: int, sampling_steps: int | None, seed: int) -> np.ndarray:
    """(count, N) samples (numpy) of a loaded checkpoint, on its device, seeded by (seed, its step)."""
    from protomem.diffusion import generate

    key = int(np.random.SeedSequence([seed, int(loaded.step), 0x5EED]).generate_state(1)[0])
    return generate(loaded, count, sampling_steps=sampling_steps, seed=key)


def build_training_set(config: ConditionConfig, grammar: RHM) -> TrainingSet:
    """The condition's P training strings (deterministic given the data section)."""
    return draw_training_set(
        grammar,
        config.data.n_train,
        seed=config.data.seed,
        design=config.data.design,
        pool_factor=config.data.pool_factor,
    )


def draw_heldout(config: ConditionConfig, grammar: RHM, train: Derivations) -> Derivations:
    """Distinct grammar strings outside the training set (``evaluation.heldout_strings``, default P), for the
    likelihood endpoint: the model's likelihood of strings it never saw, to compare training strings with."""
    from protomem.grammar.counting import n_valid_strings

    count = config.evaluation.heldout_strings or config.data.n_train
    available = n_valid_strings(grammar) - len(train)
    if count > available:
        raise ProtomemError(
            f"evaluation.heldout_strings = {count} but the grammar has only {available} strings outside the "
            "training set"
        )
    draw = sample_distinct_strings(grammar, count + len(train), seed=config.data.seed + 0x4E1D)
    fresh = ~np.isin(row_keys(draw.tokens), row_keys(train.tokens))
    return draw.take(np.flatnonzero(fresh)[:count])


def _likelihood_path(out_dir: Path, step: int) -> Path:
    return out_dir / EVALS_DIR / f"likelihood_step_{step:08d}.parquet"


def _likelihood_columns(
    config: ConditionConfig, loaded: Any, train: Derivations, heldout: Derivations
) -> dict[str, Any]:
    """The negative ELBO (nats) of every training and held-out string at this checkpoint, with the same
    noise draws at every checkpoint (seeded by the condition, not the step)."""
    from protomem.diffusion import nll_bound

    tokens = np.concatenate([train.tokens, heldout.tokens])
    classes = np.concatenate([train.classes, heldout.classes]) if config.data.class_conditional else None
    nll = nll_bound(
        loaded, tokens, draws=config.likelihood_draws(), seed=config.diffusion.seed, classes=classes
    )
    return {
        "set": ["train"] * len(train) + ["heldout"] * len(heldout),
        "index": np.concatenate([np.arange(len(train)), np.arange(len(heldout))]),
        "nll": nll,
    }


def _finer_check(
    config: ConditionConfig,
    out_dir: Path,
    grammar: RHM,
    train_tokens: np.ndarray,
    path: Path,
    threads: int,
    device: torch.device,
) -> None:
    import torch

    from protomem.diffusion import available_steps

    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        step = max(available_steps(out_dir / TRAIN_DIR))
        samples = _sample_checkpoint(
            out_dir,
            step,
            config.evaluation.n_samples,
            config.finer_sampling_steps(),
            config.diffusion.seed + 1,
            device,
        )
    finally:
        torch.set_num_threads(previous)
    result = classify_samples(grammar, train_tokens, samples)
    columns = _samples_columns(int(step), "finer", samples, result)
    columns["loss"] = np.full(len(samples), np.nan)
    columns["seconds"] = np.full(len(samples), np.nan)
    write_table(path, columns)


def _stage_printer(progress: bool, name: str):
    if not progress:
        return lambda message: None
    from rich.console import Console

    console = Console(stderr=True)
    return lambda message: console.print(f"[bold]{name}[/bold]: {message}")


def load_grammar_and_train(out_dir: Path) -> tuple[RHM, np.ndarray]:
    """The grammar and training tokens of a condition directory."""
    from protomem.io import read_strings

    grammar = load_grammar(out_dir / "grammar.json")
    table = read_strings(out_dir / "train.parquet", vocab_size=grammar.vocab_size, length=grammar.length)
    return grammar, table.tokens
