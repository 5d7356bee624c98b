"""``protomem sweep report``: a self-contained HTML report of a sweep, built from its database alone.

Sections appear when the sweep varies what they need:

- onsets vs training-set size (>= 2 values of P): τ_mem and τ_gen vs P on log-log axes, one dot per
  run, fitted power laws with bootstrap 95% intervals of the slope, next to the published claim
  (τ_mem ∝ P, τ_gen independent of P);
- the generalization / memorization phase diagram over (P, training step);
- Zipf skew (>= 2 Zipf exponents): τ_mem vs exponent per set of skewed levels (does skew delay
  memorization?), and the memorization–prototypicality correlation vs exponent.

τ is recomputed from the checkpoints table with the thresholds given here, so changing a threshold needs
no re-run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from protomem.errors import ProtomemError
from protomem.htmlreport import format_number
from protomem.sweep.layout import SweepLayout, require_sweep_dir
from protomem.sweep.onsets import (
    DEFAULT_GEN_THRESHOLD,
    DEFAULT_MEM_THRESHOLD,
    GEN_COLUMN,
    MEM_COLUMN,
    PowerLawFit,
    fit_power_law,
    onset_step,
)

# Per-point memorization–prototypicality correlation: the first summary column found (the study's own
# statistic), with its interval columns when present.
CORRELATION_COLUMNS: tuple[tuple[str, str | None, str | None], ...] = (
    ("primary_rho", "primary_ci_low", "primary_ci_high"),
    ("rho", "rho_ci_low", "rho_ci_high"),
    ("spearman_rho", "spearman_ci_low", "spearman_ci_high"),
)

MEM_COLOR = "#c0392b"
GEN_COLOR = "#2d6ca2"


def load_tables(layout: SweepLayout) -> dict[str, pd.DataFrame]:
    """points / checkpoints / examples from sweep.duckdb (one-line error if the sweep was never gathered)."""
    import duckdb

    if not layout.database.is_file():
        raise ProtomemError("no sweep.duckdb yet (run the sweep first)", path=layout.root)
    con = duckdb.connect(str(layout.database), read_only=True)
    try:
        return {
            name: con.execute(f'SELECT * FROM "{name}"').df()
            for name in ("points", "checkpoints", "examples")
        }
    finally:
        con.close()


def onsets_table(
    points: pd.DataFrame, checkpoints: pd.DataFrame, mem_threshold: float, gen_threshold: float
) -> pd.DataFrame:
    """Complete points with τ_mem, τ_gen (thresholds given) and their last evaluated step."""
    done = points[points["status"] == "complete"].copy()
    tau_mem, tau_gen, last = [], [], []
    for name in done["point"]:
        rows = checkpoints[checkpoints["point"] == name]
        steps = rows["step"].to_numpy(dtype=np.float64) if "step" in rows else np.array([])
        last.append(float(steps.max()) if steps.size else math.nan)
        mem = (
            rows[MEM_COLUMN].to_numpy(dtype=np.float64) if MEM_COLUMN in rows else np.full(steps.size, np.nan)
        )
        gen = (
            rows[GEN_COLUMN].to_numpy(dtype=np.float64) if GEN_COLUMN in rows else np.full(steps.size, np.nan)
        )
        tau_mem.append(onset_step(steps, mem, mem_threshold))
        tau_gen.append(onset_step(steps, gen, gen_threshold))
    done["tau_mem"] = tau_mem
    done["tau_gen"] = tau_gen
    done["last_step"] = last
    return done


def _distinct(frame: pd.DataFrame, column: str) -> list[Any]:
    if column not in frame or frame.empty:
        return []
    return sorted(v for v in frame[column].dropna().unique())


def _label_sizes(axis: Any, sizes: np.ndarray) -> None:
    """Ticks of a log axis at the swept sizes, labelled as plain numbers (no crowded minor labels)."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    values = np.unique(np.asarray(sizes, dtype=np.float64)[np.isfinite(sizes)])
    axis.set_major_locator(FixedLocator(values))
    axis.set_major_formatter(lambda value, _: f"{value:g}")
    axis.set_minor_locator(NullLocator())
    axis.set_minor_formatter(NullFormatter())


def _fmt_fit(fit: PowerLawFit | None) -> str:
    if fit is None:
        return "no fit (fewer than 2 training-set sizes with a finite τ)"
    if not np.isfinite(fit.ci_low):
        return f"slope {fit.slope:.2f} (no interval: {fit.method.removeprefix('none ').strip('()')})"
    return f"slope {fit.slope:.2f} [95% CI {fit.ci_low:.2f}, {fit.ci_high:.2f}]"


def figure_onsets_vs_size(onsets: pd.DataFrame, fits: dict[str, PowerLawFit | None]):
    """τ_mem and τ_gen vs P, log-log; censored runs as open triangles at their last step."""
    from protomem.htmlreport import subplots

    fig, ax = subplots(figsize=(6.4, 4.6))
    sizes = onsets["n_train"].to_numpy(dtype=np.float64)
    for key, label, color in (("tau_mem", "τ_mem", MEM_COLOR), ("tau_gen", "τ_gen", GEN_COLOR)):
        taus = onsets[key].to_numpy(dtype=np.float64)
        ok = np.isfinite(taus)
        ax.scatter(sizes[ok], taus[ok], color=color, s=28, zorder=3, label=f"{label} (one dot per run)")
        if (~ok).any():
            ax.scatter(
                sizes[~ok],
                onsets["last_step"].to_numpy(dtype=np.float64)[~ok],
                marker="^",
                facecolors="none",
                edgecolors=color,
                s=40,
                zorder=3,
                label=f"{label} not reached by the last step",
            )
        fit = fits.get(key)
        if fit is not None:  # drawn over the sizes it was fitted on
            grid = np.geomspace(sizes[ok].min(), sizes[ok].max(), 50)
            ax.plot(grid, fit.predict(grid), color=color, lw=1.6, label=f"{label} fit: {_fmt_fit(fit)}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _label_sizes(ax.xaxis, sizes)
    ax.set_xlabel("training-set size P (strings)")
    ax.set_ylabel("training step")
    ax.set_title("Onset of memorization and of generalization vs P")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=1, frameon=False)
    return fig


def figure_curves(
    checkpoints: pd.DataFrame, onsets: pd.DataFrame, mem_threshold: float, gen_threshold: float
):
    """Fractions of exact copies and of novel valid samples vs step, one line per run, coloured by P."""
    from matplotlib import cm, colors

    from protomem.htmlreport import subplots

    fig, axes = subplots(1, 2, figsize=(10.5, 3.8), sharex=True)
    sizes = onsets["n_train"].to_numpy(dtype=np.float64)
    norm = colors.LogNorm(vmin=max(sizes.min(), 1), vmax=max(sizes.max(), sizes.min() + 1))
    cmap = cm.viridis
    for name, size in zip(onsets["point"], sizes, strict=True):
        rows = checkpoints[checkpoints["point"] == name].sort_values("step")
        for ax, column in zip(axes, (MEM_COLUMN, GEN_COLUMN), strict=True):
            if column in rows:
                ax.plot(rows["step"], rows[column], color=cmap(norm(size)), lw=1.2, alpha=0.85)
    for ax, column, threshold, title in (
        (axes[0], MEM_COLUMN, mem_threshold, "exact copies of training strings"),
        (axes[1], GEN_COLUMN, gen_threshold, "novel valid strings"),
    ):
        ax.axhline(threshold, color="grey", ls="--", lw=1, label=f"threshold {threshold:g}")
        ax.set_xscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"fraction of samples ({column})")
        ax.set_title(title)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.25)
        ax.legend(fontsize=8, loc="upper left")
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes, label="P", fraction=0.03)
    return fig


def phase_grid(
    checkpoints: pd.DataFrame, onsets: pd.DataFrame, n_steps: int = 60
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean (over runs of each P) fractions on a common log-spaced step grid.

    Returns:
        sizes (S,), steps (n_steps,), mem (S, n_steps), gen (S, n_steps); NaN beyond a run's evaluations.
    """
    sizes = np.array(_distinct(onsets, "n_train"), dtype=np.float64)
    rows = checkpoints[checkpoints["point"].isin(onsets["point"])]
    steps_all = rows["step"].to_numpy(dtype=np.float64)
    steps_all = steps_all[steps_all > 0]
    grid = np.geomspace(steps_all.min(), steps_all.max(), n_steps)
    mem = np.full((sizes.size, n_steps), np.nan)
    gen = np.full((sizes.size, n_steps), np.nan)
    for i, size in enumerate(sizes):
        mem_runs, gen_runs = [], []
        for name in onsets.loc[onsets["n_train"] == size, "point"]:
            run = rows[rows["point"] == name].sort_values("step")
            x = np.log(run["step"].to_numpy(dtype=np.float64))
            inside = (np.log(grid) >= x.min()) & (np.log(grid) <= x.max())
            for column, store in ((MEM_COLUMN, mem_runs), (GEN_COLUMN, gen_runs)):
                values = np.full(n_steps, np.nan)
                if column in run:
                    values[inside] = np.interp(
                        np.log(grid[inside]), x, run[column].to_numpy(dtype=np.float64)
                    )
                store.append(values)
        with np.errstate(all="ignore"):
            if mem_runs:
                mem[i] = np.nanmean(np.vstack(mem_runs), axis=0)
            if gen_runs:
                gen[i] = np.nanmean(np.vstack(gen_runs), axis=0)
    return sizes, grid, mem, gen


def _edges(values: np.ndarray) -> np.ndarray:
    """Cell edges on a log scale around sorted positive values (geometric midpoints)."""
    logs = np.log(values)
    if values.size == 1:
        return np.exp(np.array([logs[0] - 0.5, logs[0] + 0.5]))
    mids = (logs[1:] + logs[:-1]) / 2
    return np.exp(np.concatenate([[2 * logs[0] - mids[0]], mids, [2 * logs[-1] - mids[-1]]]))


def figure_phase(checkpoints: pd.DataFrame, onsets: pd.DataFrame):
    """Phase diagram: colour = novel valid minus exact-copy fraction over (step, P), with mean onsets."""
    from protomem.htmlreport import subplots

    sizes, steps, mem, gen = phase_grid(checkpoints, onsets)
    fig, ax = subplots(figsize=(7.2, 4.4))
    mesh = ax.pcolormesh(
        _edges(steps), _edges(sizes), np.ma.masked_invalid(gen - mem), cmap="RdBu", vmin=-1, vmax=1
    )
    fig.colorbar(mesh, ax=ax, label="frac novel valid − frac exact copy\n(blue: generalizes, red: copies)")
    for key, label, marker in (("tau_gen", "mean τ_gen", "o"), ("tau_mem", "mean τ_mem", "s")):
        means = onsets.groupby("n_train")[key].apply(
            lambda v: float(np.exp(np.log(v).mean())) if np.isfinite(v).all() else np.nan
        )
        ax.plot(
            means.to_numpy(),
            means.index.to_numpy(dtype=np.float64),
            marker=marker,
            color="k",
            lw=1.2,
            ms=5,
            label=label,
            mfc="white" if key == "tau_gen" else "k",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    _label_sizes(ax.yaxis, sizes)
    ax.set_xlabel("training step")
    ax.set_ylabel("training-set size P")
    ax.set_title("Generalization / memorization phase diagram")
    ax.legend(fontsize=8, loc="lower left")
    return fig


def _levels_label(value: Any, depth: Any) -> str:
    """'levels [0, 1] (top half)' from the JSON text of zipf_levels ('all levels' for null)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "all levels"
    levels = json.loads(value) if isinstance(value, str) else value
    if not isinstance(levels, list):
        return f"levels {levels}"
    text = f"levels {levels}"
    try:
        n = int(depth)
    except (TypeError, ValueError):
        return text
    if sorted(levels) == list(range(n)):
        return f"{text} (all)"
    if sorted(levels) == list(range(n // 2)):
        return f"{text} (top half: near the root)"
    if sorted(levels) == list(range(n - n // 2, n)):
        return f"{text} (bottom half: near the tokens)"
    return text


def zipf_table(onsets: pd.DataFrame) -> pd.DataFrame:
    """τ_mem per (skewed levels, exponent): geometric mean over runs, runs not reaching the threshold,
    and the delay factor relative to exponent 0 (uniform rules)."""
    frame = onsets.copy()
    depth = frame["depth"] if "depth" in frame else pd.Series([None] * len(frame), index=frame.index)
    frame["levels"] = [_levels_label(v, d) for v, d in zip(frame["zipf_levels"], depth, strict=True)]
    uniform = frame.loc[frame["zipf_exponent"] == 0, "tau_mem"]
    uniform = uniform[np.isfinite(uniform)]
    base = float(np.exp(np.log(uniform).mean())) if len(uniform) else math.nan
    rows = []
    for (levels, exponent), group in frame.groupby(["levels", "zipf_exponent"]):
        taus = group["tau_mem"].to_numpy(dtype=np.float64)
        finite = taus[np.isfinite(taus)]
        mean = float(np.exp(np.log(finite).mean())) if finite.size else math.nan
        rows.append(
            {
                "levels": levels,
                "zipf_exponent": float(exponent),
                "runs": int(taus.size),
                "not_reached": int((~np.isfinite(taus)).sum()),
                "tau_mem": mean,
                "delay_vs_uniform": mean / base if base > 0 else math.nan,
            }
        )
    return pd.DataFrame(rows)


def figure_zipf_onsets(onsets: pd.DataFrame, table: pd.DataFrame):
    from protomem.htmlreport import subplots

    fig, ax = subplots(figsize=(6.4, 4.2))
    for i, (levels, group) in enumerate(table.groupby("levels")):
        group = group.sort_values("zipf_exponent")
        ax.plot(group["zipf_exponent"], group["tau_mem"], marker="o", color=f"C{i}", label=levels)
    uniform = onsets.loc[onsets["zipf_exponent"] == 0, "tau_mem"]
    if len(uniform):
        ax.scatter(np.zeros(len(uniform)), uniform, color="k", s=14, zorder=3, label="uniform rules (runs)")
    ax.set_yscale("log")
    ax.set_xlabel("Zipf exponent of the rule probabilities")
    ax.set_ylabel("τ_mem (training step, geometric mean over runs)")
    ax.set_title("Does rule skew delay memorization?")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    return fig


def correlation_columns(points: pd.DataFrame) -> tuple[str, str | None, str | None] | None:
    """(value, low, high) columns of the per-run memorization–prototypicality correlation, or None.

    The study's summary.json is flattened into the points table; its Spearman ρ is a column named
    ``rho`` or ``<prefix>_rho`` with ``<prefix>_ci_low`` / ``<prefix>_ci_high`` beside it. The preferred
    names come first (CORRELATION_COLUMNS), then any other ``*_rho`` column.
    """
    candidates = [c for c in CORRELATION_COLUMNS if c[0] in points]
    for column in points.columns:
        if column.endswith("rho") and column not in [c[0] for c in candidates]:
            prefix = column[: -len("rho")]
            candidates.append((column, f"{prefix}ci_low", f"{prefix}ci_high"))
    for value, low, high in candidates:
        if value in points and pd.to_numeric(points[value], errors="coerce").notna().any():
            return value, (low if low in points else None), (high if high in points else None)
    return None


def figure_correlation(onsets: pd.DataFrame, columns: tuple[str, str | None, str | None]):
    from protomem.htmlreport import subplots

    value, low, high = columns
    frame = onsets.copy()
    depth = frame["depth"] if "depth" in frame else pd.Series([None] * len(frame), index=frame.index)
    frame["levels"] = [_levels_label(v, d) for v, d in zip(frame["zipf_levels"], depth, strict=True)]
    fig, ax = subplots(figsize=(6.4, 4.2))
    for i, (levels, group) in enumerate(frame.groupby("levels")):
        x = group["zipf_exponent"].to_numpy(dtype=np.float64) + (i - 1) * 0.02
        y = group[value].to_numpy(dtype=np.float64)
        if low and high:
            err = np.vstack(
                [y - group[low].to_numpy(dtype=np.float64), group[high].to_numpy(dtype=np.float64) - y]
            )
            ax.errorbar(x, y, yerr=np.abs(err), fmt="o", color=f"C{i}", capsize=3, label=levels)
        else:
            ax.plot(x, y, "o", color=f"C{i}", label=levels)
    ax.axhline(0, color="grey", lw=1)
    ax.set_xlabel("Zipf exponent of the rule probabilities")
    ax.set_ylabel(f"memorization–prototypicality correlation ({value})")
    ax.set_title("Are prototypical strings memorized first, at each skew?")
    ax.grid(True, alpha=0.25)
    ax.legend(fontsize=8)
    return fig


def build_report(
    sweep_dir: str | os.PathLike,
    out_path: str | os.PathLike | None = None,
    *,
    mem_threshold: float | None = None,
    gen_threshold: float | None = None,
    n_resamples: int = 2000,
    figures_dir: str | os.PathLike | None = None,
) -> Path:
    """Write the sweep's HTML report (default SWEEP_DIR/report.html) and return its path.

    ``figures_dir``: also save every figure there as PNG (for a README or a paper).
    """
    import protomem
    from protomem.htmlreport import figure_img, render_page

    def img(fig: Any, alt: str, name: str) -> Any:
        if figures_dir is not None:
            Path(figures_dir).mkdir(parents=True, exist_ok=True)
            fig.savefig(Path(figures_dir) / f"{name}.png", dpi=110, bbox_inches="tight")
        return figure_img(fig, alt)

    layout = require_sweep_dir(sweep_dir)
    mem_threshold = DEFAULT_MEM_THRESHOLD if mem_threshold is None else mem_threshold
    gen_threshold = DEFAULT_GEN_THRESHOLD if gen_threshold is None else gen_threshold
    for name, value in (("--mem-threshold", mem_threshold), ("--gen-threshold", gen_threshold)):
        if not 0 < value <= 1:
            raise ProtomemError(f"{name} must lie in (0, 1], got {value}")
    tables = load_tables(layout)
    points, checkpoints = tables["points"], tables["checkpoints"]
    manifest = json.loads(layout.manifest.read_text(encoding="utf-8"))
    onsets = onsets_table(points, checkpoints, mem_threshold, gen_threshold)
    context: dict[str, Any] = {
        "protomem_version": getattr(protomem, "__version__", ""),
        "name": manifest.get("name") or layout.root.name,
        "description": manifest.get("description", ""),
        "base": manifest.get("base", {}),
        "swept_keys": manifest.get("swept_keys", []),
        "mem_threshold": mem_threshold,
        "gen_threshold": gen_threshold,
        "mem_column": MEM_COLUMN,
        "gen_column": GEN_COLUMN,
        "counts": points["status"].value_counts().to_dict(),
        "n_points": len(points),
        "scaling": None,
        "zipf": None,
    }
    shown = ["point", "status", "attempts", *[c for c in ("n_train", "zipf_exponent", "zipf_levels", "seed")]]
    table_rows = []
    by_name = onsets.set_index("point") if not onsets.empty else None
    for _, row in points.iterrows():
        cells = [format_number(row.get(c)) for c in shown]
        if by_name is not None and row["point"] in by_name.index:
            cells += [
                format_number(by_name.loc[row["point"], "tau_mem"]),
                format_number(by_name.loc[row["point"], "tau_gen"]),
            ]
        else:
            cells += ["–", "–"]
        table_rows.append(cells)
    context["table_header"] = [*shown, "τ_mem", "τ_gen"]
    context["table_rows"] = table_rows

    sized = onsets[onsets["n_train"].notna()] if "n_train" in onsets else onsets.iloc[:0]
    sizes = _distinct(sized, "n_train")
    if len(sizes) >= 2 and MEM_COLUMN in checkpoints:
        onsets = sized
        fits = {
            key: fit_power_law(onsets["n_train"], onsets[key], n_resamples=n_resamples)
            for key in ("tau_mem", "tau_gen")
        }
        context["scaling"] = {
            "sizes": [int(s) if float(s).is_integer() else s for s in sizes],
            "fits": {key: (_fmt_fit(fit), fit) for key, fit in fits.items()},
            "not_reached": {
                key: int((~np.isfinite(onsets[key].to_numpy(dtype=np.float64))).sum())
                for key in ("tau_mem", "tau_gen")
            },
            "n_runs": len(onsets),
            "figure": img(
                figure_onsets_vs_size(onsets, fits), "tau_mem and tau_gen vs P, log-log", "onsets_vs_P"
            ),
            "curves": img(
                figure_curves(checkpoints, onsets, mem_threshold, gen_threshold),
                "fractions vs step per run",
                "trajectories",
            ),
            "phase": img(
                figure_phase(checkpoints, onsets), "phase diagram over P and training step", "phase"
            ),
        }
    exponents = _distinct(onsets, "zipf_exponent")
    if len(exponents) >= 2:
        table = zipf_table(onsets)
        corr = correlation_columns(onsets)
        context["zipf"] = {
            "rows": [
                [
                    r["levels"],
                    format_number(r["zipf_exponent"]),
                    r["runs"],
                    r["not_reached"],
                    format_number(r["tau_mem"]),
                    format_number(r["delay_vs_uniform"]),
                ]
                for _, r in table.sort_values(["levels", "zipf_exponent"]).iterrows()
            ],
            "figure": img(figure_zipf_onsets(onsets, table), "tau_mem vs Zipf exponent", "tau_mem_vs_zipf"),
            "correlation": img(
                figure_correlation(onsets, corr), "correlation vs Zipf exponent", "rho_vs_zipf"
            )
            if corr
            else None,
            "correlation_column": corr[0] if corr else None,
        }
    out = Path(out_path) if out_path is not None else layout.report
    render_page("sweep_report.html.j2", out, **context)
    return out
