"""What one training step and one sampler step of a config cost: FLOPs counted, seconds timed.

FLOPs are counted by torch's ``FlopCounterMode`` over one real step (the matrix products of forward and
backward; elementwise work is not counted), the count the benchmarks report. Seconds are the median of a
few timed steps after warm-up, on the config's device, with the caller's torch thread count: on a
shared machine they include whatever else is running.

    cost = measure_step_cost(config, sample_batch=512)
    cost.train_seconds * config.steps   # training time, evaluations aside
    count_step_flops(config).train_flops  # the count alone, nothing timed
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from protomem.diffusion.config import DiffusionConfig
from protomem.diffusion.device import resolve_device, synchronize
from protomem.diffusion.models import count_parameters, frozen_weights
from protomem.diffusion.sampling import precision_context, sample_tokens, seeded_generator
from protomem.diffusion.trainer import Trainer


@dataclass(frozen=True)
class StepCost:
    """Cost of one step of a config on one device.

    Attributes:
        n_parameters: parameters of the denoiser.
        train_flops: FLOPs of one optimizer step (forward + backward of a batch of ``batch_size``).
        train_seconds: wall seconds of one optimizer step (median of the timed steps).
        sample_flops: FLOPs of one sampler step of one sequence (denoiser forward, folded weights).
        sample_seconds: wall seconds of one sampler step of one sequence, timed in batches of
            ``sample_batch`` sequences (the per-batch time divided by the batch).
        sample_batch: sequences denoised at once while timing.
        device: the device timed on.
        threads: torch threads while timing.
    """

    n_parameters: int
    train_flops: float
    train_seconds: float
    sample_flops: float
    sample_seconds: float
    sample_batch: int
    device: str
    threads: int


def make_trainer(config: DiffusionConfig, device: torch.device | None = None) -> Trainer:
    """A Trainer on random in-vocabulary data (4 batches' worth; the step cost does not depend on it)."""
    generator = torch.Generator().manual_seed(0)
    rows = max(64, 4 * config.batch_size)
    tokens = torch.randint(0, config.vocab_size, (rows, config.seq_len), generator=generator)
    classes = None
    if config.n_classes > 0:
        classes = torch.randint(0, config.n_classes, (rows,), generator=generator)
    return Trainer(config, tokens, classes, device)


def train_step_flops(trainer: Trainer, step: int = 1) -> float:
    """FLOPs of optimizer step ``step`` of ``trainer`` (which takes that step)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        trainer.step(step)
    return float(counter.get_total_flops())


def sample_step_flops(trainer: Trainer, batch: int) -> float:
    """FLOPs of one sampler step of one sequence: a denoiser forward of ``batch`` noisy sequences with the
    weights folded as sampling folds them (the folding itself, once per sampling call, is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, config, device = trainer.sampling_model, trainer.config, trainer.device
    generator = seeded_generator(0, device=device)
    x = torch.randint(
        0, trainer.process.n_input_tokens, (batch, config.seq_len), generator=generator, device=device
    )
    t = torch.full((batch,), 0.5, device=device)
    classes = None
    if config.n_classes > 0:
        classes = torch.randint(0, config.n_classes, (batch,), generator=generator, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), precision_context(trainer.precision, device.type), frozen_weights(model):
            model(x, t, classes)  # builds the folds
            with FlopCounterMode(display=False) as counter:
                model(x, t, classes)
    finally:
        model.train(was_training)
    return float(counter.get_total_flops()) / batch


def time_train_steps(
    trainer: Trainer, steps: int = 3, warmup: int = 2, first_step: int = 1, min_seconds: float = 1.0
) -> float:
    """Median wall seconds of an optimizer step: after ``warmup`` untimed steps, at least ``steps`` timed
    ones and more (up to 100) until ``min_seconds`` have passed, so fast steps are timed many times."""
    for k in range(warmup):
        trainer.step(first_step + k)
    times: list[float] = []
    step = first_step + warmup
    while len(times) < steps or (sum(times) < min_seconds and len(times) < 100):
        synchronize(trainer.device)
        start = time.perf_counter()
        trainer.step(step)
        synchronize(trainer.device)
        times.append(time.perf_counter() - start)
        step += 1
    return statistics.median(times)


def time_sample_steps(trainer: Trainer, batch: int, steps: int = 3, min_seconds: float = 0.5) -> float:
    """Wall seconds of one sampler step of one sequence: calls of ``steps`` sampler steps on ``batch``
    sequences after a one-step warm-up, repeated until ``min_seconds`` have passed; total time divided by
    the sequence-steps drawn."""
    model, process, config = trainer.sampling_model, trainer.process, trainer.config
    sample_tokens(model, process, config, batch, seeded_generator(0, device=trainer.device), sampling_steps=1)
    calls, elapsed = 0, 0.0
    while calls == 0 or (elapsed < min_seconds and calls < 100):
        generator = seeded_generator(1 + calls, device=trainer.device)
        synchronize(trainer.device)
        start = time.perf_counter()
        sample_tokens(model, process, config, batch, generator, sampling_steps=steps)
        synchronize(trainer.device)
        elapsed += time.perf_counter() - start
        calls += 1
    return elapsed / (calls * steps * batch)


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one step of a config, counted (not timed): as in :class:`StepCost`."""

    n_parameters: int
    train_flops: float
    sample_flops: float


def _count(trainer: Trainer, sample_batch: int) -> StepFlops:
    """Counts of ``trainer``'s next step (its first, step 1) and of a sampler step; the trainer takes
    that step. Sampler FLOPs are counted on at most 64 sequences (they are per sequence)."""
    return StepFlops(
        n_parameters=count_parameters(trainer.model),
        train_flops=train_step_flops(trainer),
        sample_flops=sample_step_flops(trainer, min(sample_batch, 64)),
    )


def count_step_flops(
    config: DiffusionConfig, *, sample_batch: int = 512, device: torch.device | None = None
) -> StepFlops:
    """Count the FLOPs of one training step and one sampler step of ``config`` without timing anything
    (one real step on random data, on ``device``, default CPU: the counts do not depend on the device).
    The same counts as :func:`measure_step_cost` reports for the same arguments."""
    return _count(make_trainer(config, device or torch.device("cpu")), sample_batch)


def measure_step_cost(
    config: DiffusionConfig,
    *,
    sample_batch: int = 512,
    timed_steps: int = 3,
    device: torch.device | None = None,
) -> StepCost:
    """Count and time one training step and one sampler step of ``config`` (on ``device``, default the
    config's, resolved) with the current torch thread count. Takes a few steps' time (plus warm-up)."""
    target = device if device is not None else resolve_device(config.device)
    trainer = make_trainer(config, target)
    counts = _count(trainer, sample_batch)
    train_seconds = time_train_steps(trainer, steps=timed_steps, first_step=2)
    sample_seconds = time_sample_steps(trainer, sample_batch, steps=timed_steps)
    return StepCost(
        n_parameters=counts.n_parameters,
        train_flops=counts.train_flops,
        train_seconds=train_seconds,
        sample_flops=counts.sample_flops,
        sample_seconds=sample_seconds,
        sample_batch=sample_batch,
        device=str(target),
        threads=torch.get_num_threads(),
    )
