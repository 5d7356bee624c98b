"""The study's HTML reports, rebuilt from a run directory's tables alone (``protomem report RUN_DIR``).

A condition directory (summary.json + metrics/per_example/nulls/slop tables) gets ``report.html`` with
every figure; a study directory (``study.json`` + ``conditions/<name>/``) gets a report with the pooled
verdict, the per-condition table and forest plot, and links to each condition's report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd

from protomem.errors import ProtomemError
from protomem.grammar import load_grammar
from protomem.htmlreport import format_number
from protomem.textio import load_json, require_inside

STUDY_FILE = "study.json"


def _read(out_dir: Path, name: str) -> pd.DataFrame:
    path = out_dir / name
    if not path.is_file():
        raise ProtomemError(f"missing table {name}; is this a finished study run?", path=out_dir)
    try:
        return pd.read_parquet(require_inside(out_dir, path))
    except ProtomemError:
        raise
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise ProtomemError(f"not a readable table ({' '.join(str(exc).split())[:200]})", path=path) from None


def _summary(out_dir: Path) -> dict[str, Any]:
    path = out_dir / "summary.json"
    if not path.is_file():
        raise ProtomemError(
            "no summary.json: not a study run directory, or the run has not finished", path=out_dir
        )
    doc = load_json(require_inside(out_dir, path), "summary")
    if not isinstance(doc, dict):
        raise ProtomemError("summary.json is not a JSON object", path=path)
    return doc


def _version() -> str:
    import protomem

    return str(getattr(protomem, "__version__", ""))


def render_condition_report(out_dir: str | Path, summary: dict[str, Any] | None = None) -> Path:
    """Write ``out_dir/report.html`` from the condition's tables; returns its path."""
    from protomem.htmlreport import figure_img, render_page
    from protomem.study import figures
    from protomem.study.analysis import beyond_likelihood_name

    out_dir = Path(out_dir)
    summary = summary if summary is not None else _summary(out_dir)
    grammar = load_grammar(out_dir / "grammar.json")
    metrics = _read(out_dir, "metrics.parquet")
    per_example = _read(out_dir, "per_example.parquet")
    nulls = _read(out_dir, "nulls.parquet")
    slop = _read(out_dir, "slop.parquet")
    train_log_path = out_dir / "train" / "metrics.parquet"
    train_log = pd.read_parquet(train_log_path) if train_log_path.is_file() else None
    steps = metrics["step"].to_numpy()
    s, depth = grammar.branching, grammar.depth
    primary = summary["primary_score"]
    correlations = summary["correlations"]
    # the scores a reader compares: likelihood, rule and block frequencies, nearest-neighbour distance
    wanted = ["logprob", "rule_count_mean", f"rule_count_l{depth - 1}", "nn_hamming"]
    wanted += [f"block_count_same_pos_l{lv}" for lv in range(1, depth)]
    wanted.append(beyond_likelihood_name(primary))
    score_names = [n for n in dict.fromkeys([primary, *wanted]) if n in correlations]

    figs = {
        "loss": figure_img(figures.loss_figure(train_log, metrics), "training loss"),
        "phase": figure_img(figures.phase_figure(metrics), "copies, novel valid, invalid vs step"),
        "partial": figure_img(figures.partial_copy_figure(metrics, s, depth), "partial copies per level"),
        "scores": figure_img(
            figures.scores_figure(per_example, correlations, score_names), "memorization vs each score"
        ),
        "survival": figure_img(
            figures.survival_figure(per_example, steps, primary), f"survival by quartile of {primary}"
        ),
        "survival_logprob": figure_img(
            figures.survival_figure(per_example, steps, "logprob"), "survival by quartile of log p(x)"
        ),
        "nulls": figure_img(
            figures.null_figure(nulls, primary, correlations[primary]["rho"]), "observed rho vs the nulls"
        ),
        "expected": figure_img(figures.expected_copies_figure(per_example), "copies vs K p(x)"),
        "slop": figure_img(
            figures.slop_figure(slop, summary["n_train"], summary["n_samples"], s, depth), "slop per level"
        ),
    }
    likelihood = summary.get("likelihood")
    if likelihood:
        figs["likelihood"] = figure_img(figures.likelihood_figure(metrics), "likelihood gain per step")
        if primary in likelihood["correlations"]:
            figs["nulls_likelihood"] = figure_img(
                figures.null_figure(nulls, primary, likelihood["correlations"][primary]["rho"], "likelihood"),
                "observed rho vs the nulls (likelihood endpoint)",
            )
    coefficients = summary["logistic"]["coefficients"]
    if coefficients:
        figs["logistic"] = figure_img(figures.logistic_figure(coefficients), "joint logistic model")

    ranked = per_example.assign(
        _first=per_example["first_memorized_index"], _excess=-per_example["excess_final"]
    ).sort_values(["_first", "_excess", "index"])
    most, least = [], []
    for target, rows in ((most, ranked.head(3)), (least, ranked.tail(3).iloc[::-1])):
        for _, row in rows.iterrows():
            step = int(row["first_memorized_step"])
            title = (
                f"string {int(row['index'])}: first memorized {'never' if step < 0 else f'at step {step}'}; "
                f"copies {int(row['copies_final'])} (K p(x) = {row['expected_copies']:.2g})\n"
                f"{primary} = {row[primary]:.3g}, log p = {row['logprob']:.2f}, "
                f"nn Hamming = {int(row['nn_hamming'])}"
            )
            target.append((np.asarray(row["tokens"]), title))
    trees = [
        figure_img(figures.trees_figure(grammar, most), "the most memorized training strings", dpi=80),
        figure_img(figures.trees_figure(grammar, least), "the least memorized training strings", dpi=80),
    ]
    level_rows = [
        {
            "label": f"level {lv} ({s ** (depth - lv)}-token blocks)",
            "observed": format_number(float(metrics[f"frac_block_copy_l{lv}"].iloc[-1])),
            "chance": format_number(float(metrics[f"chance_block_copy_l{lv}"].iloc[0])),
            "slop": format_number(float(metrics[f"slop_slope_l{lv}"].iloc[-1])),
            "grammar_slope": format_number(float(metrics[f"grammar_slope_l{lv}"].iloc[-1])),
        }
        for lv in range(depth)
    ]
    correlation_rows = _correlation_rows(correlations, primary)
    likelihood_rows = _correlation_rows(likelihood["correlations"], primary) if likelihood else []
    metric_rows = metrics.to_dict("records")
    path = out_dir / "report.html"
    render_page(
        "study_condition.html.j2",
        path,
        summary=summary,
        figs=figs,
        trees=trees,
        level_rows=level_rows,
        correlation_rows=correlation_rows,
        likelihood_rows=likelihood_rows,
        metric_rows=metric_rows,
        depth=depth,
        fmt=format_number,
        positive=summary["verdict"].startswith("Prototypical"),
        protomem_version=_version(),
    )
    return path


def _correlation_rows(correlations: dict[str, Any], primary: str) -> list[dict[str, str]]:
    """One table row per score: rho, interval, permutation p, each null's mean and p, BH-adjusted p."""
    return [
        {
            "name": name,
            "rho": format_number(c["rho"], 2),
            "ci": f"[{format_number(c['ci_low'], 2)}, {format_number(c['ci_high'], 2)}]",
            "p_perm": format_number(c["p_permutation"]),
            "null_grammar": format_number(c.get("null_mean_grammar"), 2),
            "p_grammar": format_number(c.get("p_grammar")),
            "null_calibrated": format_number(c.get("null_mean_calibrated"), 2),
            "p_calibrated": format_number(c.get("p_calibrated")),
            "p_calibrated_bh": "primary" if name == primary else format_number(c.get("p_calibrated_bh")),
            "direction": c.get("direction", ""),
        }
        for name, c in correlations.items()
    ]


def render_study_report(study_dir: str | Path) -> Path:
    """Write ``study_dir/report.html`` (pooled verdict, per-condition table, forest plot, links)."""
    from protomem.htmlreport import figure_img, render_page
    from protomem.study import figures

    study_dir = Path(study_dir)
    doc_path = study_dir / STUDY_FILE
    if not doc_path.is_file():
        raise ProtomemError("no study.json: not a study run directory", path=study_dir)
    study = load_json(require_inside(study_dir, doc_path), "study record")
    if not isinstance(study, dict) or not isinstance(study.get("conditions"), list):
        raise ProtomemError("study.json has no list of conditions", path=doc_path)
    rows = []
    for name in study["conditions"]:
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            raise ProtomemError(f"study.json names a condition {name!r}"[:200], path=doc_path)
        condition_dir = study_dir / "conditions" / name
        summary = _summary(condition_dir)
        primary = summary["primary"]
        rows.append(
            {
                "name": name,
                "link": f"conditions/{name}/report.html",
                "rho": primary["rho"],
                "ci_low": primary["ci_low"],
                "ci_high": primary["ci_high"],
                "null_mean_calibrated": primary.get("null_mean_calibrated", np.nan),
                "null_mean_grammar": primary.get("null_mean_grammar", np.nan),
                "p_calibrated": primary.get("p_calibrated", np.nan),
                "p_grammar": primary.get("p_grammar", np.nan),
                "train_mass": summary["train_mass"],
                "zipf": summary["grammar"]["zipf_exponent"],
                "n_strings": summary["grammar"]["n_strings"],
                "frac_memorized": summary["frac_memorized_final"],
                "frac_copy": summary["final"]["frac_exact_copy"],
                "threads": summary.get("threads"),
                "seconds": summary.get("train_seconds"),
                "finer": summary.get("finer_sampler") or {},
                "slop": summary.get("slop", {}).get("levels", {}),
                "slop_test": summary.get("slop", {}).get("test") or {},
                "design": summary.get("training_set") or {},
                "likelihood": summary.get("likelihood") or {},
            }
        )
    pooled = study.get("pooled")
    figs = {"forest": figure_img(figures.forest_figure(rows, pooled), "per-condition correlations")}
    power = study.get("power") or {}
    if power.get("copies") or power.get("likelihood"):
        figs["power"] = figure_img(figures.power_figure(power), "power vs number of conditions")
    survival = []
    for row in rows:
        condition_dir = study_dir / "conditions" / row["name"]
        per_example = _read(condition_dir, "per_example.parquet")
        steps = _read(condition_dir, "metrics.parquet")["step"].to_numpy()
        fig = figures.survival_figure(per_example, steps, study["primary_score"])
        fig.axes[0].set_title(f"{row['name']}: survival by quartile of {study['primary_score']}", fontsize=9)
        survival.append(figure_img(fig, f"survival curves of {row['name']}"))
    path = study_dir / "report.html"
    render_page(
        "study.html.j2",
        path,
        study=study,
        rows=rows,
        figs=figs,
        survival=survival,
        fmt=format_number,
        positive=study["verdict"].startswith("Prototypical"),
        protomem_version=_version(),
    )
    return path


def render_report(run_dir: str | Path) -> Path:
    """Rebuild the report of a study directory, of one condition directory or of an image-study run.

    The folder is read as untrusted input: a missing, damaged or inconsistent file is a one-line error
    naming the folder, never a traceback.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ProtomemError("no such run directory", path=run_dir)
    try:
        if (run_dir / STUDY_FILE).is_file():
            return render_study_report(run_dir)
        if (run_dir / "evals.json").is_file() and not (run_dir / "grammar.json").exists():
            from protomem.study.images import rebuild_image_study

            return rebuild_image_study(run_dir) / "report.html"
        return render_condition_report(run_dir)
    except (
        KeyError,
        IndexError,
        TypeError,
        ValueError,
        AttributeError,
        ZeroDivisionError,
        jinja2.UndefinedError,  # the page template reads a field the record lacks or has of another type
    ) as exc:
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise ProtomemError(
            f"cannot rebuild the report: a table or record of this run is damaged or incomplete ({detail})",
            path=run_dir,
        ) from None
