"""The training loop: AdamW, warm-up + constant/cosine LR, clipping, EMA, checkpoints, evaluation.

Determinism: all randomness of step k (batch indices, diffusion times, noise) comes from a generator
seeded by hash(seed, k), and the samples of evaluation step k from hash(seed, k, EVAL_STREAM). So the
trajectory depends only on the config (and the thread count, which changes float summation order, and the
device, whose generator draws other numbers), and a resumed run repeats exactly what an uninterrupted one
would have done.

Devices: ``config.device`` is resolved once (``auto`` -> CUDA when torch sees a GPU, else the CPU) and the
resolved name is what the run's config.yaml and checkpoint state record. The model is built on the CPU
(the same initial weights everywhere) and moved; the training data moves to the device once; every
random tensor is drawn there by a generator on that device; checkpoints are written from CPU copies.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from protomem.diffusion.checkpoint import (
    checkpoint_dir,
    drop_optimizer_state,
    latest_step,
    load_training_state,
    mark_latest,
    read_state,
    remove_checkpoint,
    save_checkpoint,
)
from protomem.diffusion.config import RESUME_FREE_FIELDS, DiffusionConfig, config_from_dict
from protomem.diffusion.device import device_label, resolve_device
from protomem.diffusion.models import build_model, count_parameters
from protomem.diffusion.processes import NoiseProcess, build_process
from protomem.diffusion.sampling import precision_context, sample_tokens, seeded_generator
from protomem.errors import ProtomemError
from protomem.io import atomic_path, make_dirs, write_text_atomic
from protomem.outputs import check_dir_target
from protomem.textio import require_inside

EvalCallback = Callable[[int, np.ndarray, dict[str, Any]], None]
TRAIN_STREAM = 0
EVAL_STREAM = 1
PROBE_STREAM = 2


@dataclass
class TrainResult:
    """What a finished (or resumed-to-the-end) run produced.

    Attributes:
        run_dir: the run directory.
        step: the last step trained (= config.steps).
        final_loss: mean training loss over the last logging window.
        seconds: wall time of the whole run, including time before a resume.
        n_parameters: parameters of the denoiser.
        threads: torch threads used.
        device: the device trained on (resolved, e.g. "cpu" or "cuda:0").
        eval_steps: the evaluation steps of the schedule.
        metrics: the rows of metrics.parquet as columns (step, loss, lr, seconds, samples_per_second, eval).
    """

    run_dir: Path
    step: int
    final_loss: float
    seconds: float
    n_parameters: int
    threads: int
    device: str
    eval_steps: list[int]
    metrics: dict[str, list] = field(default_factory=dict)


def validate_data(
    data: np.ndarray, classes: np.ndarray | None, config: DiffusionConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check training tokens (P, seq_len) in [0, vocab_size) and classes (P,) in [0, n_classes)."""
    tokens = np.asarray(data)
    if tokens.ndim != 2 or tokens.shape[1] != config.seq_len or tokens.shape[0] < 1:
        raise ProtomemError(
            f"training data must have shape (P >= 1, seq_len={config.seq_len}), got {tokens.shape}"
        )
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ProtomemError(f"training data must be integer tokens, got dtype {tokens.dtype}")
    bad = np.flatnonzero(((tokens < 0) | (tokens >= config.vocab_size)).any(axis=1))
    if bad.size:
        raise ProtomemError(f"training sequence {int(bad[0])} has a token outside [0, {config.vocab_size})")
    class_tensor = None
    if config.n_classes > 0:
        if classes is None:
            raise ProtomemError(
                f"n_classes={config.n_classes}: pass the training classes (or set n_classes: 0)"
            )
        classes = np.asarray(classes)
        if classes.shape != (tokens.shape[0],):
            raise ProtomemError(f"classes must have shape ({tokens.shape[0]},), got {classes.shape}")
        bad = np.flatnonzero((classes < 0) | (classes >= config.n_classes))
        if bad.size:
            raise ProtomemError(
                f"training class of sequence {int(bad[0])} is outside [0, {config.n_classes})"
            )
        class_tensor = torch.as_tensor(classes.astype(np.int64))
    return torch.as_tensor(tokens.astype(np.int64)), class_tensor


def learning_rate(config: DiffusionConfig, step: int) -> float:
    """LR at optimizer step ``step`` (1-based): linear warm-up, then constant or cosine decay to 0."""
    if config.warmup_steps and step <= config.warmup_steps:
        return config.lr * step / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class Trainer:
    """Model, EMA, optimizer and the single-step update on one device; ``train`` drives it.

    ``device`` (default: ``config.device`` resolved) receives the model and, once, the training data.
    """

    def __init__(
        self,
        config: DiffusionConfig,
        tokens: torch.Tensor,
        classes: torch.Tensor | None,
        device: torch.device | None = None,
    ) -> None:
        self.config = config
        self.device = device if device is not None else resolve_device(config.device)
        self.tokens = tokens.to(self.device)
        self.classes = None if classes is None else classes.to(self.device)
        self.precision = config.resolved_precision(self.device)
        self.process: NoiseProcess = build_process(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.model: nn.Module = build_model(config, self.process.n_input_tokens).to(self.device)
        self.ema_model: nn.Module | None = None
        if config.ema_decay is not None:
            self.ema_model = copy.deepcopy(self.model).requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True
        )
        self.params = [p for p in self.model.parameters()]

    def step(self, step: int) -> float:
        """One optimizer step with the randomness of step ``step``; returns the loss."""
        config = self.config
        generator = seeded_generator(config.seed, TRAIN_STREAM, step, device=self.device)
        index = torch.randint(
            0, self.tokens.shape[0], (config.batch_size,), generator=generator, device=self.device
        )
        x0 = self.tokens[index]
        classes = None if self.classes is None else self.classes[index]
        lr = learning_rate(config, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with precision_context(self.precision, self.device.type):
            loss = self.process.loss(self.model, x0, classes, generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            clip_gradients(self.params, config.grad_clip)
        self.optimizer.step()
        if self.ema_model is not None:
            with torch.no_grad():
                ema_params = list(self.ema_model.parameters())
                torch._foreach_lerp_(ema_params, self.params, 1.0 - config.ema_decay)
        return float(loss.detach())

    @property
    def sampling_model(self) -> nn.Module:
        return self.ema_model if self.ema_model is not None else self.model


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_`` with identical results, minus the rescale by exactly 1.

    clip_grad_norm_ multiplies every gradient by min(1, max_norm / (norm + 1e-6)) even when that is 1
    (x * 1.0 == x); skipping it saves about 5% of a small model's step on a CPU.
    """
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if bool(max_norm / (norm + 1e-6) < 1.0):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)


def probe_threads(config: DiffusionConfig, tokens: torch.Tensor, classes: torch.Tensor | None) -> int:
    """Fastest torch thread count for this model (1 or all cores), timed on a throwaway copy.

    On a shared machine two threads can be slower than one (the second core is busy), so we measure:
    a few training steps at each candidate count, best of the timed steps.
    """
    cores = os.cpu_count() or 1
    candidates = sorted({1, cores})
    if len(candidates) == 1:
        return candidates[0]
    probe_config = config.model_copy(update={"ema_decay": None, "warmup_steps": 0})
    trainer = Trainer(probe_config, tokens, classes, torch.device("cpu"))
    previous = torch.get_num_threads()
    timings = {}
    try:
        for threads in candidates:
            torch.set_num_threads(threads)
            trainer.step(1)  # warm-up (allocations, oneDNN kernels)
            best = math.inf
            for k in range(3):
                start = time.perf_counter()
                trainer.step(2 + k)
                best = min(best, time.perf_counter() - start)
            timings[threads] = best
    finally:
        torch.set_num_threads(previous)
    return min(timings, key=lambda t: (timings[t], t))


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = ["step", "loss", "lr", "seconds", "samples_per_second", "eval"]
    table = pa.table({c: [row[c] for row in rows] for c in columns})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _read_metrics(run_dir: Path, up_to_step: int) -> list[dict[str, Any]]:
    """The metrics rows of a run being resumed, up to its checkpoint's step (checked: a corrupt table
    is a one-line error)."""
    import pyarrow.parquet as pq

    path = run_dir / "metrics.parquet"
    if not path.exists():
        return []
    columns = ["step", "loss", "lr", "seconds", "samples_per_second", "eval"]
    try:
        rows = pq.read_table(require_inside(run_dir, path), columns=columns).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a corrupt file or missing columns
        detail = " ".join(str(exc).split())[:200]
        raise ProtomemError(f"not a readable metrics table ({detail})", path=path) from None
    if not all(isinstance(row["step"], int) for row in rows):
        raise ProtomemError("metrics table has rows without a step", path=path)
    return [row for row in rows if row["step"] <= up_to_step]


def _check_resume_config(saved: dict[str, Any], config: DiffusionConfig, path: Path) -> None:
    current = config.model_dump()
    differing = sorted(
        k for k in set(saved) | set(current) if k not in RESUME_FREE_FIELDS and saved.get(k) != current.get(k)
    )
    if differing:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differing[:4])
        raise ProtomemError(f"cannot resume with a different config ({details})", path=path)


def train(
    config: DiffusionConfig,
    data: np.ndarray,
    run_dir: str | os.PathLike,
    *,
    eval_callback: EvalCallback | None = None,
    resume: bool = False,
    progress: bool = True,
    classes: np.ndarray | None = None,
    overwrite: bool = False,
    on_start: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train a denoiser on ``data`` (P, seq_len) int64, writing checkpoints and metrics to ``run_dir``.

    At every evaluation step (config.resolved_eval_steps(): log-spaced and the final step) the trainer
    saves a checkpoint, draws ``config.eval_samples`` samples (EMA weights if enabled) with a seed derived
    from (config.seed, step), and calls ``eval_callback(step, samples (K, N) int64, info)`` with info keys
    "loss" (mean training loss since the previous evaluation), "lr", "seconds" (run wall time so far),
    "samples_per_second" (training sequences/s), "classes" ((K,) int64 or None), "checkpoint" (Path).
    A checkpoint becomes the resume point only after its callback returned, so a run killed inside the
    callback repeats that evaluation (with identical samples) when resumed.

    Args:
        classes: (P,) root classes, required when config.n_classes > 0.
        resume: continue from the latest checkpoint in run_dir (start fresh if there is none).
        overwrite: replace an existing run directory instead of refusing it.
        on_start: called with the first step to train once everything (data, run directory, the
            checkpoint to resume) has been checked and training begins; nothing is written before.
    """
    if isinstance(config, dict):
        config = config_from_dict(config)
    run_dir = Path(run_dir)
    tokens, class_tensor = validate_data(data, classes, config)
    device = resolve_device(config.device)
    if config.device != str(device):  # record the device actually used
        config = DiffusionConfig(**{**config.model_dump(), "device": str(device)})
    check_dir_target(run_dir, overwrite=overwrite and not resume)
    start_step, state = 0, None
    resume_from = latest_step(run_dir) if resume and run_dir.is_dir() else None
    if resume_from is not None:
        state = read_state(checkpoint_dir(run_dir, resume_from), with_optimizer=True)
        _check_resume_config(state["config"], config, checkpoint_dir(run_dir, resume_from) / "state.json")
        start_step = resume_from
    trainer = Trainer(config, tokens, class_tensor, device)
    if state is not None:  # every tensor is checked before anything is written
        directory = checkpoint_dir(run_dir, start_step)
        load_training_state(directory, state, trainer.model, trainer.ema_model, trainer.optimizer)
        _read_metrics(run_dir, start_step)
    elif run_dir.exists() and any(run_dir.iterdir()):
        if resume and not (run_dir / "config.yaml").is_file():
            raise ProtomemError(
                "nothing to resume: not a protomem run directory (no config.yaml)", path=run_dir
            )
        if not resume and not overwrite:
            raise ProtomemError(
                "run directory exists and is not empty (resume it, or overwrite)", path=run_dir
            )
        if not resume:
            shutil.rmtree(run_dir)
    make_dirs(run_dir)
    write_text_atomic(run_dir / "config.yaml", config.to_yaml())

    threads = config.threads or (state or {}).get("threads")
    previous_threads = torch.get_num_threads()
    if threads is None:
        # on an accelerator the CPU threads only feed it: keep torch's count rather than probe
        threads = probe_threads(config, tokens, class_tensor) if device.type == "cpu" else previous_threads
    torch.set_num_threads(int(threads))
    try:
        if on_start is not None:
            on_start(start_step)
        return _train_loop(trainer, run_dir, state, start_step, int(threads), device, eval_callback, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _train_loop(
    trainer: Trainer,
    run_dir: Path,
    state: dict[str, Any] | None,
    start_step: int,
    threads: int,
    device: torch.device,
    eval_callback: EvalCallback | None,
    progress: bool,
) -> TrainResult:
    """Train from ``start_step`` (the trainer already holds the resumed weights and optimizer state)."""
    config = trainer.config
    n_parameters = count_parameters(trainer.model)
    metrics_path = run_dir / "metrics.parquet"
    rows: list[dict[str, Any]] = []
    seconds_before = 0.0
    eval_losses: list[float] = []
    log_losses: list[float] = []
    if state is not None:
        seconds_before = float(state["seconds"])
        eval_losses = list(state["eval_losses"])
        log_losses = list(state["log_losses"])
        rows = _read_metrics(run_dir, start_step)
    eval_steps = config.resolved_eval_steps()
    eval_set = set(eval_steps)
    log_every = config.resolved_log_every()
    clock = time.perf_counter()
    window_start, window_steps = clock, 0

    def elapsed() -> float:
        return seconds_before + time.perf_counter() - clock

    def state_doc() -> dict[str, Any]:
        return {
            "config": config.model_dump(),
            "threads": threads,
            "device": str(device),
            "device_label": device_label(device),
            "seconds": elapsed(),
            "eval_losses": eval_losses,
            "log_losses": log_losses,
            "n_parameters": n_parameters,
            "rng": {"scheme": "torch generator seeded by hash(seed, stream, step)", "seed": config.seed},
            "versions": {"torch": torch.__version__, "numpy": np.__version__},
        }

    bar = _progress_bar(progress, config.steps, start_step)
    last_checkpoint = start_step
    loss = math.nan
    try:
        for step in range(start_step + 1, config.steps + 1):
            loss = trainer.step(step)
            eval_losses.append(loss)
            log_losses.append(loss)
            window_steps += 1
            is_eval = step in eval_set
            if step % log_every == 0 or is_eval:
                now = time.perf_counter()
                rows.append(
                    {
                        "step": step,
                        "loss": float(np.mean(log_losses)),
                        "lr": learning_rate(config, step),
                        "seconds": elapsed(),
                        "samples_per_second": window_steps
                        * config.batch_size
                        / max(now - window_start, 1e-9),
                        "eval": is_eval,
                    }
                )
                log_losses = []
                window_start, window_steps = now, 0
                if bar is not None:
                    bar.update(step, rows[-1]["loss"])
            periodic = config.checkpoint_every is not None and step % config.checkpoint_every == 0
            if is_eval or periodic:
                eval_loss = float(np.mean(eval_losses)) if eval_losses else math.nan
                if is_eval:
                    eval_losses = []
                _write_metrics(metrics_path, rows)
                save_checkpoint(
                    run_dir, step, trainer.model, trainer.ema_model, trainer.optimizer, state_doc()
                )
                if is_eval and eval_callback is not None:
                    samples, sample_classes = _eval_samples(trainer, config, step)
                    info = {
                        "loss": eval_loss,
                        "lr": learning_rate(config, step),
                        "seconds": elapsed(),
                        "samples_per_second": rows[-1]["samples_per_second"],
                        "classes": sample_classes,
                        "checkpoint": checkpoint_dir(run_dir, step),
                    }
                    eval_callback(step, samples, info)
                mark_latest(run_dir, step)
                drop_optimizer_state(run_dir, step)
                if last_checkpoint not in eval_set and last_checkpoint != step and last_checkpoint > 0:
                    remove_checkpoint(run_dir, last_checkpoint)
                last_checkpoint = step
                window_start, window_steps = time.perf_counter(), 0
    finally:
        if bar is not None:
            bar.close()
    final_loss = rows[-1]["loss"] if rows else loss
    return TrainResult(
        run_dir=run_dir,
        step=config.steps,
        final_loss=float(final_loss),
        seconds=elapsed(),
        n_parameters=n_parameters,
        threads=threads,
        device=str(device),
        eval_steps=eval_steps,
        metrics={c: [row[c] for row in rows] for c in (rows[0] if rows else {})},
    )


def _eval_samples(
    trainer: Trainer, config: DiffusionConfig, step: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """The evaluation samples of ``step`` as numpy: (K, N) int64 and their classes (drawn from the
    training set's)."""
    generator = seeded_generator(config.seed, EVAL_STREAM, step, device=trainer.device)
    classes = None
    if trainer.classes is not None:
        pick = torch.randint(
            0, trainer.classes.shape[0], (config.eval_samples,), generator=generator, device=trainer.device
        )
        classes = trainer.classes[pick].cpu().numpy()
    samples = sample_tokens(
        trainer.sampling_model, trainer.process, config, config.eval_samples, generator, classes=classes
    )
    return samples, classes


class _Bar:
    """A rich progress bar with loss and ETA (only constructed when progress is on)."""

    def __init__(self, total: int, start: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, loss="-")
        self.progress.start()

    def update(self, step: int, loss: float) -> None:
        self.progress.update(self.task, completed=step, loss=f"{loss:.4f}")

    def close(self) -> None:
        self.progress.stop()


def _progress_bar(enabled: bool, total: int, start: int) -> _Bar | None:
    return _Bar(total, start) if enabled else None
