"""DiffusionConfig: every knob of one training run, validated before any training starts.

Build it in Python (``DiffusionConfig(vocab_size=8, seq_len=8)``), from a dict
(:func:`config_from_dict`) or from a YAML file (:func:`load_config`). A bad value raises
:class:`~protomem.errors.ProtomemError` naming the field: unknown keys, negative rates, a sequence length
that is not ``branching ** k`` for the tree U-Net, evaluation steps outside the run, and so on.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from protomem.diffusion.device import DEVICE_CHOICES, DEVICE_PATTERN
from protomem.errors import ProtomemError

if TYPE_CHECKING:
    import torch

# Fields that may differ between a run and its resumption: the thread count (a float summation order)
# and the device (a run started on one device can continue on another: checkpoints are device-free).
RESUME_FREE_FIELDS = frozenset({"threads", "device"})
# Seeds are stored as int64 (Parquet, DuckDB) and fed to torch and numpy: 0 .. 2^63 - 1.
MAX_SEED = (1 << 63) - 1


class DiffusionConfig(BaseModel):
    """One discrete-diffusion training run.

    Data: ``vocab_size`` tokens 0..v-1, sequences of ``seq_len`` tokens, ``n_classes`` root classes
    (0 = unconditional model). Process: ``"uniform"`` (D3PM-uniform, ``timesteps`` discrete steps,
    ``schedule`` of the keep probability, loss = VB KL terms + ``ce_weight`` x cross-entropy) or
    ``"masked"`` (absorbing / MDLM, continuous time, weighted cross-entropy ELBO). Model: ``"tree_unet"``
    (needs ``seq_len == branching ** k``) or ``"transformer"``.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    # data
    vocab_size: int = Field(ge=2, description="Tokens are 0..vocab_size-1.")
    seq_len: int = Field(ge=1, description="Tokens per sequence.")
    branching: int = Field(2, ge=2, description="Tree U-Net: tokens merged per level (s).")
    n_classes: int = Field(0, ge=0, description="Root classes to condition on; 0 = unconditional.")
    # noise process
    process: Literal["uniform", "masked"] = "uniform"
    timesteps: int = Field(200, ge=1, description="Uniform: discrete steps T (masked: continuous time).")
    schedule: Literal["linear", "cosine"] = Field(
        "linear", description="Keep probability alpha(t): linear 1 - t, or cosine."
    )
    ce_weight: float = Field(0.01, ge=0.0, description="Uniform: weight of the auxiliary x0 cross-entropy.")
    # denoiser
    model: Literal["tree_unet", "transformer"] = "tree_unet"
    width: int = Field(256, ge=1, description="Channels of the tree U-Net / model dim of the transformer.")
    blocks_per_level: int = Field(0, ge=0, description="Tree U-Net: extra residual MLP blocks per level.")
    n_layers: int = Field(4, ge=1, description="Transformer: blocks.")
    n_heads: int = Field(4, ge=1, description="Transformer: attention heads (must divide width).")
    # optimisation
    steps: int = Field(10_000, ge=1, description="Optimizer steps.")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0.0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up from 0 to lr.")
    lr_schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float | None = Field(1.0, gt=0.0, description="Max global gradient norm; None = off.")
    ema_decay: float | None = Field(None, ge=0.0, lt=1.0, description="EMA of weights; None = off.")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    # evaluation
    eval_steps: list[int] | None = Field(
        None, description="Explicit evaluation steps (the final step is added)."
    )
    n_evals: int = Field(10, ge=1, description="Log-spaced evaluation steps when eval_steps is None.")
    eval_samples: int = Field(256, ge=0, description="Samples generated at each evaluation (0 = none).")
    sampling_steps: int | None = Field(
        None, ge=1, description="Denoising steps when sampling; None = timesteps."
    )
    # machine
    device: str = Field(
        "auto",
        description="auto | cpu | cuda | cuda:N | mps; auto = CUDA when torch sees a GPU, else the CPU.",
    )
    threads: int | None = Field(None, ge=1, description="Torch threads; None = probe 1 vs all cores (CPU).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="bf16 = autocast matmuls to bfloat16; auto = bf16 where the device does it natively.",
    )
    # checkpoints and logging
    checkpoint_every: int | None = Field(
        None,
        ge=1,
        description="Also checkpoint every this many steps for resumption (None = eval steps only).",
    )
    log_every: int | None = Field(None, ge=1, description="Metrics row every this many steps (None = auto).")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ProtomemError(validation_message(exc)) from None

    @field_validator("device")
    @classmethod
    def _check_device(cls, device: str) -> str:
        if not re.match(DEVICE_PATTERN, device):
            raise ValueError(f"must be {DEVICE_CHOICES}")
        return device

    @model_validator(mode="after")
    def _check_consistency(self) -> DiffusionConfig:
        _check_sizes(self)
        if self.model == "tree_unet":
            depth = tree_depth(self.seq_len, self.branching)
            if depth is None:
                raise ValueError(
                    f"seq_len={self.seq_len} does not fit the tree U-Net: it must be branching**k "
                    f"(branching={self.branching}: e.g. "
                    f"{', '.join(str(self.branching**k) for k in (1, 2, 3, 4))})"
                )
        if self.model == "transformer" and self.width % self.n_heads:
            raise ValueError(f"width={self.width} is not divisible by n_heads={self.n_heads}")
        if self.eval_steps is not None:
            bad = [s for s in self.eval_steps if not 1 <= s <= self.steps]
            if bad:
                raise ValueError(f"eval_steps {bad} lie outside 1..steps={self.steps}")
        if (
            self.process == "uniform"
            and self.sampling_steps is not None
            and self.sampling_steps > self.timesteps
        ):
            raise ValueError(
                f"sampling_steps={self.sampling_steps} exceeds timesteps={self.timesteps} (uniform process)"
            )
        return self

    @property
    def tree_depth(self) -> int | None:
        """L such that seq_len = branching**L, or None."""
        return tree_depth(self.seq_len, self.branching)

    def resolved_sampling_steps(self) -> int:
        return self.sampling_steps if self.sampling_steps is not None else self.timesteps

    def resolved_eval_steps(self) -> list[int]:
        """Sorted distinct evaluation steps; always includes the final step."""
        if self.eval_steps is not None:
            steps = set(self.eval_steps)
        else:
            steps = {
                int(round(math.exp(math.log(self.steps) * i / max(self.n_evals - 1, 1))))
                for i in range(self.n_evals)
            }
        steps.add(self.steps)
        return sorted(s for s in steps if 1 <= s <= self.steps)

    def resolved_precision(self, device: torch.device | None = None) -> str:
        """'bf16' or 'fp32' on ``device`` (None = the CPU): auto picks bf16 where the device multiplies
        bfloat16 natively (a CPU with AVX512-BF16 / AMX, a CUDA GPU with bf16 support).

        On such a CPU bf16 autocast trains ~1.5x faster and gave the same memorization curve as fp32 in a
        paired run (docs/diffusion.md); elsewhere bf16 is emulated and slow, so auto falls back to fp32.
        """
        if self.precision != "auto":
            return self.precision
        import torch

        from protomem.diffusion.device import native_bf16

        return "bf16" if native_bf16(device if device is not None else torch.device("cpu")) else "fp32"

    def resolved_log_every(self) -> int:
        return self.log_every if self.log_every is not None else max(1, self.steps // 200)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)


def _check_sizes(config: DiffusionConfig) -> None:
    """The sizes a config asks for, against the limits of :mod:`protomem.limits` (before any allocation)."""
    from protomem import limits

    limits.VOCAB.check(config.vocab_size, "vocab_size")
    limits.VOCAB.check(config.n_classes, "n_classes")
    limits.STRING_TOKENS.check(config.seq_len, "seq_len")
    limits.TIMESTEPS.check(config.timesteps, "timesteps")
    limits.TIMESTEPS.check(config.sampling_steps or 0, "sampling_steps")
    limits.LAYERS.check(config.n_layers, "n_layers")
    limits.LAYERS.check(config.blocks_per_level, "blocks_per_level")
    limits.EVALUATIONS.check(config.n_evals, "n_evals")
    limits.EVALUATIONS.check(len(config.eval_steps or ()), "eval_steps")
    for name in ("batch_size", "eval_samples"):
        limits.TOTAL_TOKENS.check(getattr(config, name) * config.seq_len, f"{name} x seq_len")


def tree_depth(seq_len: int, branching: int) -> int | None:
    """k >= 1 with branching**k == seq_len, else None."""
    depth, n = 0, 1
    while n < seq_len:
        n *= branching
        depth += 1
    return depth if n == seq_len and depth >= 1 else None


def validation_message(exc: ValidationError) -> str:
    """One line naming each offending field: 'lr: must be > 0 (got -1); bogus: unknown key'."""
    parts = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"]) or "config"
        if error["type"] == "extra_forbidden":
            parts.append(f"{field}: unknown key")
            continue
        message = error["msg"].removeprefix("Value error, ")
        if "input" in error and error["type"] not in ("missing",) and not isinstance(error["input"], dict):
            message += f" (got {error['input']!r})"
        parts.append(f"{field}: {message}")
    return "invalid diffusion config: " + "; ".join(parts)


def config_from_dict(doc: object, path: str | os.PathLike | None = None) -> DiffusionConfig:
    """Validate a mapping (e.g. parsed YAML) into a DiffusionConfig; errors name ``path``."""
    if not isinstance(doc, dict):
        raise ProtomemError("a diffusion config must be a mapping of field: value", path=path)
    try:
        return DiffusionConfig.model_validate(doc)
    except ValidationError as exc:
        raise ProtomemError(validation_message(exc), path=path) from None
    except ProtomemError as exc:  # raised by DiffusionConfig.__init__, which pydantic may call here
        raise ProtomemError(exc.message, path=path) from None


def load_config(path: str | os.PathLike, **overrides: Any) -> DiffusionConfig:
    """Read a YAML config file; keyword ``overrides`` (e.g. from CLI flags) replace its values."""
    path = Path(path)
    if not path.is_file():
        raise ProtomemError("no such config file", path=path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ProtomemError(f"not valid YAML ({exc})", path=path) from None
    doc = {} if doc is None else doc
    if not isinstance(doc, dict):
        raise ProtomemError("a diffusion config must be a mapping of field: value", path=path)
    doc.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_dict(doc, path=path)
