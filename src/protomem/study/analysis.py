"""From the evaluations of one condition to its tables and verdict numbers.

Reads ``evals/step_*.parquet`` (every sample of every evaluation, classified) and writes samples.parquet,
metrics.parquet, per_example.parquet, slop.parquet and nulls.parquet; returns the summary dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from protomem.grammar import RHM, Derivations, enumerate_strings, n_valid_strings, sample_strings
from protomem.grammar.prototypicality import prototypicality_table
from protomem.io import atomic_path
from protomem.memorization.hierarchy import chance_block_copy_fraction
from protomem.memorization.slop import sample_block_counts, training_blocks
from protomem.memorization.tracking import copies_per_checkpoint, expected_copies, first_memorized
from protomem.study import stats
from protomem.study.config import ConditionConfig
from protomem.study.likelihood_endpoint import likelihood_endpoint, likelihood_nulls, likelihood_summary
from protomem.study.pipeline import EVALS_DIR, write_table
from protomem.study.slop_test import window_test

# Scores analysed, and the sign that makes "higher = more prototypical".
SCORE_SIGNS = {"nn_hamming": -1.0}
MODEL_SCORES = (
    "logprob",
    "rule_count_mean",
    "block_count_same_pos_l{low}",
    "block_count_same_pos_l1",
    "nn_hamming",
)


def beyond_likelihood_name(score: str) -> str:
    """Name of ``score`` with log p(x) held out (its rank residual; higher = more prototypical)."""
    return f"{score}_beyond_logprob"


def level_label(level: int, grammar: RHM) -> str:
    """'level 2 (2-token blocks)'."""
    size = grammar.branching ** (grammar.depth - level)
    return f"level {level} ({size}-token blocks)"


def _read_evals(out_dir: Path) -> tuple[pa.Table, pa.Table | None]:
    files = sorted((out_dir / EVALS_DIR).glob("step_*.parquet"))
    if not files:
        raise RuntimeError(f"{out_dir}: training produced no evaluations")
    train_table = pa.concat_tables([pq.read_table(f) for f in files])
    finer = out_dir / EVALS_DIR / "finer.parquet"
    return train_table, (pq.read_table(finer) if finer.is_file() else None)


def grammar_mass_per_bin(grammar: RHM, edges: np.ndarray, n_samples: int, seed: int) -> np.ndarray:
    """(B,) probability mass of all grammar strings per log p(x) bin: exact for small grammars, else MC."""
    if n_valid_strings(grammar) <= 300_000:
        logp = enumerate_strings(grammar).logprob
        weights = np.exp(logp)
    else:
        logp = sample_strings(grammar, n_samples, seed=seed).logprob
        weights = np.full(len(logp), 1.0 / len(logp))
    which = np.clip(np.searchsorted(edges, logp, side="right") - 1, 0, len(edges) - 2)
    return np.bincount(which, weights=weights, minlength=len(edges) - 1)


def analyze_condition(
    config: ConditionConfig, out_dir: Path, grammar: RHM, data: Derivations, *, progress: bool = True
) -> dict[str, Any]:
    """Write the condition's tables and return its summary (without "status")."""
    analysis = config.analysis
    rng = np.random.default_rng(analysis.seed)
    evals, finer = _read_evals(out_dir)
    all_samples = evals if finer is None else pa.concat_tables([evals, finer])
    with_step = all_samples.sort_by(
        [("sampler", "descending"), ("step", "ascending"), ("sample", "ascending")]
    )
    write_table_pa(out_dir / "samples.parquet", with_step)

    steps = np.unique(evals.column("step").to_numpy())
    n_ckpt = len(steps)
    step_col = evals.column("step").to_numpy()
    tokens_all = np.array(evals.column("tokens").to_pylist(), dtype=np.int64)
    copy_all = evals.column("copy_index").to_numpy()
    status_all = np.array(evals.column("status").to_pylist())
    logprob_all = evals.column("logprob").to_numpy()
    K = config.evaluation.n_samples
    P = len(data.tokens)
    depth = grammar.depth

    # --- tracking -------------------------------------------------------------------------------
    per_step_copies = [copy_all[step_col == s] for s in steps]
    copies = copies_per_checkpoint(per_step_copies, P)
    expected = expected_copies(data.logprob, K)
    first_index, first_step = first_memorized(copies, expected, steps, analysis.min_excess)

    # --- metrics per checkpoint --------------------------------------------------------------------
    chance = chance_block_copy_fraction(grammar, data.tokens)
    blocks = training_blocks(grammar, data.tokens)
    metrics: dict[str, list] = {k: [] for k in ("step", "loss", "seconds")}
    slop_rows: dict[str, list] = {
        k: [] for k in ("step", "level", "position", "train_count", "sample_count", "grammar_prob")
    }
    counts_per_checkpoint: list[np.ndarray] = []
    for t, s in enumerate(steps):
        rows = step_col == s
        metrics["step"].append(int(s))
        metrics["loss"].append(float(evals.column("loss").to_numpy()[rows][0]))
        metrics["seconds"].append(float(evals.column("seconds").to_numpy()[rows][0]))
        status = status_all[rows]
        for name, key in (
            ("copy", "frac_exact_copy"),
            ("novel_valid", "frac_novel_valid"),
            ("invalid", "frac_invalid"),
        ):
            metrics.setdefault(key, []).append(float((status == name).mean()))
        for level in range(depth):
            copied = np.array(evals.column(f"copied_l{level}").filter(pa.array(rows)).to_pylist(), dtype=bool)
            metrics.setdefault(f"frac_block_copy_l{level}", []).append(float(copied.mean()))
            metrics.setdefault(f"chance_block_copy_l{level}", []).append(float(chance[level]))
        metrics.setdefault("distinct_copied", []).append(int((copies[:, t] > 0).sum()))
        metrics.setdefault("frac_memorized", []).append(float((first_index <= t).mean()))
        sample_counts = sample_block_counts(grammar, blocks, tokens_all[rows])
        counts_per_checkpoint.append(sample_counts)
        for level in range(depth):
            at = blocks["level"] == level
            metrics.setdefault(f"slop_slope_l{level}", []).append(
                slop_slope(blocks["train_count"][at], sample_counts[at], P, int(rows.sum()))
            )
            metrics.setdefault(f"grammar_slope_l{level}", []).append(
                slop_slope(
                    blocks["train_count"][at],
                    blocks["grammar_prob"][at] * int(rows.sum()),
                    P,
                    int(rows.sum()),
                )
            )
        slop_rows["step"].append(np.full(len(sample_counts), s))
        slop_rows["level"].append(blocks["level"])
        slop_rows["position"].append(blocks["position"])
        slop_rows["train_count"].append(blocks["train_count"])
        slop_rows["sample_count"].append(sample_counts)
        slop_rows["grammar_prob"].append(blocks["grammar_prob"])
    slop_columns = {k: np.concatenate(v) for k, v in slop_rows.items()}
    slop_columns["tokens"] = [" ".join(map(str, b)) for b in blocks["tokens"]] * n_ckpt
    write_table(out_dir / "slop.parquet", slop_columns)

    # --- prototypicality and per-example table ---------------------------------------------------
    scores = prototypicality_table(grammar, data.tokens)
    # Prototypical strings are also likely ones: the primary score with log p(x) held out (exploratory).
    primary_name = analysis.primary_score
    if primary_name != "logprob" and stats.varies(scores["logprob"]):
        signed_primary = SCORE_SIGNS.get(primary_name, 1.0) * np.asarray(scores[primary_name], float)
        scores[beyond_likelihood_name(primary_name)] = stats.rank_residual(signed_primary, scores["logprob"])
    per_example: dict[str, Any] = {
        "index": np.arange(P),
        "tokens": data.tokens.tolist(),
        "class": data.classes,
        **scores,
        "expected_copies": expected,
        "copies": copies.tolist(),
        "copies_final": copies[:, -1],
        "excess_final": copies[:, -1] - expected,
        "first_memorized_index": first_index,
        "first_memorized_step": first_step,
        "memorized_final": first_index < n_ckpt,
    }

    # --- calibrated baseline: the model's own rate of novel strings per log p(x) bin ------------------
    quantiles = np.quantile(data.logprob, np.linspace(0, 1, analysis.calibration_bins + 1)[1:-1])
    edges = np.concatenate([[-np.inf], np.unique(quantiles), [np.inf]])
    mass = grammar_mass_per_bin(grammar, edges, analysis.calibration_samples, analysis.seed + 1)
    train_bin = np.clip(np.searchsorted(edges, data.logprob, side="right") - 1, 0, len(edges) - 2)
    train_mass = np.bincount(train_bin, weights=np.exp(data.logprob), minlength=len(edges) - 1)
    novel_mass = np.clip(mass - train_mass, 0.0, None)
    factors = np.zeros((len(edges) - 1, n_ckpt))
    for t, s in enumerate(steps):
        rows = step_col == s
        novel = status_all[rows] == "novel_valid"
        factors[:, t] = stats.calibration_factors(
            logprob_all[rows], novel, edges, novel_mass, int(rows.sum())
        )
    grammar_baseline = np.repeat(expected[:, None], n_ckpt, axis=1)
    calibrated_baseline = expected[:, None] * factors[train_bin]
    per_example["calibration_factor_final"] = factors[train_bin, -1]

    # --- nulls -------------------------------------------------------------------------------------
    total = copies.sum(axis=0).astype(float)
    null_first = {}
    for name, baseline in (("grammar", grammar_baseline), ("calibrated", calibrated_baseline)):
        shape = stats.dispersion_shape(copies[:, -1], baseline[:, -1])
        null_first[name] = stats.simulate_first_index(
            baseline, expected, total, shape, analysis.n_null_draws, analysis.min_excess, rng
        )

    # Scores constant over the training set (e.g. whole-string duplicates of distinct strings) say nothing.
    score_names = [c for c in [*scores] if stats.varies(scores[c])]
    null_columns: dict[str, list] = {"endpoint": [], "score": [], "null": [], "draw": [], "rho": []}
    correlations = correlate_scores(
        scores, score_names, first_index, null_first, analysis, "copies", null_columns
    )

    # --- the likelihood endpoint: the model's own ELBO of training vs matched held-out strings ---------
    likelihood = likelihood_endpoint(config, out_dir, data, steps)
    correlations_likelihood: dict[str, Any] = {}
    if likelihood is not None:
        per_example["likelihood_gain"] = likelihood["gain"].tolist()
        per_example["first_memorized_index_likelihood"] = likelihood["first_index"]
        per_example["first_memorized_step_likelihood"] = likelihood["first_step"]
        metrics["likelihood_threshold"] = likelihood["thresholds"].tolist()
        metrics["median_gain"] = np.median(likelihood["gain"], axis=0).tolist()
        metrics["median_gain_heldout"] = np.median(likelihood["heldout_gain"], axis=0).tolist()
        metrics["frac_memorized_likelihood"] = [
            float((likelihood["first_index"] <= t).mean()) for t in range(n_ckpt)
        ]
        correlations_likelihood = correlate_scores(
            scores,
            score_names,
            likelihood["first_index"],
            likelihood_nulls(likelihood, data, analysis),
            analysis,
            "likelihood",
            null_columns,
        )
    write_table(out_dir / "metrics.parquet", metrics)
    write_table(out_dir / "per_example.parquet", per_example)

    # --- multi-score model at the most informative checkpoint -----------------------------------
    cut = stats.halfway_checkpoint(first_index, n_ckpt)
    model_names = [n.replace("{low}", str(depth - 1)) for n in MODEL_SCORES]
    model_scores = {
        n: SCORE_SIGNS.get(n, 1.0) * np.asarray(scores[n], float) for n in dict.fromkeys(model_names)
    }
    logistic = stats.logistic_model(
        model_scores, first_index <= cut, n_bootstrap=min(200, analysis.n_bootstrap), seed=analysis.seed
    )

    # --- finer sampler check ---------------------------------------------------------------------
    finer_summary = None
    if finer is not None:
        finer_copy = finer.column("copy_index").to_numpy()
        finer_copies = np.bincount(finer_copy[finer_copy >= 0], minlength=P)
        primary = SCORE_SIGNS.get(analysis.primary_score, 1.0) * np.asarray(
            scores[analysis.primary_score], float
        )
        rho_train = stats.spearman(primary, copies[:, -1] - expected)
        rho_finer = stats.spearman(primary, finer_copies - expected)
        finer_summary = {
            "sampling_steps": config.finer_sampling_steps(),
            "training_sampling_steps": config.diffusion_config().resolved_sampling_steps(),
            "frac_exact_copy": float((finer_copy >= 0).mean()),
            "frac_exact_copy_training_sampler": float(metrics["frac_exact_copy"][-1]),
            "rho_excess_copies": rho_finer,
            "rho_excess_copies_training_sampler": rho_train,
            "consistent": bool(np.sign(np.nan_to_num(rho_finer)) == np.sign(np.nan_to_num(rho_train))),
        }

    # slop in the partial-memorization regime: checkpoints before exact copies exceed 5% of samples
    copy_frac = np.asarray(metrics["frac_exact_copy"])
    pre = np.flatnonzero(np.cumsum(copy_frac >= 0.05) == 0)
    slop_summary = {}
    for level in range(1, depth):
        slopes = np.asarray(metrics[f"slop_slope_l{level}"], float)
        slop_summary[f"l{level}"] = {
            "block_tokens": grammar.branching ** (depth - level),
            "slope_before_copying": _nanmean(slopes[pre]),
            "slope_final": float(slopes[-1]),
            "grammar_slope": float(metrics[f"grammar_slope_l{level}"][0]),
        }
    # the test of slop over that window, against a grammar sampler and a calibrated (sharpened-grammar) null
    tested = window_test(
        blocks,
        [counts_per_checkpoint[t] for t in pre],
        list(range(1, depth)),
        P,
        [int((step_col == steps[t]).sum()) for t in pre],
        analysis.n_null_draws,
        np.random.default_rng([analysis.seed, 2]),
    )
    slop_test_summary = None
    if tested is not None:
        slop_test_summary = {"slope": tested["slope"], "per_level": tested["per_level"]}
        for null_name, values in tested["null_draws"].items():
            slop_test_summary[f"null_mean_{null_name}"] = _nanmean(values)
            slop_test_summary[f"p_{null_name}"] = stats.tail_p(tested["slope"], values)
            append_null_draws(null_columns, "slop", "slop_slope", null_name, values)
    write_table(out_dir / "nulls.parquet", null_columns)
    nan = float("nan")
    primary = correlations.get(
        analysis.primary_score, {"rho": nan, "ci_low": nan, "ci_high": nan, "p_permutation": nan}
    )
    summary = {
        "name": config.name,
        "grammar": {
            "vocab_size": grammar.vocab_size,
            "rules_per_symbol": grammar.rules_per_symbol,
            "depth": grammar.depth,
            "zipf_exponent": grammar.zipf_exponent,
            "n_strings": float(n_valid_strings(grammar)),
        },
        "n_train": P,
        "n_samples": K,
        "train_mass": float(np.exp(data.logprob).sum()),
        "steps": steps.tolist(),
        "sampling_steps": config.diffusion_config().resolved_sampling_steps(),
        "final": {k: v[-1] for k, v in metrics.items()},
        "frac_memorized_final": float((first_index < n_ckpt).mean()),
        "primary_score": analysis.primary_score,
        "primary": primary,
        "correlations": correlations,
        "likelihood": likelihood_summary(likelihood, first_index, n_ckpt, analysis, correlations_likelihood),
        "logistic": {"checkpoint_step": int(steps[cut]), "coefficients": logistic},
        "finer_sampler": finer_summary,
        "slop": {
            "checkpoints_before_copying": steps[pre].tolist(),
            "levels": slop_summary,
            "test": slop_test_summary,
        },
        "alpha": analysis.alpha,
        "verdict": verdict_sentence(
            primary, analysis.primary_score, analysis.alpha, (first_index < n_ckpt).sum()
        ),
    }
    return summary


def append_null_draws(
    columns: dict[str, list], endpoint: str, score: str, null: str, values: np.ndarray
) -> None:
    """Add one null's draws of one statistic to the nulls.parquet columns (endpoint, score, null, draw, rho;
    "rho" holds the statistic whatever it is)."""
    columns["endpoint"] += [endpoint] * len(values)
    columns["score"] += [score] * len(values)
    columns["null"] += [null] * len(values)
    columns["draw"] += list(range(len(values)))
    columns["rho"] += np.asarray(values, dtype=float).tolist()


def correlate_scores(
    scores: dict[str, np.ndarray],
    score_names: list[str],
    first_index: np.ndarray,
    null_first: dict[str, np.ndarray],
    analysis: Any,
    endpoint: str,
    null_columns: dict[str, list],
) -> dict[str, Any]:
    """Spearman rho of every score with the earliness of ``first_index`` (P,), with bootstrap interval,
    permutation p and the Monte Carlo p against each null's (D, P) first indices; null rhos are appended to
    ``null_columns``. The secondary scores' p-values get Benjamini-Hochberg adjusted ones."""
    correlations: dict[str, Any] = {}
    early = stats.earliness(first_index)
    for name in score_names:
        signed = SCORE_SIGNS.get(name, 1.0) * np.asarray(scores[name], dtype=float)
        result = stats.spearman_with_uncertainty(
            signed,
            early,
            n_bootstrap=analysis.n_bootstrap,
            n_permutations=analysis.n_permutations,
            seed=analysis.seed,
        ).to_dict()
        for null_name, draws in null_first.items():
            rhos = stats.null_rhos(signed, draws)
            result[f"null_mean_{null_name}"] = _nanmean(rhos)
            result[f"null_sd_{null_name}"] = _nanstd(rhos)
            result[f"p_{null_name}"] = stats.tail_p(result["rho"], rhos)
            append_null_draws(null_columns, endpoint, name, null_name, rhos)
        result["direction"] = "higher = more prototypical" if SCORE_SIGNS.get(name, 1.0) > 0 else "negated"
        correlations[name] = result
    # The primary score is the one pre-specified test; the others are a family: adjust their p-values.
    for null_name in null_first:
        secondary = {n: c[f"p_{null_name}"] for n, c in correlations.items() if n != analysis.primary_score}
        for name, adjusted in stats.adjusted_p_values(secondary).items():
            correlations[name][f"p_{null_name}_bh"] = adjusted
    return correlations


def _nanstd(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    return float(values.std()) if values.size > 1 else float("nan")


def _nanmean(values: np.ndarray) -> float:
    """Mean of the non-NaN values, NaN (without a warning) when there are none."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def slop_slope(train_count: np.ndarray, sample_count: np.ndarray, n_train: int, n_samples: int) -> float:
    """Least-squares slope of log(sample freq / train freq) on log(train freq) over the blocks.

    Positive: the more common a block is in the training set, the more it is overproduced (slop). Sample
    counts get +0.5 so blocks never sampled stay finite. NaN with fewer than 3 distinct frequencies.
    """
    train_freq = np.asarray(train_count, float) / n_train
    sample_freq = (np.asarray(sample_count, float) + 0.5) / max(n_samples, 1)
    x = np.log(train_freq)
    if np.unique(x).size < 3:
        return float("nan")
    y = np.log(sample_freq) - x
    return float(np.polyfit(x, y, 1)[0])


def verdict_lead(p_calibrated: float, p_grammar: float, alpha: float) -> str:
    """The verdict's first words, from the p-values against the two nulls.

    The claim needs both nulls beaten. When only one is, say which: beating the calibrated null alone
    means prototypical strings are copied earlier than the model's own rate for strings of their
    likelihood predicts, yet no earlier than copies at the grammar's rate p(x) would make them.
    """
    beats_calibrated, beats_grammar = p_calibrated < alpha, p_grammar < alpha
    if beats_calibrated and beats_grammar:
        return "Prototypical strings are memorized first"
    if beats_calibrated:
        return (
            "Prototypical strings are memorized earlier than the model's own rate for strings of the same "
            "likelihood predicts, but no earlier than copying at the grammar's rate predicts (not beyond "
            "both nulls)"
        )
    if beats_grammar:
        return (
            "Prototypical strings are memorized earlier than copying at the grammar's rate predicts, but no "
            "earlier than the model's own rate for strings of the same likelihood predicts (not beyond "
            "both nulls)"
        )
    return "The data do not support that prototypical strings are memorized first beyond the nulls"


def verdict_sentence(primary: dict[str, Any], score: str, alpha: float, n_memorized: int) -> str:
    """One sentence with the numbers; plain about a negative or inconclusive result."""
    rho, low, high = primary["rho"], primary["ci_low"], primary["ci_high"]
    p_cal, p_gram = primary.get("p_calibrated", np.nan), primary.get("p_grammar", np.nan)
    numbers = (
        f"Spearman rho({score}, earliness of first memorization) = {rho:+.2f}, "
        f"95% CI [{low:+.2f}, {high:+.2f}], "
        f"Monte Carlo p = {p_cal:.3g} against the calibrated null (null mean "
        f"{primary.get('null_mean_calibrated', np.nan):+.2f}) and p = {p_gram:.3g} against the grammar null "
        f"(null mean {primary.get('null_mean_grammar', np.nan):+.2f})"
    )
    if n_memorized < 5 or np.isnan(rho):
        return f"Too few strings were memorized ({n_memorized}) to say which are memorized first ({numbers})."
    return f"{verdict_lead(p_cal, p_gram, alpha)}: {numbers}."


def write_table_pa(path: Path, table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
