"""Training and sampling throughput of the diffusion denoisers on whatever device is present.

Run it where you mean to run a study: on a CPU-only machine it times the CPU; with a CUDA build of torch
and a GPU (docs/devices.md) it times the GPU (``--device cuda``, or ``auto``). Prints the machine line and
the device line first, then, per model and precision: training sequences/s and GFLOP/s (FLOPs counted by
torch's FlopCounterMode, as bench_train.py and ``study --plan`` count them), sampling sequences/s of
200-step sampling in batches of 512, and the seconds one step takes. The last rows are the paper preset's
models (width 1024, batch 256): their GFLOP/s is the figure to give ``protomem study --plan --gpu-tflops``.

    python benchmarks/bench_device.py                  # auto: CUDA if torch sees it, else the CPU
    python benchmarks/bench_device.py --device cuda:1  # a named device
    python benchmarks/bench_device.py --quick          # shorter timings (smoke test)
    python benchmarks/bench_device.py --threads 2      # CPU: torch threads (default 1; on a loaded
                                                       # machine more threads can be many times slower)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe  # noqa: E402

from protomem.diffusion import DiffusionConfig  # noqa: E402
from protomem.diffusion.cost import (  # noqa: E402
    make_trainer,
    time_sample_steps,
    time_train_steps,
    train_step_flops,
)
from protomem.diffusion.device import device_label, native_bf16, resolve_device  # noqa: E402

SAMPLING_STEPS = 200
SAMPLE_BATCH = 512

# (label, config fields): the issue-16 comparison task (v=8, n=8 tokens, batch 64, uniform, T = 200) at
# two widths, then the paper preset's two models (masked process, batch 256).
CASES = [
    ("tree U-Net, RHM L=3", dict(vocab_size=8, seq_len=8, width=256, batch_size=64, process="uniform")),
    ("tree U-Net, RHM L=3", dict(vocab_size=8, seq_len=8, width=1024, batch_size=64, process="uniform")),
    ("paper, small grammar", dict(vocab_size=8, seq_len=8, width=1024, batch_size=256, process="masked")),
    ("paper, large grammar", dict(vocab_size=16, seq_len=16, width=1024, batch_size=256, process="masked")),
]


def rate(per_second: float) -> str:
    """A throughput to three significant figures (a slow CPU samples width-1024 models at < 1 seq/s)."""
    return f"{per_second:,.0f}" if per_second >= 100 else f"{per_second:.3g}"


def device_line(device: torch.device) -> str:
    cuda = torch.version.cuda or "none (CPU build)"
    return (
        f"device | {device_label(device)} | torch {torch.__version__} | CUDA {cuda} | "
        f"native bf16: {'yes' if native_bf16(device) else 'no'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--quick", action="store_true", help="Shorter timings (smoke test).")
    parser.add_argument(
        "--threads", type=int, default=1, help="Torch threads (default 1, as a study's parallel conditions)."
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    threads = args.threads
    torch.set_num_threads(threads)
    print(describe(threads))
    print(device_line(device))
    precisions = ["fp32", "bf16"] if native_bf16(device) or device.type == "cuda" else ["fp32"]
    seconds = 0.3 if args.quick else 2.0
    header = (
        f"{'model':<22}{'width':>6}{'batch':>6}{'prec':>6}{'train seq/s':>13}{'s/step':>9}{'GFLOP/s':>9}"
        f"{'sample seq/s':>14}"
    )
    print(header)
    print("-" * len(header))
    for label, fields in CASES:
        for precision in precisions:
            config = DiffusionConfig(
                **fields, timesteps=SAMPLING_STEPS, warmup_steps=0, precision=precision, device=str(device)
            )
            trainer = make_trainer(config, device)
            flops = train_step_flops(trainer)
            step = time_train_steps(trainer, steps=3, first_step=2, min_seconds=seconds)
            batch = SAMPLE_BATCH // 8 if args.quick else SAMPLE_BATCH
            per_sequence_step = time_sample_steps(trainer, batch, steps=3, min_seconds=seconds / 2)
            print(
                f"{label:<22}{config.width:>6}{config.batch_size:>6}{precision:>6}"
                f"{rate(config.batch_size / step):>13}{step:>9.4f}{flops / step / 1e9:>9.1f}"
                f"{rate(1 / (per_sequence_step * SAMPLING_STEPS)):>14}",
                flush=True,
            )
    print()
    print(
        f"training: median optimizer step after warm-up; sampling: {SAMPLING_STEPS} denoising steps, "
        f"batches of {SAMPLE_BATCH if not args.quick else SAMPLE_BATCH // 8}; GFLOP/s: FlopCounterMode's "
        "count of a training step (matrix products) / its time"
    )


if __name__ == "__main__":
    main()
