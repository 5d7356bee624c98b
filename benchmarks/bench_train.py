"""Training and sampling speed of the diffusion denoisers, against a plain Conv1d tree U-Net.

Prints, for the tree U-Net (width 256 and 1024) and the transformer (two widths): training
sequences/second (batch 64, uniform process, T = 200), the achieved GFLOP/s (FLOPs counted by torch's
FlopCounterMode over forward + backward) next to this machine's measured matmul GFLOP/s in fp32 and bf16,
sampling sequences/second (200 steps), and -- for the tree U-Net -- the ratio to a straightforward
Conv1d / ConvTranspose1d implementation of the same network timed in the same run. Both precisions
(fp32 and bf16 autocast) are timed. Ratios are the figures to compare across machines and loads.

    python benchmarks/bench_train.py            # full (a few minutes)
    python benchmarks/bench_train.py --quick    # smaller timings, for a smoke test
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from machine import describe
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from protomem.diffusion import DiffusionConfig, build_process, count_parameters
from protomem.diffusion.models import TreeUNet
from protomem.diffusion.sampling import sample_tokens, seeded_generator
from protomem.diffusion.trainer import Trainer, probe_threads

BATCH = 64
TIMESTEPS = 200


class ConvTreeUNet(nn.Module):
    """The same network as TreeUNet written the straightforward way: Conv1d / ConvTranspose1d on (B, W, n).

    Built from a TreeUNet, whose weights it copies, so both compute the same function. (Our transposed
    convolution has a bias per output position, s * W numbers instead of W; the reference's bias is
    repeated into it before copying, so the two agree exactly.)
    """

    def __init__(self, reference: TreeUNet, branching: int) -> None:
        super().__init__()
        width = reference.embedding.embedding_dim
        self.depth = reference.depth
        self.embedding = reference.embedding
        self.conditioning = reference.conditioning
        self.down = nn.ModuleList(
            nn.Conv1d(width, width, branching, stride=branching) for _ in range(self.depth)
        )
        self.up = nn.ModuleList(
            nn.ConvTranspose1d(width, width, branching, stride=branching) for _ in range(self.depth)
        )
        self.merge = nn.ModuleList(nn.Conv1d(2 * width, width, 1) for _ in range(self.depth))
        self.down_norm, self.up_norm = reference.down_norm, reference.up_norm
        self.out_norm, self.head = reference.out_norm, reference.head
        with torch.no_grad():
            for level in range(self.depth):
                ours = reference.down[level].linear
                self.down[level].weight.copy_(ours.weight.reshape(width, branching, width).permute(0, 2, 1))
                self.down[level].bias.copy_(ours.bias)
                ours = reference.up[level].linear
                self.up[level].weight.copy_(ours.weight.reshape(branching, width, width).permute(2, 1, 0))
                ours.bias.copy_(ours.bias[:width].repeat(branching))
                self.up[level].bias.copy_(ours.bias[:width])
                merge = torch.cat(
                    [reference.merge_up[level].weight, reference.merge_skip[level].weight], dim=1
                )
                self.merge[level].weight.copy_(merge[:, :, None])
                self.merge[level].bias.copy_(reference.merge_skip[level].bias)

    @staticmethod
    def _norm(norm: nn.LayerNorm, h: torch.Tensor) -> torch.Tensor:
        return norm(h.transpose(1, 2)).transpose(1, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        cond = self.conditioning(t, classes)[:, :, None]  # (B, W, 1)
        h = self.embedding(x).transpose(1, 2)  # (B, W, N)
        skips = []
        for level in range(self.depth):
            skips.append(h)
            h = F.gelu(self._norm(self.down_norm[level], self.down[level](h) + cond))
        for level in reversed(range(self.depth)):
            h = self.merge[level](torch.cat([self.up[level](h), skips[level]], dim=1))
            h = F.gelu(self._norm(self.up_norm[level], h + cond))
        return self.head(self.out_norm(h.transpose(1, 2))).float()


def check_same_function(ours: nn.Module, conv: nn.Module) -> None:
    x, t = torch.randint(0, 8, (16, 8)), torch.rand(16)
    torch.testing.assert_close(ours(x, t), conv(x, t), rtol=1e-4, atol=1e-4)


def matmul_gflops(dtype: torch.dtype, n: int = 1024, seconds: float = 0.5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def config_for(model: str, width: int, precision: str) -> DiffusionConfig:
    return DiffusionConfig(
        vocab_size=8, seq_len=8, model=model, width=width, n_layers=4, n_heads=4, batch_size=BATCH,
        timesteps=TIMESTEPS, warmup_steps=0, threads=torch.get_num_threads(), precision=precision,
    )  # fmt: skip


def train_flops(trainer: Trainer) -> float:
    with FlopCounterMode(display=False) as counter:
        trainer.step(1)
    return float(counter.get_total_flops())


def time_training(trainer: Trainer, seconds: float) -> float:
    """Seconds per optimizer step (median of timed blocks, after warm-up)."""
    for k in range(3):
        trainer.step(2 + k)
    times, step = [], 10
    budget_start = time.perf_counter()
    while time.perf_counter() - budget_start < seconds or len(times) < 3:
        start = time.perf_counter()
        trainer.step(step)
        times.append(time.perf_counter() - start)
        step += 1
    times.sort()
    return times[len(times) // 2]


def time_sampling(model: nn.Module, config: DiffusionConfig, count: int, batch_size: int = 256) -> float:
    """Sequences per second when drawing ``count`` sequences with T = 200 denoising steps."""
    process = build_process(config)
    sample_tokens(model, process, config, 8, seeded_generator(0), sampling_steps=3)
    start = time.perf_counter()
    sample_tokens(model, process, config, count, seeded_generator(1), batch_size=batch_size)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Short timings (smoke test).")
    parser.add_argument("--threads", type=int, default=None, help="Torch threads (default: all cores).")
    args = parser.parse_args()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    seconds = 0.5 if args.quick else 3.0
    print(describe(threads))
    peak = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    print(f"matmul 1024^3: fp32 {peak['fp32']:.0f} GFLOP/s | bf16 {peak['bf16']:.0f} GFLOP/s")
    data = torch.randint(0, 8, (4096, 8), generator=torch.Generator().manual_seed(0))
    probe = probe_threads(config_for("tree_unet", 256, "fp32"), data, None)
    print(f"thread probe (tree U-Net width 256): {probe} thread(s) fastest right now")
    print()
    header = (
        f"{'model':<12}{'width':>6}{'params':>11}{'prec':>6}{'train seq/s':>13}{'GFLOP/s':>9}{'% peak':>8}"
        f"{'vs conv':>9}{'sample seq/s':>14}{'vs conv':>9}"
    )
    print(header)
    print("-" * len(header))
    cases = [("tree_unet", 256), ("tree_unet", 1024), ("transformer", 128), ("transformer", 512)]
    for model_name, width in cases:
        # 1024 strings for the reference comparison (tree U-Net width 256), fewer elsewhere
        sample_count = 1024 if (model_name, width) == ("tree_unet", 256) else (256 if width <= 256 else 64)
        if args.quick:
            sample_count //= 8
        conv_train = conv_sample = None
        for precision in ("fp32", "bf16"):
            config = config_for(model_name, width, precision)
            trainer = Trainer(config, data, None)
            flops = train_flops(trainer)
            step_seconds = time_training(trainer, seconds)
            train_rate = BATCH / step_seconds
            gflops = flops / step_seconds / 1e9
            sample_rate = time_sampling(trainer.model, config, sample_count)
            ratio_train = ratio_sample = ""
            if model_name == "tree_unet":
                if conv_train is None:  # the reference: plain Conv1d, fp32, same weights, same process
                    conv_trainer = Trainer(config.model_copy(update={"precision": "fp32"}), data, None)
                    reference = conv_trainer.model
                    conv_trainer.model = ConvTreeUNet(reference, config.branching)
                    check_same_function(reference, conv_trainer.model)
                    conv_trainer.optimizer = torch.optim.AdamW(conv_trainer.model.parameters(), lr=config.lr)
                    conv_trainer.params = list(conv_trainer.model.parameters())
                    conv_train = BATCH / time_training(conv_trainer, seconds)
                    conv_sample = time_sampling(conv_trainer.model, conv_trainer.config, sample_count)
                ratio_train = f"{train_rate / conv_train:.1f}x"
                ratio_sample = f"{sample_rate / conv_sample:.1f}x"
            print(
                f"{model_name:<12}{width:>6}{count_parameters(trainer.model):>11,}{precision:>6}"
                f"{train_rate:>13,.0f}{gflops:>9.0f}{100 * gflops / peak[precision]:>7.0f}%"
                f"{ratio_train:>9}{sample_rate:>14,.0f}{ratio_sample:>9}",
                flush=True,
            )
        if conv_train is not None:
            print(
                f"{'  conv ref':<12}{width:>6}{'':>11}{'fp32':>6}{conv_train:>13,.0f}{'':>9}{'':>8}"
                f"{'1.0x':>9}{conv_sample:>14,.0f}{'1.0x':>9}"
            )
    print()
    scale = 8 if args.quick else 1
    print(
        f"sampling: {TIMESTEPS} steps, batches of 256; {1024 // scale} sequences for the tree U-Net at "
        f"width 256, {256 // scale} for other widths <= 256, {64 // scale} above"
    )


if __name__ == "__main__":
    main()
