"""Audit throughput: outputs per second for 100,000 x 10,000 images (8x8 and 32x32) and 10,000 x 10,000
documents of 500 tokens, beside a brute-force baseline (numpy, one output at a time) on a subset.

    .venv/bin/python benchmarks/bench_audit.py            # the sizes of issue 6
    .venv/bin/python benchmarks/bench_audit.py --scale 0.1  # a tenth of them, for a quick look

Speeds are compared as ratios measured in the same run (the machine is shared).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe  # noqa: E402

from protomem.audit.core import AuditConfig, audit_images, audit_text  # noqa: E402
from protomem.memorization import near, text  # noqa: E402


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
    config = AuditConfig(batch_size=1024)
    start = time.perf_counter()
    result = audit_images(train, outputs, config, density=False)
    seconds = time.perf_counter() - start
    audit_rss = peak_rss_gib()  # before the brute-force baseline's (P, D) temporaries
    assert result.matches["exact"].sum() >= n_out // 100
    start = time.perf_counter()
    brute_force_images(train, outputs[:baseline], config)
    brute = time.perf_counter() - start
    start = time.perf_counter()
    near.mean_knn_distance(train[: min(n_train, 20_000)].reshape(min(n_train, 20_000), -1), k=5)
    density = time.perf_counter() - start
    print(
        f"images {size}x{size}: {n_train:,} train x {n_out:,} outputs | audit {seconds:.1f} s = "
        f"{n_out / seconds:,.0f} outputs/s | brute force {baseline / brute:,.1f} outputs/s "
        f"(on {baseline}) | speed-up x{(n_out / seconds) / (baseline / brute):.0f} | density k-NN of "
        f"{min(n_train, 20_000):,} items {density:.1f} s | peak RSS after the audit {audit_rss:.2f} GiB",
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
    config = AuditConfig(span_tokens=50)
    start = time.perf_counter()
    result = audit_text(train_docs, out_docs, config, density=False)
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
        f"text {length} tokens: {n_train:,} train x {n_out:,} outputs | audit {seconds:.1f} s = "
        f"{n_out / seconds:,.0f} outputs/s | brute force {baseline / brute:,.2f} outputs/s (on {baseline}) | "
        f"speed-up x{(n_out / seconds) / (baseline / brute):,.0f} | peak RSS after the audit "
        f"{audit_rss:.2f} GiB",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="Multiply every size by this.")
    parser.add_argument("--only", choices=["images8", "images32", "text"], default=None)
    args = parser.parse_args()
    import faiss

    print(describe(threads=faiss.omp_get_max_threads()), flush=True)

    def scaled(n: int) -> int:
        return max(10, int(n * args.scale))

    if args.only in (None, "images8"):
        bench_images(scaled(100_000), scaled(10_000), 8, baseline=200)
    if args.only in (None, "images32"):
        bench_images(scaled(100_000), scaled(10_000), 32, baseline=50)
    if args.only in (None, "text"):
        bench_text(scaled(10_000), scaled(10_000), 500, baseline=1)


if __name__ == "__main__":
    main()
