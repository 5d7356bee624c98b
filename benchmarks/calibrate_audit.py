"""Calibrate the audit's image thresholds and check its typical-vs-rare test; prints markdown tables.

    .venv/bin/python benchmarks/calibrate_audit.py               # the calibration in docs/results/audit.md
    .venv/bin/python benchmarks/calibrate_audit.py --scale 0.3   # smaller, for a quick look

1. Thresholds. Four image families (protomem.audit.calibration: digits 8x8 and 32x32, textures, colour
   scenes), fresh images and planted copies (noise, shift, crop, flip, brightness/contrast, half an
   image). On seed 0 each threshold is set to the largest value of its grid whose false-positive rate on
   fresh images is at most --target in every family; seed 1 (other images, other plants) then reports the
   false-positive rate of every criterion and the recall of each plant, at those thresholds.
2. Typical or rare. A uniform copier (training digits chosen at random, copied with pixel noise) must not
   be called typical or rare: the share of runs with p < 0.05 for the corrected test, for the same test
   without the detectability correction, and for the Spearman correlation the audit used before. A
   copier that prefers dense digits must be found (power).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe  # noqa: E402

from protomem.audit import calibration as cal  # noqa: E402
from protomem.audit import defaults, typicality  # noqa: E402
from protomem.audit.core import AuditConfig, audit_images  # noqa: E402
from protomem.audit.stats import spearman_test  # noqa: E402

GRIDS = {  # threshold -> (argument of flag_rates, grid)
    "l2": ("l2", np.round(np.arange(0.03, 0.0801, 0.005), 3)),
    "tiled": ("tiled", np.round(np.arange(0.04, 0.1201, 0.005), 3)),
    "shifted": ("shift", np.round(np.arange(0.02, 0.0801, 0.005), 3)),
    "cropped": ("crop", np.round(np.arange(0.01, 0.0801, 0.005), 3)),
    "normalized": ("normalized", np.round(np.arange(0.05, 0.3001, 0.01), 3)),
    "partial": ("partial", np.array(cal.PARTIAL_THRESHOLDS)),
}


def audit_families(seed: int, scale: float, n_plant: int) -> pd.DataFrame:
    tables = []
    for name in cal.FAMILIES:
        n_train, n_fresh = (max(50, int(n * scale)) for n in cal.SIZES[name])
        start = time.perf_counter()
        tables.append(cal.run_family(name, n_train, n_fresh, n_plant, seed))
        seconds = time.perf_counter() - start
        print(f"<!-- seed {seed} {name}: {n_train} train, {n_fresh} fresh, {seconds:.0f} s -->", flush=True)
    return pd.concat(tables, ignore_index=True)


def fresh_rate(table: pd.DataFrame, criterion: str, **thresholds: float) -> pd.Series:
    flags = cal.flag_rates(table, **thresholds)[criterion]
    fresh = table["kind"] == "fresh"
    return flags[fresh].groupby(table.loc[fresh, "family"]).mean()


def choose(table: pd.DataFrame, target: float) -> dict[str, float]:
    chosen = {}
    for criterion, (argument, grid) in GRIDS.items():
        ok = [t for t in grid if fresh_rate(table, criterion, **{argument: float(t)}).max() <= target]
        chosen[argument] = float(max(ok)) if ok else float(grid[0])
        print(f"<!-- {criterion}: fresh FPR per family along the grid -->")
        for t in grid:
            rates = fresh_rate(table, criterion, **{argument: float(t)})
            print(f"<!--   {t:g}: " + ", ".join(f"{k} {v:.2%}" for k, v in rates.items()) + " -->")
    return chosen


def markdown(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    lines = [header, "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def report(table: pd.DataFrame, thresholds: dict[str, float]) -> None:
    flags = cal.flag_rates(table, **thresholds)
    rates = cal.rate_table(table, flags)
    fresh = rates.xs("fresh", level="kind")
    counts = table[table["kind"] == "fresh"].groupby("family").size()
    shown = ["exact", "l2", "ratio", "tiled", "shifted", "cropped", "flipped", "normalized", "partial"]
    rows = fresh[shown + ["copied (defaults)"]].map(lambda v: f"{v:.1%}").reset_index()
    rows.insert(1, "fresh images", [int(counts[f]) for f in rows["family"]])
    print("\nFalse-positive rate on fresh images (share flagged), validation seed:\n")
    print(markdown(rows))
    recall = []
    for kind in cal.PLANTS:
        row = {"planted": kind, "criterion": cal.INTENDED[kind]}
        for name in cal.FAMILIES:
            part = rates.loc[(name, kind)]
            row[name] = f"{part[cal.INTENDED[kind]]:.0%} ({part['copied (defaults)']:.0%})"
        recall.append(row)
    print(
        "\nRecall of planted copies by the intended criterion (in brackets: by the default criteria"
        " exact/l2/ratio/tiled), validation seed:\n"
    )
    print(markdown(pd.DataFrame(recall)))
    noise = table[table["kind"] == "noise"]
    bins = pd.cut(noise["d1"], [0, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08])  # d1: the planted noise's RMS
    by_level = flags.loc[noise.index, ["l2", "ratio", "tiled"]].groupby(bins, observed=True).mean()
    print("\nNoised copies: share flagged against their distance d1 to the source (all families):\n")
    print(markdown(by_level.map(lambda v: f"{v:.0%}").reset_index().rename(columns={"d1": "d1 (RMS)"})))


# -------------------------------------------------------------------------------------------- typicality


def copier_run(seed: int, prefer_dense: bool, n_train: int = 600, n_copied: int = 60) -> dict[str, float]:
    """One audit of digits with ``n_copied`` training digits copied once each (noise RMS 0.03-0.09) among
    200 fresh ones; the p-values of the corrected test, of the same test with every reference item as
    the reference (uncorrected), and of the Spearman correlation the audit used before."""
    train, fresh, _ = cal.family("digits8", n_train, 200, seed)
    rng = np.random.default_rng(seed + 7)
    flat = train.reshape(n_train, -1)
    everyone = typicality.vector_neighbours(flat, np.arange(n_train), 16, seed)
    dens = typicality.density(everyone, 5) / np.sqrt(flat.shape[1])
    if prefer_dense:
        weight = np.exp(-(dens - dens.min()) / (0.25 * dens.std()))
        picked = rng.choice(n_train, size=n_copied, replace=False, p=weight / weight.sum())
    else:
        picked = rng.choice(n_train, size=n_copied, replace=False)
    sigma = rng.uniform(0.03, 0.09, size=(n_copied, 1, 1, 1))
    copies = np.clip(train[picked] + rng.normal(size=train[picked].shape) * sigma, 0, 1).astype(np.float32)
    result = audit_images(train, np.concatenate([copies, fresh]), AuditConfig(seed=seed))
    test = result.summary["prototypicality"]["density"]
    m, per = result.matches, result.per_train
    copied = m.loc[m["copied"], "train_index"].to_numpy()
    reference = np.flatnonzero(per["detectable"].notna())
    score = per["density"].to_numpy()
    plain = typicality.conditional_test(
        score[copied],
        score[reference],
        [np.ones(reference.size, bool)],
        np.zeros(copied.size, int),
        seed=seed,
    )
    old = spearman_test(dens, per["copies"].to_numpy(), seed=seed)
    caught = per.loc[picked, "copies"].to_numpy() > 0
    dense_half = dens[picked] <= np.median(dens)
    return {
        "corrected": test["p_permutation"],
        "corrected_auc": test["auc"],
        "uncorrected": plain["p_permutation"],
        "spearman": old["p_permutation"],
        "recall_dense": caught[dense_half].mean() if dense_half.any() else np.nan,
        "recall_sparse": caught[~dense_half].mean() if (~dense_half).any() else np.nan,
        "verdict": test["sentence"].split(" (")[0],
    }


def typicality_check(runs: int) -> None:
    for prefer_dense in (False, True):
        rows = pd.DataFrame([copier_run(seed, prefer_dense) for seed in range(runs)])
        label = "dense-preferring copier (power)" if prefer_dense else "uniform copier (false positives)"
        share = {key: np.mean(rows[key] < 0.05) for key in ("corrected", "uncorrected", "spearman")}
        dense, sparse = np.nanmean(rows["recall_dense"]), np.nanmean(rows["recall_sparse"])
        print(
            f"\n{label}, {runs} runs: recall of copies of the denser / sparser half {dense:.0%} / "
            f"{sparse:.0%}; share of runs with p < 0.05: corrected test {share['corrected']:.0%}, "
            f"uncorrected comparison {share['uncorrected']:.0%}, Spearman (before) {share['spearman']:.0%}; "
            f"mean AUC {rows['corrected_auc'].mean():.3f}"
        )
        print("<!-- verdicts: " + "; ".join(rows["verdict"].value_counts().index[:3]) + " -->")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="Multiply the image counts by this.")
    parser.add_argument("--plants", type=int, default=100, help="Planted copies of each kind per family.")
    parser.add_argument("--target", type=float, default=0.002, help="Largest fresh false-positive rate.")
    parser.add_argument("--runs", type=int, default=200, help="Copier runs of the typicality check.")
    parser.add_argument("--skip", choices=["thresholds", "typicality"], default=None)
    args = parser.parse_args()
    import faiss

    print(describe(threads=faiss.omp_get_max_threads()), flush=True)
    if args.skip != "thresholds":
        calibration = audit_families(0, args.scale, args.plants)
        chosen = choose(calibration, args.target)
        current = {k: getattr(defaults, f"{k.upper()}_THRESHOLD") for k in chosen}
        print(
            f"\nChosen on seed 0 (target {args.target:.1%}): "
            + ", ".join(f"{k} {v:g}" for k, v in chosen.items())
        )
        print("Defaults in protomem.audit.defaults: " + ", ".join(f"{k} {v:g}" for k, v in current.items()))
        validation = audit_families(cal.VALIDATION_SEED, args.scale, args.plants)
        report(validation, current)
    if args.skip != "typicality":
        typicality_check(args.runs)


if __name__ == "__main__":
    main()
