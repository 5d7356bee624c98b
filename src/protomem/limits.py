"""Resource limits: sizes a user file or flag may ask for, checked before anything is allocated.

A small file can ask for a huge allocation (a grammar whose strings have 2^1000 tokens, a sweep grid of
10^12 points, a token id of 2^31 that makes the vocabulary 2^31 wide). Every such size is checked
against one of the limits below first, and a request over a limit is a one-line error naming the limit
and the environment variable that raises it::

    error: data.jsonl: vocabulary of 2,147,483,648 tokens exceeds the limit of 65,536 (raise it with
    PROTOMEM_MAX_VOCAB=N)

The defaults are far above what the study and the examples need and far below what would exhaust a
workstation's memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from protomem.errors import ProtomemError


@dataclass(frozen=True)
class Limit:
    """One limit: ``unit`` names what is counted, ``env`` the variable that overrides ``default``."""

    unit: str
    env: str
    default: int

    def value(self) -> int:
        """The limit in force: ``$env`` if set (a positive integer), else the default."""
        text = os.environ.get(self.env)
        if text is None or not text.strip():
            return self.default
        try:
            value = int(text.replace("_", ""))
        except ValueError:
            value = 0
        if value < 1:
            raise ProtomemError(f"{self.env} must be a positive integer, got {text!r}")
        return value

    def check(self, amount: int, what: str, path: object | None = None, where: str | None = None) -> None:
        """Raise :class:`ProtomemError` if ``amount`` (of ``what``) exceeds the limit."""
        limit = self.value()
        if amount > limit:
            raise ProtomemError(
                f"{what}: {amount:,} {self.unit} exceeds the limit of {limit:,} (raise it with {self.env}=N)",
                path=path,
                where=where,
            )


STRING_TOKENS = Limit("tokens", "PROTOMEM_MAX_STRING_TOKENS", 1 << 16)
"""Tokens in one string (a grammar's s^L, a line of a strings file, a model's sequence length, a sequence
or text document an audit reads)."""

TOTAL_TOKENS = Limit("tokens", "PROTOMEM_MAX_TOTAL_TOKENS", 1 << 27)
"""Tokens in one strings file, one draw of strings, or one training batch."""

VOCAB = Limit("symbols", "PROTOMEM_MAX_VOCAB", 1 << 16)
"""Vocabulary size (token ids are 0..vocab-1), also a grammar's symbols and classes per level."""

GRAMMAR_TUPLES = Limit("tuples", "PROTOMEM_MAX_GRAMMAR_TUPLES", 1 << 24)
"""vocab_size ** branching: the lookup table a grammar builds per level."""

MODEL_PARAMETERS = Limit("parameters", "PROTOMEM_MAX_PARAMETERS", 1 << 28)
"""Parameters of a denoiser (fp32 weights, gradients and two AdamW moments: 16 bytes each)."""

TIMESTEPS = Limit("steps", "PROTOMEM_MAX_TIMESTEPS", 1 << 20)
"""Discrete diffusion steps (the uniform process keeps per-step tables)."""

LAYERS = Limit("layers", "PROTOMEM_MAX_LAYERS", 1024)
"""Transformer blocks, or extra residual blocks per tree level, of a denoiser."""

EVALUATIONS = Limit("evaluations", "PROTOMEM_MAX_EVALUATIONS", 10_000)
"""Evaluation steps of one training run (each writes a checkpoint)."""

SWEEP_POINTS = Limit("points", "PROTOMEM_MAX_SWEEP_POINTS", 10_000)
"""Points of one sweep (grid products plus listed points), counted before the grid is expanded."""

IMAGE_PIXELS = Limit("pixels", "PROTOMEM_MAX_IMAGE_PIXELS", 1 << 26)
"""Pixels (height x width) of one image an audit reads; checked on the header, before decoding."""

TEXT_BYTES = Limit("bytes", "PROTOMEM_MAX_TEXT_BYTES", 64 << 20)
"""Size of a JSON or YAML document read whole (configs, grammars, sweep files, run records)."""

YAML_NODES = Limit("nodes", "PROTOMEM_MAX_YAML_NODES", 1_000_000)
"""Values in a YAML document once its aliases are expanded (a 'billion laughs' file has 10^9)."""

ALL = (
    STRING_TOKENS,
    TOTAL_TOKENS,
    VOCAB,
    GRAMMAR_TUPLES,
    MODEL_PARAMETERS,
    TIMESTEPS,
    LAYERS,
    EVALUATIONS,
    SWEEP_POINTS,
    IMAGE_PIXELS,
    TEXT_BYTES,
    YAML_NODES,
)
