"""Per-sequence likelihood bounds of a trained denoiser: the negative ELBO of every sequence, in nats.

Membership-inference work measures memorization by how much more likely a model finds its training
examples than comparable unseen ones; for a diffusion model the tractable likelihood is the ELBO, the
bound its loss trains. ``nll_bound(loaded, tokens)`` evaluates it for many sequences at once with a
fixed set of noise draws (seeded), so the values of different checkpoints are directly comparable.
"""

from __future__ import annotations

import numpy as np
import torch

from protomem.diffusion.checkpoint import LoadedCheckpoint
from protomem.diffusion.device import module_device
from protomem.diffusion.models import frozen_weights
from protomem.diffusion.sampling import precision_context, seeded_generator
from protomem.errors import ProtomemError


def nll_bound(
    loaded: LoadedCheckpoint,
    tokens: np.ndarray,
    *,
    draws: int = 4,
    seed: int = 0,
    classes: np.ndarray | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """(B,) float64: the negative ELBO of each of ``tokens`` (B, N) under the checkpoint, nats per sequence.

    An unbiased estimate from ``draws`` stratified noise draws per sequence (``NoiseProcess.nll_bound``).
    Same (seed, tokens, draws, batch_size) -> the same noise whatever the checkpoint, so differences
    between checkpoints come from the model alone. ``classes`` (B,) for a class-conditional model.
    """
    config = loaded.config
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] != config.seq_len:
        raise ProtomemError(f"tokens must have shape (B, {config.seq_len}), got {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= config.vocab_size):
        raise ProtomemError(f"tokens must lie in [0, {config.vocab_size})")
    if draws < 1:
        raise ProtomemError(f"draws must be at least 1, got {draws}")
    if config.n_classes > 0 and classes is None:
        raise ProtomemError("a class-conditional model needs the sequences' classes")
    model = loaded.model
    device = module_device(model)
    generator = seeded_generator(seed, 0xE1B0, device=device)
    x0 = torch.as_tensor(tokens, dtype=torch.long).to(device)  # moved once, batched on the device
    class_tensor = None
    if config.n_classes > 0:
        class_tensor = torch.as_tensor(np.asarray(classes, dtype=np.int64)).to(device)
    was_training = model.training
    model.eval()
    out = []
    try:
        precision = precision_context(config.resolved_precision(device), device.type)
        with torch.inference_mode(), precision, frozen_weights(model):
            for start in range(0, len(x0), batch_size):
                stop = min(len(x0), start + batch_size)
                batch_classes = None if class_tensor is None else class_tensor[start:stop]
                out.append(loaded.process.nll_bound(model, x0[start:stop], batch_classes, generator, draws))
    finally:
        model.train(was_training)
    if not out:
        return np.zeros(0, dtype=np.float64)
    return torch.cat(out).numpy().astype(np.float64)
