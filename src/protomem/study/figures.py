"""The study's matplotlib figures, each drawn from the run directory's tables (pandas DataFrames).

Every function returns a Figure; the report inlines them with protomem.htmlreport.figure_img.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from protomem.htmlreport import subplots

QUARTILE_COLORS = ("#c6dbef", "#6baed6", "#2171b5", "#08306b")


def _level_name(level: int, branching: int, depth: int) -> str:
    return f"level {level} ({branching ** (depth - level)}-token blocks)"


def loss_figure(train_log: pd.DataFrame | None, metrics: pd.DataFrame) -> Figure:
    fig, ax = subplots(figsize=(6, 3.2))
    if train_log is not None and len(train_log):
        ax.plot(train_log["step"], train_log["loss"], color="#555", lw=1, label="training loss")
    ax.plot(
        metrics["step"], metrics["loss"], "o", color="#2d6ca2", label="mean loss since previous evaluation"
    )
    ax.set_xscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.set_title("Training loss")
    return fig


def phase_figure(metrics: pd.DataFrame) -> Figure:
    fig, ax = subplots(figsize=(6, 3.4))
    ax.plot(metrics["step"], metrics["frac_exact_copy"], "o-", color="#c0392b", label="exact copies")
    ax.plot(metrics["step"], metrics["frac_novel_valid"], "s-", color="#27ae60", label="novel valid")
    ax.plot(metrics["step"], metrics["frac_invalid"], "^-", color="#7f8c8d", label="invalid")
    ax.plot(
        metrics["step"], metrics["frac_memorized"], "--", color="#8e44ad", label="training strings memorized"
    )
    if "frac_memorized_likelihood" in metrics:
        ax.plot(
            metrics["step"],
            metrics["frac_memorized_likelihood"],
            ":",
            color="#8e44ad",
            label="memorized (likelihood endpoint)",
        )
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("training step")
    ax.set_ylabel("fraction of samples / strings")
    ax.legend(fontsize=8)
    ax.set_title("Phases: generalization (novel valid) to memorization (copies)")
    return fig


def partial_copy_figure(metrics: pd.DataFrame, branching: int, depth: int) -> Figure:
    fig, ax = subplots(figsize=(6.4, 3.6))
    colors = colormaps["viridis"](np.linspace(0, 0.9, depth))
    for level in range(depth):
        name = _level_name(level, branching, depth)
        ax.plot(metrics["step"], metrics[f"frac_block_copy_l{level}"], "o-", color=colors[level], label=name)
        ax.axhline(metrics[f"chance_block_copy_l{level}"].iloc[0], color=colors[level], ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("training step")
    ax.set_ylabel("fraction of blocks copied")
    ax.set_title("Partial (hierarchical) copies per level; dotted = chance for a fresh grammar sample")
    ax.legend(fontsize=7)
    return fig


def scores_figure(per_example: pd.DataFrame, correlations: dict[str, Any], names: list[str]) -> Figure:
    cols = 3
    rows = int(np.ceil(len(names) / cols))
    fig, axes = subplots(rows, cols, figsize=(11, 2.9 * rows), squeeze=False)
    rng = np.random.default_rng(0)
    first = per_example["first_memorized_index"].to_numpy()
    n_ckpt = int(first.max()) if len(first) else 0
    for ax, name in zip(axes.ravel(), names, strict=False):
        y = first + rng.uniform(-0.25, 0.25, size=len(first))
        ax.scatter(per_example[name], y, s=8, alpha=0.55, color="#2d6ca2")
        c = correlations.get(name, {})
        ax.set_title(
            f"{name}\nrho={c.get('rho', np.nan):+.2f} p_cal={c.get('p_calibrated', np.nan):.2g}", fontsize=8
        )
        ax.set_ylabel("first memorized checkpoint", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.axhline(n_ckpt - 0.5, color="#bbb", lw=0.8)
    for ax in axes.ravel()[len(names) :]:
        ax.axis("off")
    fig.suptitle("Memorization vs prototypicality (top row of points = never memorized)", fontsize=10)
    fig.tight_layout()
    return fig


def survival_figure(per_example: pd.DataFrame, steps: np.ndarray, score: str) -> Figure:
    fig, ax = subplots(figsize=(6, 3.4))
    values = per_example[score].to_numpy(dtype=float)
    first = per_example["first_memorized_index"].to_numpy()
    edges = np.nanquantile(values, [0, 0.25, 0.5, 0.75, 1.0])
    which = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, 3)
    for q in range(4):
        member = first[which == q]
        if member.size == 0:
            continue
        curve = [(member > t).mean() for t in range(len(steps))]
        ax.step(
            steps, curve, where="post", color=QUARTILE_COLORS[q], lw=2, label=f"Q{q + 1} (n={member.size})"
        )
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("training step")
    ax.set_ylabel("not yet memorized")
    ax.set_title(f"Survival by quartile of {score} (Q4 = most prototypical)")
    ax.legend(fontsize=8)
    return fig


def null_figure(nulls: pd.DataFrame, score: str, observed: float, endpoint: str = "copies") -> Figure:
    fig, ax = subplots(figsize=(6, 3.2))
    if "endpoint" in nulls:
        nulls = nulls[nulls["endpoint"] == endpoint]
    for name, color in (("grammar", "#95a5a6"), ("calibrated", "#e67e22")):
        rho = nulls[(nulls["score"] == score) & (nulls["null"] == name)]["rho"].dropna()
        if len(rho):
            ax.hist(rho, bins=30, alpha=0.6, color=color, label=f"{name} null")
    ax.axvline(observed, color="#c0392b", lw=2, label=f"observed {observed:+.2f}")
    ax.set_xlabel(f"Spearman rho({score}, earliness)")
    ax.set_ylabel("Monte Carlo draws")
    ax.legend(fontsize=8)
    ax.set_title(f"Observed correlation against the nulls ({endpoint} endpoint)")
    return fig


def likelihood_figure(metrics: pd.DataFrame) -> Figure:
    """Median likelihood gain of training and held-out strings, and the memorization threshold, per step."""
    fig, ax = subplots(figsize=(6, 3.4))
    steps = metrics["step"]
    for column, style, color, label in (
        ("median_gain", "o-", "#c0392b", "training strings (median gain)"),
        ("median_gain_heldout", "s-", "#7f8c8d", "held-out strings (median gain)"),
        ("likelihood_threshold", "--", "#2c3e50", "threshold (held-out quantile)"),
    ):
        ax.plot(steps, metrics[column], style, color=color, label=label)
    ax.axhline(0, color="#bbb", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("nats")
    ax.legend(fontsize=8)
    ax.set_title("Likelihood gain over matched held-out strings")
    return fig


def power_figure(power: dict[str, Any]) -> Figure:
    """Power of the pooled test against both nulls vs the number of conditions, one line per endpoint."""
    fig, ax = subplots(figsize=(6, 3.4))
    for endpoint, color in (("copies", "#c0392b"), ("likelihood", "#2d6ca2")):
        curve = power.get(endpoint)
        if not curve:
            continue
        required = curve["required"]
        label = f"{endpoint} endpoint" + (f" (>= {curve['target']:.0%} at {required})" if required else "")
        ax.plot(curve["conditions"], curve["power"], "-", color=color, label=label)
        if required:
            ax.axvline(required, color=color, ls=":", lw=1)
    any_curve = next((c for c in (power.get("copies"), power.get("likelihood")) if c), None)
    if any_curve:
        ax.axhline(any_curve["target"], color="#999", ls="--", lw=1)
        ax.set_title(
            f"Power to detect rho = {any_curve['effect']} beyond both nulls at alpha = {any_curve['alpha']}",
            fontsize=10,
        )
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("conditions (like those run)")
    ax.set_ylabel("power")
    ax.legend(fontsize=8)
    return fig


def expected_copies_figure(per_example: pd.DataFrame) -> Figure:
    fig, ax = subplots(figsize=(5.2, 3.6))
    x = per_example["expected_copies"].to_numpy()
    y = per_example["copies_final"].to_numpy()
    ax.scatter(x, y + 0.5, s=10, alpha=0.6, color="#2d6ca2")
    lim = [max(min(x.min(), 1e-4), 1e-6), max(x.max(), y.max() + 1) * 1.5]
    ax.plot(lim, lim, color="#999", ls="--", lw=1, label="observed = K p(x)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("expected copies K p(x) (a model that learned the grammar)")
    ax.set_ylabel("observed copies + 0.5 (final)")
    ax.legend(fontsize=8)
    ax.set_title("Copies at the final checkpoint vs the grammar's expectation")
    return fig


def slop_figure(slop: pd.DataFrame, n_train: int, n_samples: int, branching: int, depth: int) -> Figure:
    from protomem.memorization.slop import overproduction_curve

    levels = [lv for lv in range(1, depth)] or [0]
    fig, axes = subplots(1, len(levels), figsize=(3.8 * len(levels), 3.4), squeeze=False)
    steps = np.sort(slop["step"].unique())
    colors = colormaps["plasma"](np.linspace(0, 0.85, len(steps)))
    for ax, level in zip(axes[0], levels, strict=True):
        for color, step in zip(colors, steps, strict=True):
            part = slop[(slop["step"] == step) & (slop["level"] == level)]
            centers, ratio, _ = overproduction_curve(
                part["train_count"], part["sample_count"], n_train, n_samples
            )
            ok = ~np.isnan(ratio) & (ratio > 0)
            ax.plot(centers[ok], ratio[ok], "o-", color=color, ms=3, lw=1, label=f"step {step}")
        part = slop[(slop["step"] == steps[-1]) & (slop["level"] == level)]
        centers, ratio, _ = overproduction_curve(
            part["train_count"], part["grammar_prob"] * n_samples, n_train, n_samples
        )
        ok = ~np.isnan(ratio) & (ratio > 0)
        ax.plot(centers[ok], ratio[ok], "k--", lw=1, label="grammar")
        ax.axhline(1.0, color="#999", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("block frequency in training set", fontsize=8)
        ax.set_title(_level_name(level, branching, depth), fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("overproduction (sample freq / train freq)", fontsize=8)
    axes[0][-1].legend(fontsize=6)
    fig.suptitle("Slop: over-production of training blocks by how common they are", fontsize=10)
    fig.tight_layout()
    return fig


def logistic_figure(coefficients: dict[str, dict[str, float]]) -> Figure:
    fig, ax = subplots(figsize=(5.5, 0.45 * max(len(coefficients), 1) + 1.2))
    names = list(coefficients)
    for i, name in enumerate(names):
        c = coefficients[name]
        ax.errorbar(
            c["coef"],
            i,
            xerr=[[c["coef"] - c["ci_low"]], [c["ci_high"] - c["coef"]]],
            fmt="o",
            color="#2d6ca2",
        )
    ax.axvline(0, color="#999", lw=1)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("log-odds of memorized per SD (95% bootstrap CI)")
    ax.set_title("Which notion of prototypicality carries the effect (joint model)")
    return fig


def _draw_tree(ax: Any, grammar: Any, tokens: np.ndarray, title: str) -> None:
    """The derivation tree of one string on ``ax``: symbols at internal nodes ("?" = does not reduce)."""
    from protomem.grammar import parse

    result = parse(grammar, np.asarray(tokens)[None, :])
    s, depth = grammar.branching, grammar.depth
    n_leaves = s**depth
    xs_children = np.arange(n_leaves, dtype=float)
    leaf_box = {"boxstyle": "round,pad=0.2", "fc": "#fdebd0", "ec": "#aaa"}
    node_box = {"boxstyle": "circle,pad=0.2", "fc": "#d6eaf8", "ec": "#888"}
    for i, token in enumerate(tokens):
        ax.text(xs_children[i], 0, str(int(token)), ha="center", va="center", fontsize=7, bbox=leaf_box)
    for level in range(depth - 1, -1, -1):
        xs = xs_children.reshape(-1, s).mean(axis=1)
        y = depth - level
        for j, x in enumerate(xs):
            for c in range(s):
                ax.plot([x, xs_children[j * s + c]], [y - 0.15, y - 0.85], color="#bbb", lw=0.8)
            symbol = int(result.symbols[level][0, j])
            label = str(symbol) if symbol >= 0 else "?"
            ax.text(x, y, label, ha="center", va="center", fontsize=7, bbox=node_box)
        xs_children = xs
    ax.set_xlim(-0.8, n_leaves - 0.2)
    ax.set_ylim(-0.6, depth + 0.6)
    ax.axis("off")
    ax.set_title(title, fontsize=7)


def trees_figure(grammar: Any, strings: list[tuple[np.ndarray, str]]) -> Figure:
    """Derivation trees of several strings (tokens, title), three per row."""
    cols = 3
    rows = int(np.ceil(len(strings) / cols))
    width = max(3.2, 0.3 * grammar.branching**grammar.depth + 1)
    fig, axes = subplots(rows, cols, figsize=(2 * width, 2.5 * rows), squeeze=False)
    for ax, (tokens, title) in zip(axes.ravel(), strings, strict=False):
        _draw_tree(ax, grammar, tokens, title)
    for ax in axes.ravel()[len(strings) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def forest_figure(rows: list[dict[str, Any]], pooled: dict[str, Any] | None) -> Figure:
    """Per-condition rho with 95% CI and null means; the pooled estimate at the bottom."""
    fig, ax = subplots(figsize=(7, 0.45 * (len(rows) + 2) + 1.2))
    labels = []
    for i, row in enumerate(rows):
        ax.errorbar(
            row["rho"],
            i,
            xerr=[[row["rho"] - row["ci_low"]], [row["ci_high"] - row["rho"]]],
            fmt="o",
            color="#2d6ca2",
        )
        ax.plot(row.get("null_mean_calibrated", np.nan), i, "x", color="#e67e22")
        ax.plot(row.get("null_mean_grammar", np.nan), i, "+", color="#7f8c8d")
        labels.append(row["name"])
    if pooled is not None:
        i = len(rows)
        ax.plot(pooled["rho"], i, "D", color="#c0392b")
        ax.plot(pooled["null_mean_calibrated"], i, "x", color="#e67e22")
        labels.append("pooled")
    ax.axvline(0, color="#999", lw=1)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(
        "Spearman rho(prototypicality, earliness of memorization); x = calibrated null, + = grammar null"
    )
    ax.set_title("Per condition (95% bootstrap CI)")
    return fig
