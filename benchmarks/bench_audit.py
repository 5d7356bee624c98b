"""Audit speed and memory: the full ``protomem audit`` command against a faiss flat search in the same run.

    .venv/bin/python benchmarks/bench_audit.py                 # everything below
    .venv/bin/python benchmarks/bench_audit.py --only full     # the two targets of issue 14, the flags' cost
    .venv/bin/python benchmarks/bench_audit.py --only default  # the speed target alone (no optional flags)
    .venv/bin/python benchmarks/bench_audit.py --only default --rounds 8  # ... 8 times, and the median
    .venv/bin/python benchmarks/bench_audit.py --scale 0.1     # a tenth of every size, for a quick look

Targets (issue 14), 32x32 grey images in .npy files (uint8):

- ``full``: the full default command (``protomem audit --train T.npy --generated G.npy --out D``, a fresh
  process: start-up, reading, detection, the typical-vs-rare test, tables and report) at 50,000 training
  x 5,000 output images takes at most 2x a plain faiss flat search of the same outputs (IndexFlatL2, k=2,
  on float32 vectors already in memory, timed in this process just before). The optional flags are timed
  the same way (``--no-prototypicality``, ``--flips``, ``--normalized``, ``--max-shift 2``).
- ``memory``: peak resident memory of the full command at 100,000 x 10,000 images at most 1.5 GB.

Also (``images8``, ``images32``, ``text``): detection throughput in-process beside a brute-force numpy
baseline on a subset, for 100,000 x 10,000 images and 10,000 x 10,000 documents of 500 tokens.
Speeds are compared as ratios measured in the same run (the machine is shared). CPU seconds (summed over
threads) are printed beside wall times: on a loaded machine their ratio is the steadier one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe  # noqa: E402

from protomem.audit.core import AuditConfig, audit_images, audit_text  # noqa: E402
from protomem.memorization import near, text  # noqa: E402

# Runs ``protomem`` and prints its own peak RSS (KiB) on stderr at exit: VmHWM, the high-water mark of
# this program's memory since exec (ru_maxrss would also count the benchmark's pages at the fork).
MEASURED_CLI = (
    "import atexit, sys\n"
    "def peak():\n"
    "    with open('/proc/self/status') as status:\n"
    "        line = [x for x in status if x.startswith('VmHWM')][0]\n"
    "    print('peak-rss-kib', line.split()[1], file=sys.stderr)\n"
    "atexit.register(peak)\n"
    "from protomem.cli import main\n"
    "sys.argv = ['protomem', *sys.argv[1:]]\n"
    "main()\n"
)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def smooth_images(count: int, size: int, seed: int, chunk: int = 10_000) -> np.ndarray:
    """(count, size, size, 1) float32 in [0, 1]: random 4x4 fields upsampled plus texture."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, size, size, 1), dtype=np.float32)
    factor = size // 4
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        coarse = rng.uniform(0, 1, size=(n, 4, 4)).astype(np.float32)
        fine = coarse.repeat(factor, axis=1).repeat(factor, axis=2)
        fine += rng.uniform(-0.1, 0.1, size=fine.shape).astype(np.float32)
        out[start : start + n, ..., 0] = np.clip(fine, 0, 1)
    return out


def as_uint8(images: np.ndarray) -> np.ndarray:
    return np.rint(images[..., 0] * 255).astype(np.uint8)


def flat_search_seconds(train: np.ndarray, outputs: np.ndarray) -> tuple[float, float]:
    """(wall, CPU) seconds of a plain faiss flat search: IndexFlatL2 over the float32 training vectors, k = 2
    for every output. CPU seconds are summed over threads."""
    import faiss

    vectors = train.reshape(len(train), -1).astype(np.float32)
    queries = outputs.reshape(len(outputs), -1).astype(np.float32)
    start, cpu = time.perf_counter(), time.process_time()
    index = faiss.IndexFlatL2(vectors.shape[1])
    index.add(vectors)
    index.search(queries, 2)
    return time.perf_counter() - start, time.process_time() - cpu


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_command(args: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds summed over threads, peak RSS GiB) of ``protomem ARGS`` in a fresh
    process."""
    start, cpu = time.perf_counter(), children_cpu()
    done = subprocess.run(
        [sys.executable, "-c", MEASURED_CLI, *args], capture_output=True, text=True, check=False
    )
    seconds, cpu = time.perf_counter() - start, children_cpu() - cpu
    if done.returncode != 0:
        raise SystemExit(f"protomem {' '.join(args)} failed:\n{done.stderr}")
    peak = [line for line in done.stderr.splitlines() if line.startswith("peak-rss-kib")]
    return seconds, cpu, int(peak[-1].split()[1]) / 2**20


def write_inputs(folder: Path, n_train: int, n_out: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    train = as_uint8(smooth_images(n_train, size, seed=0))
    outputs = as_uint8(smooth_images(n_out, size, seed=1))
    outputs[: n_out // 100] = train[: n_out // 100]  # 1% planted copies
    np.save(folder / "train.npy", train)
    np.save(folder / "gen.npy", outputs)
    return train, outputs


def compile_protomem() -> None:
    """Byte-compile protomem's modules, as pip does when it installs the package: a source checkout run in
    an environment with PYTHONDONTWRITEBYTECODE set would otherwise recompile them at every start."""
    import compileall

    import protomem

    compileall.compile_dir(Path(protomem.__file__).parent, quiet=1)


def bench_full(n_train: int, n_out: int, size: int, variants: bool, rounds: int = 1) -> None:
    """The full command against a flat search timed just before it, in the same run; ``rounds`` times each,
    the variants interleaved, then the median ratio of each."""
    compile_protomem()
    with tempfile.TemporaryDirectory(prefix="bench_audit_") as tmp:
        folder = Path(tmp)
        train, outputs = write_inputs(folder, n_train, n_out, size)
        base = [
            "audit",
            "--train",
            str(folder / "train.npy"),
            "--generated",
            str(folder / "gen.npy"),
            "--quiet",
        ]
        runs = [("default", [])]
        if variants:
            runs += [
                ("--no-prototypicality", ["--no-prototypicality"]),
                ("--flips", ["--flips"]),
                ("--normalized", ["--normalized"]),
                ("--max-shift 2", ["--max-shift", "2"]),
            ]
        # label -> one (command wall, flat wall, command CPU, flat CPU) per round, in seconds
        times: dict[str, list[tuple[float, float, float, float]]] = {label: [] for label, _ in runs}
        for round_ in range(rounds):
            for i, (label, extra) in enumerate(runs):
                flat, flat_cpu = flat_search_seconds(
                    train.astype(np.float32) / 255, outputs.astype(np.float32) / 255
                )
                out = folder / f"out{round_}-{i}"
                seconds, cpu, peak = run_command([*base, "--out", str(out), *extra])
                inside = json.loads((out / "summary.json").read_text())["seconds"]
                times[label].append((seconds, flat, cpu, flat_cpu))
                print(
                    f"full command {label} | {size}x{size}: {n_train:,} train x {n_out:,} outputs | "
                    f"{seconds:.1f} s wall (audit_images {inside:.1f} s), {cpu:.1f} s CPU | faiss flat "
                    f"search {flat:.1f} s wall, {flat_cpu:.1f} s CPU | ratio {seconds / flat:.2f}x wall, "
                    f"{cpu / flat_cpu:.2f}x CPU | peak RSS {peak:.2f} GiB | load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
        if rounds > 1:
            for label, rows in times.items():
                command_wall, flat_wall, command_cpu, flat_cpu = np.array(rows).T
                wall, cpu = command_wall / flat_wall, command_cpu / flat_cpu
                command, flat = np.median(command_wall), np.median(flat_wall)
                print(
                    f"full command {label} | {rounds} rounds | ratio median {np.median(wall):.2f}x wall "
                    f"(range {wall.min():.2f}-{wall.max():.2f}), {np.median(cpu):.2f}x CPU "
                    f"(range {cpu.min():.2f}-{cpu.max():.2f}) | median command {command:.1f} s / median "
                    f"flat search {flat:.1f} s = {command / flat:.2f}x",
                    flush=True,
                )


def brute_force_images(train: np.ndarray, queries: np.ndarray, config: AuditConfig) -> None:
    """The naive audit: for each output, distances to every training image, then tiled L2 of the top few."""
    flat = train.reshape(len(train), -1)
    for query in queries:
        distances = np.sqrt(((flat - query.reshape(-1)) ** 2).sum(axis=1))
        top = np.argsort(distances)[: config.candidates]
        near.tiled_l2(np.repeat(query[None], len(top), axis=0), train[top], config.tile_grid)


def bench_images(n_train: int, n_out: int, size: int, baseline: int) -> None:
    train = smooth_images(n_train, size, seed=0)
    outputs = smooth_images(n_out, size, seed=1)
    outputs[: n_out // 100] = train[: n_out // 100]  # 1% planted copies
    config = AuditConfig(batch_size=1024, prototypicality=False)
    start = time.perf_counter()
    result = audit_images(train, outputs, config)
    seconds = time.perf_counter() - start
    audit_rss = peak_rss_gib()  # before the brute-force baseline's (P, D) temporaries
    assert result.matches["exact"].sum() >= n_out // 100
    start = time.perf_counter()
    brute_force_images(train, outputs[:baseline], config)
    brute = time.perf_counter() - start
    print(
        f"images {size}x{size}: {n_train:,} train x {n_out:,} outputs | detection {seconds:.1f} s = "
        f"{n_out / seconds:,.0f} outputs/s | brute force {baseline / brute:,.1f} outputs/s "
        f"(on {baseline}) | speed-up x{(n_out / seconds) / (baseline / brute):.0f} | peak RSS "
        f"{audit_rss:.2f} GiB",
        flush=True,
    )


def bench_text(n_train: int, n_out: int, length: int, baseline: int) -> None:
    rng = np.random.default_rng(0)
    vocabulary = np.array([f"w{i}" for i in range(50_000)])
    zipf = 1.0 / np.arange(1, 50_001) ** 1.1
    zipf /= zipf.sum()
    train_docs = [" ".join(rng.choice(vocabulary, size=length, p=zipf)) for _ in range(n_train)]
    out_docs = [" ".join(rng.choice(vocabulary, size=length, p=zipf)) for _ in range(n_out)]
    for i in range(0, n_out, 100):  # 1% contain a 100-word training span
        words = out_docs[i].split()
        words[200:300] = train_docs[i].split()[100:200]
        out_docs[i] = " ".join(words)
    config = AuditConfig(span_tokens=50, prototypicality=False)
    start = time.perf_counter()
    result = audit_text(train_docs, out_docs, config)
    seconds = time.perf_counter() - start
    audit_rss = peak_rss_gib()
    assert result.matches["span"].sum() >= n_out // 100
    train_tokens, out_tokens = result.extras["train_tokens"], result.extras["output_tokens"]
    start = time.perf_counter()
    for query in out_tokens[:baseline]:  # naive: longest common substring against every training document
        for doc in train_tokens:
            text.longest_common_run(query, doc)
    brute = time.perf_counter() - start
    print(
        f"text {length} tokens: {n_train:,} train x {n_out:,} outputs | detection {seconds:.1f} s = "
        f"{n_out / seconds:,.0f} outputs/s | brute force {baseline / brute:,.2f} outputs/s (on {baseline}) | "
        f"speed-up x{(n_out / seconds) / (baseline / brute):,.0f} | peak RSS {audit_rss:.2f} GiB",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="Multiply every size by this.")
    parts = ["full", "default", "memory", "images8", "images32", "text"]
    parser.add_argument("--only", choices=parts, default=None)
    parser.add_argument(
        "--rounds", type=int, default=1, help="Time the full command this many times (the median is printed)."
    )
    args = parser.parse_args()
    import faiss

    print(describe(threads=faiss.omp_get_max_threads()), flush=True)

    def scaled(n: int) -> int:
        return max(10, int(n * args.scale))

    if args.only in (None, "full", "default"):
        bench_full(scaled(50_000), scaled(5_000), 32, variants=args.only != "default", rounds=args.rounds)
    if args.only in (None, "full", "memory"):
        bench_full(scaled(100_000), scaled(10_000), 32, variants=False, rounds=args.rounds)
    if args.only in (None, "images8"):
        bench_images(scaled(100_000), scaled(10_000), 8, baseline=200)
    if args.only in (None, "images32"):
        bench_images(scaled(100_000), scaled(10_000), 32, baseline=50)
    if args.only in (None, "text"):
        bench_text(scaled(10_000), scaled(10_000), 500, baseline=1)


if __name__ == "__main__":
    main()
