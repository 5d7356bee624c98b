"""The likelihood endpoint of one condition, from its stored ELBOs (``evals/likelihood_step_*.parquet``).

Each evaluation stored the negative ELBO of every training string and of the held-out strings
(``heldout.parquet``). Here: the likelihood gain of every string (protomem.memorization.likelihood), the
threshold per checkpoint from the held-out strings' own gains, the first checkpoint each training string
exceeds it, and the endpoint's two nulls: the earliness shuffled within deciles of log p(x) (grammar
null: memorization order set by the grammar's likelihood alone) or within deciles of the model's own final
negative ELBO of each string's matched held-out strings (calibrated null: set by the model's likelihood of
comparable unseen strings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from protomem.grammar import Derivations
from protomem.io import read_strings
from protomem.memorization.likelihood import (
    first_exceeding,
    gain_thresholds,
    likelihood_gain,
    match_by_logprob,
)
from protomem.study import stats
from protomem.study.config import ConditionConfig
from protomem.study.design import tied_logprob
from protomem.study.pipeline import EVALS_DIR

LIKELIHOOD_STRATA = 10  # quantile strata of the stratified-permutation nulls


def likelihood_endpoint(
    config: ConditionConfig, out_dir: Path, data: Derivations, steps: np.ndarray
) -> dict[str, np.ndarray] | None:
    """Gains, thresholds and first memorized checkpoints from the stored ELBOs; None without them."""
    paths = [out_dir / EVALS_DIR / f"likelihood_step_{int(s):08d}.parquet" for s in steps]
    heldout_path = out_dir / "heldout.parquet"
    if not config.likelihood_draws() or not heldout_path.is_file():
        return None
    if not all(p.is_file() for p in paths):
        return None
    heldout = read_strings(heldout_path)
    if heldout.classes is None or heldout.logprobs is None:
        return None
    P, H = len(data.tokens), len(heldout.tokens)
    nll_train, nll_heldout = np.empty((P, len(steps))), np.empty((H, len(steps)))
    for t, path in enumerate(paths):
        table = pq.read_table(path).to_pandas()
        train_rows = table[table["set"] == "train"]
        heldout_rows = table[table["set"] == "heldout"]
        nll_train[train_rows["index"].to_numpy(), t] = train_rows["nll"].to_numpy()
        nll_heldout[heldout_rows["index"].to_numpy(), t] = heldout_rows["nll"].to_numpy()
    r = config.analysis.heldout_matches
    train_logprob, heldout_logprob = tied_logprob(data.logprob), tied_logprob(heldout.logprobs)
    matches = match_by_logprob(train_logprob, data.classes, heldout_logprob, heldout.classes, r)
    heldout_matches = match_by_logprob(
        heldout_logprob, heldout.classes, heldout_logprob, heldout.classes, r, exclude_self=True
    )
    gain = likelihood_gain(nll_train, nll_heldout, matches)
    heldout_gain = likelihood_gain(nll_heldout, nll_heldout, heldout_matches)
    thresholds = gain_thresholds(heldout_gain, config.analysis.likelihood_quantile)
    first_index, first_step = first_exceeding(gain, thresholds, steps)
    return {
        "gain": gain,
        "heldout_gain": heldout_gain,
        "thresholds": thresholds,
        "first_index": first_index,
        "first_step": first_step,
        "matched_heldout_nll_final": nll_heldout[matches, -1].mean(axis=1),
    }


def likelihood_summary(
    likelihood: dict[str, np.ndarray] | None,
    first_index_copies: np.ndarray,
    n_ckpt: int,
    analysis: Any,
    correlations: dict[str, Any],
) -> dict[str, Any] | None:
    """The likelihood endpoint's numbers for summary.json (None when the condition has no ELBOs)."""
    if likelihood is None:
        return None
    nan = float("nan")
    return {
        "quantile": analysis.likelihood_quantile,
        "heldout_matches": analysis.heldout_matches,
        "thresholds": likelihood["thresholds"].tolist(),
        "frac_memorized_final": float((likelihood["first_index"] < n_ckpt).mean()),
        # how the two earliness measures agree, string by string
        "agreement_rho": stats.spearman(
            stats.earliness(first_index_copies), stats.earliness(likelihood["first_index"])
        ),
        "primary": correlations.get(analysis.primary_score, {"rho": nan}),
        "correlations": correlations,
    }


def likelihood_nulls(
    likelihood: dict[str, np.ndarray], data: Derivations, analysis: Any
) -> dict[str, np.ndarray]:
    """(n_null_draws, P) first indices under each null: shuffled within deciles of log p(x) (grammar) or of
    the model's final negative ELBO of the string's matched held-out strings (calibrated)."""
    rng = np.random.default_rng([analysis.seed, 1])
    stratifiers = {
        "grammar": tied_logprob(data.logprob),
        "calibrated": likelihood["matched_heldout_nll_final"],
    }
    return {
        name: stats.stratified_permutations(
            likelihood["first_index"],
            stats.quantile_strata(values, LIKELIHOOD_STRATA),
            analysis.n_null_draws,
            rng,
        )
        for name, values in stratifiers.items()
    }
