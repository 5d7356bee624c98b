"""The study's statistics on synthetic data with known answers, and its config/presets."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from protomem.errors import ProtomemError
from protomem.study import stats
from protomem.study.config import ConditionConfig, apply_overrides
from protomem.study.presets import PRESETS, get_preset
from protomem.study.skew import skew_arm


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 60).astype(float)
    y = x + rng.normal(0, 2, 60)
    assert stats.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic)


def test_correlation_uncertainty_detects_a_planted_effect_and_not_noise():
    rng = np.random.default_rng(1)
    x = rng.normal(size=200)
    strong = stats.spearman_with_uncertainty(x, x + rng.normal(size=200), n_bootstrap=400, n_permutations=400)
    assert strong.ci_low < strong.rho < strong.ci_high
    assert strong.ci_low > 0.4 and strong.p_permutation < 0.01
    noise = stats.spearman_with_uncertainty(x, rng.normal(size=200), n_bootstrap=400, n_permutations=400)
    assert noise.ci_low < 0 < noise.ci_high and noise.p_permutation > 0.01


def _simulated_run(rng, n_train=150, n_ckpt=6, effect=0.0):
    """Copies from the same generative model as the null, optionally with propensity tied to a score."""
    score = rng.normal(size=n_train)
    logp = np.log(rng.uniform(1e-4, 4e-3, n_train))
    expected = 400 * np.exp(logp)
    propensity = rng.gamma(0.7, 1 / 0.7, n_train) * np.exp(effect * score)
    propensity *= n_train / propensity.sum()
    excess = np.linspace(20, 600, n_ckpt)
    copies = rng.poisson(expected[:, None] + propensity[:, None] * excess[None, :] / n_train)
    return score, expected, copies


def _null_p(rng, score, expected, copies, draws=300):
    baseline = np.repeat(expected[:, None], copies.shape[1], axis=1)
    shape = stats.dispersion_shape(copies[:, -1], baseline[:, -1])
    first = copies - np.round(expected)[:, None] >= 2
    first_index = np.where(first.any(axis=1), first.argmax(axis=1), copies.shape[1])
    observed = stats.spearman(score, stats.earliness(first_index))
    null_first = stats.simulate_first_index(baseline, expected, copies.sum(axis=0), shape, draws, 2, rng)
    return stats.tail_p(observed, stats.null_rhos(score, null_first))


def test_monte_carlo_null_is_calibrated_without_effect_and_detects_one():
    rng = np.random.default_rng(2)
    p_null = np.array([_null_p(rng, *_simulated_run(rng), draws=200) for _ in range(24)])
    # under the null p-values are about uniform: few below 0.05, mean near one half
    assert (p_null < 0.05).mean() <= 0.2
    assert 0.3 < p_null.mean() < 0.7
    p_effect = [_null_p(rng, *_simulated_run(rng, effect=1.0), draws=200) for _ in range(5)]
    assert max(p_effect) < 0.01


def test_dispersion_shape_recovers_gamma_shape():
    rng = np.random.default_rng(3)
    rate = rng.gamma(0.5, 20.0, 20_000)  # mean 10, shape 0.5
    copies = rng.poisson(rate)
    assert stats.dispersion_shape(copies, np.zeros_like(rate)) == pytest.approx(0.5, rel=0.1)
    assert stats.dispersion_shape(rng.poisson(10, 20_000), np.zeros(20_000)) > 20


def test_calibration_factors_recover_a_known_sampling_ratio():
    edges = np.array([-np.inf, -5.0, np.inf])
    novel_mass = np.array([0.5, 0.5])
    logprob = np.array([-6.0] * 100 + [-4.0] * 300 + [np.nan] * 600)
    novel = ~np.isnan(logprob)
    factors = stats.calibration_factors(logprob, novel, edges, novel_mass, 1000)
    assert factors.tolist() == pytest.approx([0.2, 0.6])


def test_logistic_model_finds_the_score_that_matters():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=400), rng.normal(size=400)
    outcome = rng.random(400) < 1 / (1 + np.exp(-2 * a))
    coef = stats.logistic_model({"a": a, "b": b}, outcome, n_bootstrap=50)
    assert coef["a"]["ci_low"] > 1.0
    assert coef["b"]["ci_low"] < 0 < coef["b"]["ci_high"]
    assert stats.logistic_model({"a": a}, np.zeros(400, bool)) == {}
    # a score constant up to float rounding (log p(x) under uniform rules) is left out, not standardized
    flat = np.full(400, -9.76972756) + rng.normal(0, 1e-15, 400)
    assert set(stats.logistic_model({"a": a, "flat": flat}, outcome, n_bootstrap=20)) == {"a"}
    assert not stats.varies(flat) and stats.varies(a) and not stats.varies(np.array([np.nan, 1.0]))


def test_presets_validate_and_overrides_are_checked():
    for name in PRESETS:
        preset = get_preset(name)
        assert preset.conditions and all(isinstance(c, ConditionConfig) for c in preset.conditions)
        for condition in preset.conditions:
            config = condition.diffusion_config()
            assert config.eval_samples == condition.evaluation.n_samples
            assert config.seq_len == condition.grammar.branching**condition.grammar.depth
    names = [c.name for c in get_preset("default").conditions]
    assert len(set(names)) == len(names)
    assert {c.grammar.zipf_exponent for c in get_preset("copy-first").conditions} == {0.0, 1.0}
    # the default and decisive presets: Zipf rules, matched training sets, disjoint seeds
    for name in ("default", "decisive"):
        conditions = get_preset(name).conditions
        assert {c.grammar.zipf_exponent for c in conditions} == {1.0}
        assert {c.data.design for c in conditions} == {"matched"}
    default_seeds = {c.grammar.seed for c in get_preset("default").conditions}
    assert not default_seeds & {c.grammar.seed for c in get_preset("decisive").conditions}
    # claim (b): three arms per seed sharing the grammar seed
    arms = {}
    for c in get_preset("zipf-levels").conditions:
        arms.setdefault(c.grammar.seed, set()).add(skew_arm(c))
    assert all(a == {"uniform", "top", "bottom"} for a in arms.values())
    base = get_preset("quick").conditions[0]
    changed = apply_overrides(base, {"grammar.zipf_exponent": 0.5, "diffusion.threads": 1})
    assert changed.grammar.zipf_exponent == 0.5 and changed.diffusion.threads == 1
    assert base.grammar.zipf_exponent == 1.0
    with pytest.raises(ProtomemError, match="diffusion.bogus"):
        apply_overrides(base, {"diffusion.bogus": 1})
    with pytest.raises(ProtomemError, match="lr"):
        apply_overrides(base, {"diffusion.lr": -1.0})
    with pytest.raises(ProtomemError, match="primary_score"):
        apply_overrides(base, {"analysis.primary_score": "block_count_same_pos_l7"})
    with pytest.raises(ProtomemError, match="unknown preset"):
        get_preset("huge")


def test_rank_residual_holds_the_control_out_of_a_score():
    rng = np.random.default_rng(3)
    likelihood = rng.normal(size=400)
    own = rng.normal(size=400)  # the part of the score that likelihood does not explain
    score = likelihood + 0.5 * own
    residual = stats.rank_residual(score, likelihood)
    # exactly uncorrelated with the control's ranks, and still carrying the score's own part
    assert abs(np.corrcoef(residual, scipy_stats.rankdata(likelihood))[0, 1]) < 1e-12
    assert stats.spearman(residual, own) > 0.7
    # an outcome driven by likelihood alone: the raw score correlates with it, its residual does not
    outcome = likelihood + rng.normal(0, 0.3, 400)
    assert stats.spearman(score, outcome) > 0.7 and abs(stats.spearman(residual, outcome)) < 0.1
    # an outcome driven by the score's own part is found through the residual
    assert stats.spearman(residual, own + rng.normal(0, 0.3, 400)) > 0.6
    # controls equal up to float rounding tie: same residual as exact ties
    tied = np.repeat([-3.0, -2.0], 200)
    jittered = tied + rng.normal(0, 1e-15, 400)
    np.testing.assert_allclose(stats.rank_residual(score, jittered), stats.rank_residual(score, tied))
    with_nan = score.copy()
    with_nan[5] = np.nan
    assert np.isnan(stats.rank_residual(with_nan, likelihood)[5])
    assert np.isfinite(np.delete(stats.rank_residual(with_nan, likelihood), 5)).all()


def test_verdict_names_the_null_that_was_not_beaten():
    from protomem.study.analysis import verdict_lead

    assert verdict_lead(0.002, 0.004, 0.01) == "Prototypical strings are memorized first"
    only_calibrated = verdict_lead(0.002, 0.066, 0.01)
    assert "grammar's rate" in only_calibrated.split("but")[1]
    assert only_calibrated.endswith("(not beyond both nulls)")
    only_grammar = verdict_lead(0.3, 0.004, 0.01)
    assert "own rate" in only_grammar.split("but")[1] and only_grammar.endswith("(not beyond both nulls)")
    assert verdict_lead(0.3, 0.5, 0.01).startswith("The data do not support")
    assert verdict_lead(float("nan"), 0.004, 0.01) == verdict_lead(0.5, 0.004, 0.01)  # NaN never beats


def test_generalize_first_preset_samples_the_generalization_phase_and_has_controls():
    conditions = get_preset("generalize-first").conditions
    names = [c.name for c in conditions]
    assert len(set(names)) == len(names) == 6
    assert sorted(c.grammar.zipf_exponent for c in conditions) == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    for condition in conditions:
        assert condition.data.n_train == 256 and condition.grammar.depth == 3
        eval_steps = condition.evaluation.eval_steps
        # the first evaluations fall before the scaling sweep's tau_gen at this P (about 55 steps)
        assert eval_steps[0] == 25 and eval_steps[1] < 55
        assert eval_steps[-1] == condition.diffusion.steps
    # every condition its own grammar, data and model seed within a rule family
    for zipf in (0.0, 1.0):
        family = [c for c in conditions if c.grammar.zipf_exponent == zipf]
        assert len({(c.grammar.seed, c.data.seed, c.diffusion.seed) for c in family}) == len(family)
    # the replication: the same design on new Zipf seeds only, none shared with the first run
    replication = get_preset("generalize-first-replication").conditions
    assert len(replication) == 6 and {c.grammar.zipf_exponent for c in replication} == {1.0}
    assert not {c.grammar.seed for c in replication} & {c.grammar.seed for c in conditions}
    assert not {c.data.seed for c in replication} & {c.data.seed for c in conditions}
    first = get_preset("generalize-first").conditions[0]
    assert replication[0].diffusion.model_copy(update={"seed": 0}) == first.diffusion


def test_adjusted_p_values_are_benjamini_hochberg_by_hand():
    # sorted raw p 0.01 < 0.03 < 0.04 with m = 3: p * m / rank = 0.03, 0.045, 0.04; then the running
    # minimum from the largest rank down: 0.03, 0.04, 0.04. NaN (an untestable score) is left out.
    adjusted = stats.adjusted_p_values({"a": 0.01, "b": 0.04, "c": 0.03, "d": float("nan")})
    assert adjusted == pytest.approx({"a": 0.03, "b": 0.04, "c": 0.04})
    assert stats.adjusted_p_values({"d": float("nan")}) == {}
