"""Discrete diffusion on fixed-length token sequences: noise processes, denoisers, trainer, sampler.

Public API (what the study builds on)::

    from protomem.diffusion import DiffusionConfig, train, load_checkpoint, generate, TrainResult

Notes for callers:

- ``DiffusionConfig(**fields)`` raises :class:`~protomem.errors.ProtomemError` (one line naming every bad
  field) instead of pydantic's ValidationError; nested inside another pydantic model it validates like any
  pydantic model. ``load_config(path, **overrides)`` reads YAML, ``config_from_dict(doc)`` a mapping.
  ``config.resolved_eval_steps()`` is the exact evaluation schedule (log-spaced ``n_evals`` steps from 1
  to ``steps``, or ``eval_steps``; the final step is always included).
- ``train(config, data, run_dir, *, eval_callback=None, resume=False, progress=True, classes=None,
  overwrite=False)``: ``data`` (P, N) integer tokens; ``classes`` (P,) is required iff
  ``config.n_classes > 0``. A non-empty run_dir is refused unless ``resume`` or ``overwrite``.
  ``resume=True`` on a run without a checkpoint starts from scratch. Resuming with a config that differs
  (other than ``threads``) is refused.
- ``eval_callback(step, samples, info)``: samples (K, N) int64 with K = config.eval_samples (may be 0),
  drawn from the EMA weights when ``ema_decay`` is set; info = {"loss", "lr", "seconds",
  "samples_per_second", "classes" ((K,) int64 drawn from the training classes, or None), "checkpoint"
  (Path of this step's checkpoint directory)}. The checkpoint of an evaluation step is written *before*
  the callback, but becomes the resume point only after the callback returns: a run killed inside the
  callback calls it again for that step on resume, with identical samples.
- Checkpoints: ``run_dir/checkpoints/step_XXXXXXXX/`` for every evaluation step (weights + EMA, kept);
  the optimizer state is kept for the latest checkpoint only. ``load_checkpoint(run_dir, step=None)``
  returns a :class:`LoadedCheckpoint` (.model in eval mode with EMA weights if any, .process, .config,
  .step, .run_dir, .uses_ema); ``available_steps(run_dir)`` lists the checkpoints.
- ``generate(loaded, count, *, sampling_steps=None, seed=0, classes=None, batch_size=512)`` -> (count, N)
  int64; a class-conditional model with ``classes=None`` draws classes uniformly. The result depends on
  (seed, batch_size, thread count, device).
- ``nll_bound(loaded, tokens, *, draws=4, seed=0, classes=None)`` -> (B,) float64: each sequence's
  negative ELBO in nats (the bound the loss trains), from a fixed, seeded set of noise draws so that
  checkpoints are comparable (membership-style likelihood of training vs unseen sequences).
- Threads: ``config.threads=None`` probes 1 vs all cores on a throwaway copy and uses the faster; the
  choice is in ``TrainResult.threads`` and the checkpoint state (a resume reuses it). ``train`` restores
  the caller's torch thread count on return.
- ``precision`` defaults to ``"auto"``: bf16 autocast of the matmuls where the CPU has native bfloat16
  (this one: AVX512-BF16, no AMX), else fp32. bf16 is ~1.5x faster here and, in a paired run (64 strings,
  4,000 steps), gave the same memorization curve as fp32 (95.3% vs 95.7% copies); it is deterministic
  but not bit-identical to fp32. Set ``"fp32"`` to reproduce fp32 figures.
- Devices: ``config.device`` is ``auto`` (CUDA when torch sees a GPU, else the CPU), ``cpu``, ``cuda``,
  ``cuda:N`` or ``mps``; ``train`` resolves it once, records the resolved name in config.yaml, the
  checkpoint state and ``TrainResult.device``, and keeps data, model and every random draw there.
  ``load_checkpoint(run_dir, step=None, *, use_ema=True, device="cpu")`` reads and checks on the CPU, then
  moves the model to ``device``; ``generate`` and ``nll_bound`` run where the model is and return numpy.
  Same seed on another device -> other (equally reproducible) numbers. ``protomem.diffusion.device``
  resolves settings; ``protomem.diffusion.cost`` counts and times steps (``study --plan``).
- ``config.model_copy(update=...)`` skips validation: prefer
  ``DiffusionConfig(**{**config.model_dump(), **changes})``.
- Importing ``protomem.diffusion`` is cheap: torch loads on first use of an exported name.
- Same config (incl. seed) and thread count -> bit-identical losses, weights and evaluation samples.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "PROCESSES": "protomem.diffusion.processes",
    "DiffusionConfig": "protomem.diffusion.config",
    "LoadedCheckpoint": "protomem.diffusion.checkpoint",
    "MaskedProcess": "protomem.diffusion.processes",
    "NoiseProcess": "protomem.diffusion.processes",
    "TrainResult": "protomem.diffusion.trainer",
    "Transformer": "protomem.diffusion.models",
    "TreeUNet": "protomem.diffusion.models",
    "UniformProcess": "protomem.diffusion.processes",
    "available_steps": "protomem.diffusion.checkpoint",
    "build_model": "protomem.diffusion.models",
    "build_process": "protomem.diffusion.processes",
    "config_from_dict": "protomem.diffusion.config",
    "count_parameters": "protomem.diffusion.models",
    "generate": "protomem.diffusion.sampling",
    "load_checkpoint": "protomem.diffusion.checkpoint",
    "load_config": "protomem.diffusion.config",
    "nll_bound": "protomem.diffusion.likelihood",
    "train": "protomem.diffusion.trainer",
}

__all__ = [
    "PROCESSES",
    "DiffusionConfig",
    "LoadedCheckpoint",
    "MaskedProcess",
    "NoiseProcess",
    "TrainResult",
    "Transformer",
    "TreeUNet",
    "UniformProcess",
    "available_steps",
    "build_model",
    "build_process",
    "config_from_dict",
    "count_parameters",
    "generate",
    "load_checkpoint",
    "load_config",
    "nll_bound",
    "train",
]

if TYPE_CHECKING:
    from protomem.diffusion.checkpoint import LoadedCheckpoint, available_steps, load_checkpoint
    from protomem.diffusion.config import DiffusionConfig, config_from_dict, load_config
    from protomem.diffusion.likelihood import nll_bound
    from protomem.diffusion.models import Transformer, TreeUNet, build_model, count_parameters
    from protomem.diffusion.processes import (
        PROCESSES,
        MaskedProcess,
        NoiseProcess,
        UniformProcess,
        build_process,
    )
    from protomem.diffusion.sampling import generate
    from protomem.diffusion.trainer import TrainResult, train


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first use (keeps ``import protomem.diffusion`` light)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'protomem.diffusion' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
