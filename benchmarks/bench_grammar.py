"""Strings per second for sampling and parsing an RHM (v=32, n=32, m=8, s=2, L=5), on one core.

Target (issue 3): at least 1,000,000 strings/s for each. numpy is single-threaded for these operations,
so this measures one core. Each figure is the best of several repeats after a warm-up (the first call
pays for page faults on freshly allocated output arrays; the warm-up figure is printed too).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe  # noqa: E402

from protomem.grammar import parse, sample_grammar, sample_strings  # noqa: E402


def best_rate(fn, count: int, repeats: int) -> tuple[float, float]:
    """(first-call rate, best rate) in items per second."""
    rates = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        fn()
        rates.append(count / (time.perf_counter() - start))
    return rates[0], max(rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(describe(threads=1))
    print(f"strings per call: {args.count:,}; v=32 n=32 m=8 s=2 L=5 (32 tokens, 31 rule nodes per string)")
    print(f"{'zipf':>5} {'operation':>10} {'first call /s':>15} {'best /s':>15} {'target':>8}")
    for exponent in (0.0, 1.0):
        grammar = sample_grammar(32, 32, 8, 2, 5, seed=0, zipf_exponent=exponent)
        tokens = sample_strings(grammar, args.count, seed=1).tokens
        for name, fn in (
            ("sample", lambda g=grammar: sample_strings(g, args.count, seed=2)),
            ("parse", lambda g=grammar, t=tokens: parse(g, t)),
        ):
            first, best = best_rate(fn, args.count, args.repeats)
            verdict = "ok" if best >= 1e6 else "MISS"
            print(f"{exponent:>5} {name:>10} {first:>15,.0f} {best:>15,.0f} {verdict:>8}")


if __name__ == "__main__":
    main()
