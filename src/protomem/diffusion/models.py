"""Denoisers: a tree U-Net that mirrors the grammar, and a small bidirectional transformer.

Every denoiser maps noisy tokens to logits of the clean tokens::

    model(x_t: (B, N) int64 in [0, n_input_tokens), t: (B,) float in [0, 1], classes: (B,) int64 | None)
        -> logits (B, N, vocab_size) float32

``n_input_tokens`` is ``vocab_size`` for the uniform process and ``vocab_size + 1`` (the mask token) for
the masked process. ``t`` is the diffusion time as a fraction of the way to pure noise.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from protomem.diffusion.config import DiffusionConfig


def time_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of diffusion time. t: (B,) in [0, 1] -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = (1000.0 * t.float())[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class Conditioning(nn.Module):
    """Time (and class) embedding: (B,) t, (B,) classes -> (B, width)."""

    def __init__(self, width: int, n_classes: int, n_features: int = 64) -> None:
        super().__init__()
        self.n_features = n_features
        self.mlp = nn.Sequential(nn.Linear(n_features, width), nn.SiLU(), nn.Linear(width, width))
        self.class_embedding = nn.Embedding(n_classes, width) if n_classes > 0 else None

    def forward(self, t: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
        cond = self.mlp(time_features(t, self.n_features))
        if self.class_embedding is not None:
            if classes is None:
                raise ValueError("this model is class-conditional: pass classes")
            cond = cond + self.class_embedding(classes)
        return cond


class StrideConv(nn.Module):
    """Conv1d with kernel = stride = s on channels-last input, as one matmul.

    (B, n, W_in) -> (B, n/s, W_out). A convolution whose kernel equals its stride sees disjoint blocks of
    s positions, so it is exactly "reshape each block to s*W_in features, then a Linear". Weight layout:
    ``linear.weight[o, j * W_in + c] == conv1d.weight[o, c, j]``.
    """

    def __init__(self, in_width: int, out_width: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.linear = nn.Linear(stride * in_width, out_width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, n, w = h.shape
        return self.linear(h.reshape(b, n // self.stride, self.stride * w))


class StrideConvTranspose(nn.Module):
    """ConvTranspose1d with kernel = stride = s on channels-last input, as one matmul.

    (B, n, W_in) -> (B, n*s, W_out). Each input position emits s output positions independently:
    ``linear.weight[j * W_out + o, c] == conv_transpose1d.weight[c, o, j]``; bias repeats per position.
    """

    def __init__(self, in_width: int, out_width: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.out_width = out_width
        self.linear = nn.Linear(in_width, stride * out_width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, n, _ = h.shape
        return self.linear(h).reshape(b, n * self.stride, self.out_width)


class ResidualMLP(nn.Module):
    """Pre-norm position-wise MLP block with the conditioning added: (B, n, W) -> (B, n, W)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(F.gelu(self.fc1(self.norm(h + cond[:, None, :]))))


@contextlib.contextmanager
def frozen_weights(model: nn.Module) -> Iterator[None]:
    """Promise that ``model``'s weights do not change inside the block (e.g. while sampling).

    Tree U-Nets then fold each level's up-path merge into its transposed convolution once and reuse it
    for every forward pass of the block (same function, one matmul fewer). The folds are discarded on
    exit: weight versions cannot be trusted to detect updates (fused AdamW does not bump them).
    """
    nets = [module for module in model.modules() if isinstance(module, TreeUNet)]
    for net in nets:
        net._fused_cache = {}
    try:
        yield
    finally:
        for net in nets:
            net._fused_cache = None


class TreeUNet(nn.Module):
    """U-Net over the s-ary tree of a length-s^L sequence.

    Going down, level by level, a kernel=stride=s convolution merges s sibling positions into their
    parent (N -> N/s -> ... -> 1); going up, a transposed convolution splits each node into its s
    children, and a pointwise layer merges the result with the skip connection from the same resolution.
    After every convolution: + time/class embedding, LayerNorm, GELU. ``blocks_per_level`` adds residual
    MLP blocks at each resolution on the way down and up.

    Parameters (large matrices): 3 * L * 2 * W^2 (down conv, transposed conv, skip merge) + embeddings.
    Without gradients (sampling) the merge's up-path half is folded into the transposed convolution,
    which computes the same function with a quarter fewer FLOPs.
    """

    def __init__(
        self,
        vocab_size: int,
        n_input_tokens: int,
        seq_len: int,
        branching: int,
        width: int,
        n_classes: int = 0,
        blocks_per_level: int = 0,
    ) -> None:
        super().__init__()
        depth = 0
        while branching**depth < seq_len:
            depth += 1
        if branching**depth != seq_len or depth < 1:
            raise ValueError(f"seq_len {seq_len} is not a power of branching {branching}")
        self.depth = depth
        self.embedding = nn.Embedding(n_input_tokens, width)
        self.conditioning = Conditioning(width, n_classes)
        self.down = nn.ModuleList(StrideConv(width, width, branching) for _ in range(depth))
        self.down_norm = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.up = nn.ModuleList(StrideConvTranspose(width, width, branching) for _ in range(depth))
        # The pointwise merge of [up-path, skip] (a Linear(2W, W) on their concatenation) kept as two halves,
        # so inference can fold the up-path half into the transposed convolution (see _fused_up).
        self.merge_up = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(depth))
        self.merge_skip = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        # Folded up-path weights, per level; only kept inside `frozen_weights(model)` (see there).
        self._fused_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.up_norm = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.down_blocks = nn.ModuleList(
            nn.ModuleList(ResidualMLP(width) for _ in range(blocks_per_level)) for _ in range(depth)
        )
        self.up_blocks = nn.ModuleList(
            nn.ModuleList(ResidualMLP(width) for _ in range(blocks_per_level)) for _ in range(depth)
        )
        self.out_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)

    def _fused_up(self, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight (s*W, W) and bias (s*W,) of x -> merge_up(up(x)) per child, cached per level.

        With U_j, c_j the transposed conv's weight/bias for child j and A the merge's up-path half:
        child j = A (U_j x + c_j) = (A U_j) x + A c_j. Only called inside :func:`frozen_weights`, which
        empties the cache on entry and drops it on exit, so a cached fold can never outlive its weights.
        """
        assert self._fused_cache is not None
        cached = self._fused_cache.get(level)
        if cached is not None:
            return cached
        up, merge = self.up[level].linear, self.merge_up[level]
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            s, w = self.up[level].stride, merge.weight.shape[0]
            weight = torch.matmul(merge.weight, up.weight.reshape(s, w, -1)).reshape(s * w, -1)
            bias = torch.matmul(up.bias.reshape(s, w), merge.weight.T).reshape(s * w)
        self._fused_cache[level] = (weight, bias)
        return weight, bias

    def forward(self, x: torch.Tensor, t: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        cond = self.conditioning(t, classes)[:, None, :]  # (B, 1, W)
        h = self.embedding(x)  # (B, N, W)
        skips = []
        for level in range(self.depth):
            for block in self.down_blocks[level]:
                h = block(h, cond[:, 0])
            skips.append(h)
            h = F.gelu(self.down_norm[level](self.down[level](h) + cond))  # (B, n/s, W)
        fuse = self._fused_cache is not None and not torch.is_grad_enabled()
        for level in reversed(range(self.depth)):
            if fuse:  # same function, one matmul fewer: merge_up(up(h)) as a single transposed conv
                b, n, w = h.shape
                weight, bias = self._fused_up(level)
                h = F.linear(h, weight, bias).reshape(b, n * self.up[level].stride, w)
            else:
                h = self.merge_up[level](self.up[level](h))  # (B, n*s, W)
            h = self.merge_skip[level](skips[level]) + h
            h = F.gelu(self.up_norm[level](h + cond))
            for block in self.up_blocks[level]:
                h = block(h, cond[:, 0])
        return self.head(self.out_norm(h)).float()


class TransformerBlock(nn.Module):
    """Pre-norm bidirectional self-attention + MLP: (B, N, W) -> (B, N, W)."""

    def __init__(self, width: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, n, w = h.shape
        q, k, v = self.qkv(self.norm1(h)).reshape(b, n, 3, self.n_heads, w // self.n_heads).unbind(2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = h + self.proj(attn.transpose(1, 2).reshape(b, n, w))
        return h + self.fc2(F.gelu(self.fc1(self.norm2(h))))


class Transformer(nn.Module):
    """Small bidirectional transformer; time/class embedding added to every position's input."""

    def __init__(
        self,
        vocab_size: int,
        n_input_tokens: int,
        seq_len: int,
        width: int,
        n_layers: int,
        n_heads: int,
        n_classes: int = 0,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_input_tokens, width)
        self.position = nn.Parameter(torch.randn(seq_len, width) * 0.02)
        self.conditioning = Conditioning(width, n_classes)
        self.blocks = nn.ModuleList(TransformerBlock(width, n_heads) for _ in range(n_layers))
        self.out_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, x: torch.Tensor, t: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embedding(x) + self.position[None] + self.conditioning(t, classes)[:, None, :]
        for block in self.blocks:
            h = block(h)
        return self.head(self.out_norm(h)).float()


def build_model(config: DiffusionConfig, n_input_tokens: int) -> nn.Module:
    """The denoiser named by ``config.model``, initialised from the global torch RNG."""
    if config.model == "tree_unet":
        return TreeUNet(
            config.vocab_size,
            n_input_tokens,
            config.seq_len,
            config.branching,
            config.width,
            config.n_classes,
            config.blocks_per_level,
        )
    if config.model == "transformer":
        return Transformer(
            config.vocab_size,
            n_input_tokens,
            config.seq_len,
            config.width,
            config.n_layers,
            config.n_heads,
            config.n_classes,
        )
    raise ValueError(f"unknown model {config.model!r}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
