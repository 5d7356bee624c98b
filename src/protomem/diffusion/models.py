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

    def forward(
        self, t: torch.Tensor, classes: torch.Tensor | None, share_time: bool = False
    ) -> torch.Tensor:
        """(B, W); with ``share_time`` and t all equal, the time part is computed once: (1, W) without
        classes, else broadcast to (B, W)."""
        if share_time and t.shape[0] > 1 and bool((t == t[0]).all()):
            t = t[:1]
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

    Tree U-Nets (without residual blocks) then fold their weights once (see
    ``TreeUNet._inference_weights``) and reuse the folds for every forward pass of the block: the same
    function with fewer FLOPs. The folds are discarded on exit: weight versions cannot be trusted to
    detect updates (fused AdamW does not bump them).
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
    Without residual blocks, the level-0 convolution and skip merge of embedded tokens are computed as
    table lookups when the vocabulary is small (tables of V rows instead of a matmul over B*N rows: about
    40% fewer FLOPs at L = 3). Inside :func:`frozen_weights` without gradients (sampling), the merge's
    up-path half is also folded into the transposed convolution. Same function throughout.
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
        self.blocks_per_level = blocks_per_level
        self.embedding = nn.Embedding(n_input_tokens, width)
        self.conditioning = Conditioning(width, n_classes)
        self.down = nn.ModuleList(StrideConv(width, width, branching) for _ in range(depth))
        self.down_norm = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.up = nn.ModuleList(StrideConvTranspose(width, width, branching) for _ in range(depth))
        # The pointwise merge of [up-path, skip] (a Linear(2W, W) on their concatenation) kept as two halves,
        # so inference can fold the up-path half into the transposed convolution (see _inference_weights).
        self.merge_up = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(depth))
        self.merge_skip = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        # Weights folded for inference (see _inference_weights); only kept inside `frozen_weights(model)`.
        self._fused_cache: dict[str, torch.Tensor] | None = None
        self.up_norm = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.down_blocks = nn.ModuleList(
            nn.ModuleList(ResidualMLP(width) for _ in range(blocks_per_level)) for _ in range(depth)
        )
        self.up_blocks = nn.ModuleList(
            nn.ModuleList(ResidualMLP(width) for _ in range(blocks_per_level)) for _ in range(depth)
        )
        self.out_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)

    def _uses_tables(self, x: torch.Tensor) -> bool:
        """Level 0 by table lookups (see :meth:`_level0_tables`) when that is the cheaper way.

        Directly, the level-0 convolution and skip merge cost 2 * B*N * W^2 multiply-adds; the tables
        cost (s + 1) * V * W^2 to build. Not with residual blocks at level 0 (they sit in between).
        """
        stride, vocab = self.down[0].stride, self.embedding.num_embeddings
        return not self.blocks_per_level and (stride + 1) * vocab < 2 * x.numel()

    def _level0_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The level-0 convolution and skip merge of embedded tokens as tables (differentiable).

        -> ``down_table`` (s * V, W): row j*V + v = W_j E[v], plus the bias in the j = 0 rows, so the
        convolution of a parent is the sum of one row per child; ``skip_table`` (V, W): row v =
        merge_skip(E[v]). V = n_input_tokens, W_j the convolution's weight block for child j.
        """
        table = self.embedding.weight  # (V, W)
        down = self.down[0].linear
        stride, width = self.down[0].stride, table.shape[1]
        per_child = torch.matmul(table, down.weight.reshape(width, stride, width).permute(1, 2, 0))
        per_child = torch.cat([per_child[:1] + down.bias, per_child[1:]])  # (s, V, W)
        return per_child.reshape(-1, width), self.merge_skip[0](table)

    def _level0(
        self, x: torch.Tensor, down_table: torch.Tensor, skip_table: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens x (B, N) -> level-0 convolution (B, N/s, W) and skip merge (B, N, W), by lookups."""
        stride = self.down[0].stride
        offsets = torch.arange(stride, device=x.device) * self.embedding.num_embeddings
        down = F.embedding_bag(x.reshape(-1, stride) + offsets, down_table, mode="sum")
        return down.view(x.shape[0], x.shape[1] // stride, -1), F.embedding(x, skip_table)

    def forward(self, x: torch.Tensor, t: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        # Inside frozen_weights the folds are built once for many calls, so their cost does not matter;
        # only their size: up to 65,536 table rows (vocabularies of 32,768 tokens at s = 2).
        frozen = self._fused_cache is not None and not torch.is_grad_enabled()
        rows = self.down[0].stride * self.embedding.num_embeddings
        if frozen and not self.blocks_per_level and rows <= 1 << 16:
            return self._frozen_forward(x, t, classes)
        tables = self._uses_tables(x)
        cond = self.conditioning(t, classes)[:, None, :]  # (B, 1, W)
        skips = []  # per level: the skip connection, through merge_skip
        if tables:
            h, skip = self._level0(x, *self._level0_tables())
            skips.append(skip)
            h = F.gelu(self.down_norm[0](h + cond))
        else:
            h = self.embedding(x)  # (B, N, W)
        for level in range(len(skips), self.depth):
            for block in self.down_blocks[level]:
                h = block(h, cond[:, 0])
            skips.append(self.merge_skip[level](h))
            h = F.gelu(self.down_norm[level](self.down[level](h) + cond))  # (B, n/s, W)
        for level in reversed(range(self.depth)):
            h = self.merge_up[level](self.up[level](h))  # (B, n*s, W)
            h = F.gelu(self.up_norm[level](skips[level] + h + cond))
            for block in self.up_blocks[level]:
                h = block(h, cond[:, 0])
        return self.head(self.out_norm(h)).float()

    def _inference_weights(self) -> dict[str, torch.Tensor]:
        """Weights folded for inference, computed once per :func:`frozen_weights` block, in the autocast
        dtype active at the first call (bf16 under bf16 autocast, else fp32).

        The level-0 tables of :meth:`_level0_tables`, and per level ``up{l}`` (s*W, W), ``up_bias{l}``
        (s*W,): merge_up(up(x)) per child as one transposed convolution. With U_j, c_j the transposed
        convolution's weight and bias for child j and A the merge's up-path half, child j =
        A (U_j x + c_j) = (A U_j) x + A c_j. Above level 0 the skip merge's bias is added in as well.
        Only called inside :func:`frozen_weights`, which empties the cache on entry and drops it on exit,
        so a fold can never outlive the weights it was computed from.
        """
        folds = self._fused_cache
        assert folds is not None
        if folds:
            return folds
        device_type = self.head.weight.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else torch.float32
        with torch.no_grad(), torch.autocast(device_type, enabled=False):
            folds["down_table"], folds["skip_table"] = self._level0_tables()
            stride, width = self.down[0].stride, self.head.in_features
            for level in range(self.depth):
                up, merge = self.up[level].linear, self.merge_up[level]
                folds[f"up{level}"] = (merge.weight @ up.weight.reshape(stride, width, width)).reshape(
                    -1, width
                )
                up_bias = up.bias.reshape(stride, width) @ merge.weight.T
                if level > 0:
                    up_bias = up_bias + self.merge_skip[level].bias
                folds[f"up_bias{level}"] = up_bias.reshape(-1)
                down = self.down[level].linear
                folds[f"down{level}"], folds[f"down_bias{level}"] = down.weight, down.bias
                folds[f"skip{level}"] = self.merge_skip[level].weight
                for name in ("down_norm", "up_norm"):
                    norm = getattr(self, name)[level]
                    folds[f"{name}{level}"], folds[f"{name}_bias{level}"] = norm.weight, norm.bias
            folds["out_norm"], folds["out_norm_bias"] = self.out_norm.weight, self.out_norm.bias
            folds["head"], folds["head_bias"] = self.head.weight, self.head.bias
            for name, tensor in folds.items():
                folds[name] = tensor.detach().to(dtype).contiguous()
        return folds

    def _frozen_forward(self, x: torch.Tensor, t: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
        """The function of :meth:`forward` with the folded weights of :meth:`_inference_weights`.

        Runs in the folds' dtype with autocast off (weights cast once, not at every call). When the whole
        batch shares one time and no classes (sampling), the conditioning is one vector, folded into the
        biases; the skip merge accumulates into the transposed convolution's output buffer.
        """
        w = self._inference_weights()
        with torch.autocast(x.device.type, enabled=False):
            cond = self.conditioning(t, classes, share_time=True).to(w["head"].dtype)  # (B or 1, W)
            shared = cond.shape[0] == 1
            stride, width = self.down[0].stride, cond.shape[1]
            eps = self.out_norm.eps

            def norm_gelu(h: torch.Tensor, name: str, level: int) -> torch.Tensor:
                return F.gelu(F.layer_norm(h, (width,), w[f"{name}{level}"], w[f"{name}_bias{level}"], eps))

            def with_cond(bias: torch.Tensor, copies: int = 1) -> torch.Tensor:
                return bias + cond[0].repeat(copies) if shared else bias

            h, skip0 = self._level0(x, w["down_table"], w["skip_table"])
            level_inputs = [x]  # the input of every level, for its skip connection
            h = norm_gelu(h + cond[:, None, :], "down_norm", 0)
            for level in range(1, self.depth):
                level_inputs.append(h)
                b, m, _ = h.shape
                h = h.reshape(b, m // stride, stride * width)
                h = F.linear(h, w[f"down{level}"], with_cond(w[f"down_bias{level}"]))
                h = norm_gelu(h if shared else h + cond[:, None, :], "down_norm", level)
            for level in reversed(range(self.depth)):
                b, m, _ = h.shape
                bias = with_cond(w[f"up_bias{level}"], stride)
                out = torch.addmm(bias, h.reshape(b * m, width), w[f"up{level}"].T).view(b, m * stride, width)
                if level == 0:
                    out += skip0
                else:  # accumulate the skip merge into the same buffer
                    out.view(-1, width).addmm_(level_inputs[level].reshape(-1, width), w[f"skip{level}"].T)
                h = norm_gelu(out if shared else out + cond[:, None, :], "up_norm", level)
            h = F.layer_norm(h, (width,), w["out_norm"], w["out_norm_bias"], eps)
            return F.linear(h, w["head"], w["head_bias"]).float()


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
    """The denoiser named by ``config.model``, on the CPU, initialised from the global torch RNG (the
    same initial weights whatever device it later moves to).

    Its size is checked first against :data:`protomem.limits.MODEL_PARAMETERS` (on the meta device, so a
    config asking for a trillion parameters is refused without allocating them).
    """
    check_model_size(config, n_input_tokens)
    return _build(config, n_input_tokens)


def check_model_size(config: DiffusionConfig, n_input_tokens: int) -> int:
    """Parameters of the denoiser ``config`` describes (counted without allocating any), or a one-line
    error if over the limit."""
    from protomem import limits

    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        count = count_parameters(_build(config, n_input_tokens))
    limits.MODEL_PARAMETERS.check(count, f"a {config.model} of width {config.width}")
    return count


def _build(config: DiffusionConfig, n_input_tokens: int) -> nn.Module:
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
