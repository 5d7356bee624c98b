"""Training and sampling speed of the diffusion denoisers, against a plain Conv1d tree U-Net.

Prints, for the tree U-Net (width 256 and 1024) and the transformer (two widths): training
sequences/second (batch 64, uniform process, T = 200), the achieved GFLOP/s (FLOPs counted by torch's
FlopCounterMode over forward + backward) next to this machine's measured matmul GFLOP/s in fp32 and bf16,
sampling sequences/second (200 steps), and -- for the tree U-Net -- the ratio to a straightforward
Conv1d / ConvTranspose1d implementation of the same network timed in the same run. Both precisions
(fp32 and bf16 autocast) are timed. Ratios are the figures to compare across machines and loads.

    python benchmarks/bench_train.py            # full (a few minutes)
    python benchmarks/bench_train.py --quick    # smaller timings, for a smoke test
    python benchmarks/bench_train.py --compile  # also torch.compile'd tree U-Nets (bf16, training only)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from machine import describe
from torch import nn

from protomem.diffusion import DiffusionConfig, count_parameters
from protomem.diffusion.cost import train_step_flops
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


def time_training(trainers: dict[str, Trainer], seconds: float) -> dict[str, float]:
    """Seconds per optimizer step of each trainer (median), timed in alternation so load drifts cancel."""
    for trainer in trainers.values():
        for k in range(3):
            trainer.step(2 + k)
    times: dict[str, list[float]] = {name: [] for name in trainers}
    step, budget_start = 10, time.perf_counter()
    while time.perf_counter() - budget_start < seconds * len(trainers) or step < 13:
        for name, trainer in trainers.items():
            start = time.perf_counter()
            trainer.step(step)
            times[name].append(time.perf_counter() - start)
        step += 1
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def time_sampling(trainers: dict[str, Trainer], count: int, batch_size: int = 256) -> dict[str, float]:
    """Sequences per second of each model drawing ``count`` sequences with T = 200 steps, in alternating
    batches."""
    elapsed = dict.fromkeys(trainers, 0.0)
    for trainer in trainers.values():
        config = trainer.config
        sample_tokens(trainer.model, trainer.process, config, 8, seeded_generator(0), sampling_steps=3)
    for start in range(0, count, batch_size):
        size = min(batch_size, count - start)
        for name, trainer in trainers.items():
            begin = time.perf_counter()
            sample_tokens(
                trainer.model, trainer.process, trainer.config, size, seeded_generator(start), batch_size=size
            )
            elapsed[name] += time.perf_counter() - begin
    return {name: count / seconds for name, seconds in elapsed.items()}


def conv_reference(config: DiffusionConfig, data: torch.Tensor) -> Trainer:
    """A trainer whose model is the plain Conv1d tree U-Net (fp32), same weights, same process."""
    trainer = Trainer(config.model_copy(update={"precision": "fp32"}), data, None)
    reference = trainer.model
    trainer.model = ConvTreeUNet(reference, config.branching)
    check_same_function(reference, trainer.model)
    trainer.optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=config.lr)
    trainer.params = list(trainer.model.parameters())
    return trainer


def compiled_trainer(config: DiffusionConfig, data: torch.Tensor) -> tuple[Trainer, float]:
    """A trainer whose tree U-Net is torch.compile'd (inductor, C++ wrapper, static shapes), and the seconds
    its first step took (the compilation; less on a warm inductor cache)."""
    import torch._inductor.config as inductor_config

    inductor_config.cpp_wrapper = True  # the C++ wrapper: measured ~5% faster than the Python one here
    trainer = Trainer(config, data, None)
    trainer.model = torch.compile(trainer.model, dynamic=False)
    start = time.perf_counter()
    trainer.step(1)
    return trainer, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Short timings (smoke test).")
    parser.add_argument(
        "--compile", action="store_true", help="Also time torch.compile'd tree U-Nets (bf16, training only)."
    )
    parser.add_argument("--threads", type=int, default=None, help="Torch threads (default: all cores).")
    args = parser.parse_args()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    seconds = 0.5 if args.quick else 2.0
    print(describe(threads))
    data = torch.randint(0, 8, (4096, 8), generator=torch.Generator().manual_seed(0))
    probe = probe_threads(config_for("tree_unet", 256, "fp32"), data, None)
    print(f"thread probe (tree U-Net width 256): {probe} thread(s) fastest right now")
    print("peak = matmul 1024^3 GFLOP/s measured just before each model's timings (the load drifts)")
    print()
    header = (
        f"{'model':<12}{'width':>6}{'params':>11}{'prec':>6}{'train seq/s':>13}{'GFLOP/s':>9}{'peak':>6}"
        f"{'% peak':>8}{'vs conv':>9}{'sample seq/s':>14}{'vs conv':>9}"
    )
    print(header)
    print("-" * len(header))
    compile_seconds: dict[int, float] = {}
    cases = [("tree_unet", 256), ("tree_unet", 1024), ("transformer", 128), ("transformer", 512)]
    for model_name, width in cases:
        # 1024 strings for the reference comparison (tree U-Net width 256), fewer elsewhere
        sample_count = 1024 if (model_name, width) == ("tree_unet", 256) else (256 if width <= 256 else 64)
        if args.quick:
            sample_count //= 8
        peak = {
            "fp32": matmul_gflops(torch.float32, seconds=0.3),
            "bf16": matmul_gflops(torch.bfloat16, seconds=0.3),
        }
        trainers = {p: Trainer(config_for(model_name, width, p), data, None) for p in ("fp32", "bf16")}
        flops = train_step_flops(trainers["fp32"])
        if model_name == "tree_unet":
            trainers["conv"] = conv_reference(trainers["fp32"].config, data)
            if args.compile:
                trainers["compiled"], compile_seconds[width] = compiled_trainer(trainers["bf16"].config, data)
        step_seconds = time_training(trainers, seconds)
        # compiled for training shapes only: sampling (other batch sizes, no grad) would recompile
        sample_rates = time_sampling({k: v for k, v in trainers.items() if k != "compiled"}, sample_count)
        for name in trainers:
            precision = {"conv": "fp32", "compiled": "bf16"}.get(name, name)
            label = {"conv": "  conv ref", "compiled": "  compiled"}.get(name, model_name)
            train_rate = BATCH / step_seconds[name]
            gflops = flops / step_seconds[name] / 1e9
            ratio_train = ratio_sample = ""
            sample_rate = f"{sample_rates[name]:,.0f}" if name in sample_rates else "-"
            if "conv" in trainers:
                ratio_train = f"{step_seconds['conv'] / step_seconds[name]:.1f}x"
                if name in sample_rates:
                    ratio_sample = f"{sample_rates[name] / sample_rates['conv']:.1f}x"
            print(
                f"{label:<12}{width:>6}{count_parameters(trainers[name].model):>11,}{precision:>6}"
                f"{train_rate:>13,.0f}{gflops:>9.0f}{peak[precision]:>6.0f}"
                f"{100 * gflops / peak[precision]:>7.0f}%"
                f"{ratio_train:>9}{sample_rate:>14}{ratio_sample:>9}",
                flush=True,
            )
    print()
    scale = 8 if args.quick else 1
    print(
        f"sampling: {TIMESTEPS} steps, batches of 256; {1024 // scale} sequences for the tree U-Net at "
        f"width 256, {256 // scale} for other widths <= 256, {64 // scale} above. "
        "GFLOP/s: FlopCounterMode's count of one training step / the median step time."
    )
    for width, compile_time in compile_seconds.items():
        print(f"compiled tree U-Net width {width}: first step (compilation) {compile_time:.1f} s")


if __name__ == "__main__":
    main()
