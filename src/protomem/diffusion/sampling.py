"""Generate sequences from a trained denoiser: batched, seeded, optionally class-conditioned."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from protomem.diffusion.checkpoint import LoadedCheckpoint
from protomem.diffusion.config import DiffusionConfig
from protomem.diffusion.device import module_device
from protomem.diffusion.models import frozen_weights
from protomem.diffusion.processes import NoiseProcess
from protomem.errors import ProtomemError


@contextlib.contextmanager
def precision_context(precision: str, device_type: str = "cpu") -> Iterator[None]:
    """bf16: autocast matmuls to bfloat16 on ``device_type`` ("cpu", "cuda", "mps"); fp32: nothing."""
    if precision == "bf16":
        with torch.autocast(device_type, dtype=torch.bfloat16):
            yield
    else:
        yield


def seeded_generator(*key: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` whose seed is a hash of the integers ``key`` (independent streams).

    Random tensors drawn with it must be created on the same device (``device=generator.device``). A CUDA
    generator draws other numbers than a CPU one from the same seed: results are reproducible per device.
    """
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(seed)


def sample_tokens(
    model: nn.Module,
    process: NoiseProcess,
    config: DiffusionConfig,
    count: int,
    generator: torch.Generator,
    *,
    sampling_steps: int | None = None,
    classes: np.ndarray | None = None,
    batch_size: int = 512,
) -> np.ndarray:
    """Draw ``count`` sequences -> (count, seq_len) int64 numpy, batch after batch from one generator.

    Runs on the device of ``model``; ``generator`` must live there too (see :func:`seeded_generator`).
    """
    steps = sampling_steps if sampling_steps is not None else config.resolved_sampling_steps()
    if steps < 1:
        raise ProtomemError(f"sampling_steps must be at least 1, got {steps}")
    if count < 0:
        raise ProtomemError(f"count must be >= 0, got {count}")
    device = module_device(model)
    class_tensor = None
    if config.n_classes > 0:
        if classes is None:
            class_tensor = torch.randint(0, config.n_classes, (count,), generator=generator, device=device)
        else:
            class_array = np.asarray(classes, dtype=np.int64)
            if class_array.shape != (count,):
                raise ProtomemError(f"classes must have shape ({count},), got {class_array.shape}")
            if (class_array < 0).any() or (class_array >= config.n_classes).any():
                raise ProtomemError(f"classes must lie in [0, {config.n_classes})")
            class_tensor = torch.as_tensor(class_array).to(device)
    precision = config.resolved_precision(device)
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode(), precision_context(precision, device.type), frozen_weights(model):
            for start in range(0, count, batch_size):
                stop = min(count, start + batch_size)
                batch_classes = None if class_tensor is None else class_tensor[start:stop]
                out.append(
                    process.sample(model, stop - start, config.seq_len, steps, batch_classes, generator)
                )
    finally:
        model.train(was_training)
    if not out:
        return np.zeros((0, config.seq_len), dtype=np.int64)
    return torch.cat(out).cpu().numpy().astype(np.int64)


def generate(
    loaded: LoadedCheckpoint,
    count: int,
    *,
    sampling_steps: int | None = None,
    seed: int = 0,
    classes: np.ndarray | None = None,
    batch_size: int = 512,
) -> np.ndarray:
    """Sample ``count`` sequences from a loaded checkpoint -> (count, seq_len) int64.

    Args:
        sampling_steps: denoising steps (default: the run's ``sampling_steps`` or ``timesteps``).
        seed: same (seed, batch_size, checkpoint, device, thread count) -> same sequences.
        classes: (count,) root classes for a class-conditional model; None draws them uniformly.
    """
    generator = seeded_generator(seed, device=module_device(loaded.model))
    return sample_tokens(
        loaded.model,
        loaded.process,
        loaded.config,
        count,
        generator,
        sampling_steps=sampling_steps,
        classes=classes,
        batch_size=batch_size,
    )
