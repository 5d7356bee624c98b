"""Wall time of each stage of the study: setup, training (with evaluations), finer-sampler check, analysis,
report; per condition, plus the CPU seconds each condition used and the study's total.

Targets (issue 5): the default preset in <= 5 minutes on 2 cores, the quick preset in < 1 minute. On a
shared machine the wall times stretch with the load average printed at the top; CPU seconds do not.

    python benchmarks/bench_study.py                     # quick preset
    python benchmarks/bench_study.py --preset default    # the default study (minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe  # noqa: E402

from protomem.study.presets import PRESETS  # noqa: E402
from protomem.study.runner import run_study  # noqa: E402

STAGES = ("setup", "train", "finer_sampler", "analysis", "report")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick", choices=[p for p in PRESETS if p != "paper"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads per condition")
    parser.add_argument(
        "--jobs", type=int, default=None, help="conditions at once (default cores // threads)"
    )
    parser.add_argument("--keep", type=Path, default=None, help="keep the run directory here")
    args = parser.parse_args()
    print(describe(threads=args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or Path(tmp) / "study"
        started = time.perf_counter()
        run_study(
            out, preset=args.preset, progress=False, threads=args.threads, jobs=args.jobs, overwrite=True
        )
        total = time.perf_counter() - started
        study = json.loads((out / "study.json").read_text())
        print(
            f"preset {args.preset}: {len(study['conditions'])} conditions, {study['threads_policy']}, "
            f"load average at start {study['load_average']}"
        )
        header = f"{'condition':<18}" + "".join(f"{s:>14}" for s in STAGES) + f"{'cpu s':>10}{'steps':>7}"
        print(header)
        for name in study["conditions"]:
            summary = json.loads((out / "conditions" / name / "summary.json").read_text())
            stages = summary["stage_seconds"]
            row = f"{name:<18}" + "".join(f"{stages.get(s, float('nan')):>13.1f}s" for s in STAGES)
            print(row + f"{summary['cpu_seconds']:>9.1f}s{summary['steps'][-1]:>7}")
        target = {"quick": " (target: 60 s)", "default": " (target: 300 s)"}
        print(
            f"study wall time {total:.1f} s{target.get(args.preset, '')}; "
            f"load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
        )
        print(f"verdict: {study['verdict']}")


if __name__ == "__main__":
    main()
