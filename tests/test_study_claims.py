"""The claims machinery on planted data: power curves against simulation, the slop test's nulls, claim (b)'s
tau ratios and the verdict rules."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from protomem.grammar import sample_distinct_strings, sample_grammar
from protomem.memorization.slop import training_blocks
from protomem.study.claims import pooled_claim, skew_claim, verdict
from protomem.study.power import power_curve
from protomem.study.presets import get_preset
from protomem.study.skew import skew_arm, tau_ratios
from protomem.study.slop_test import null_slopes, poisson_power_fit, slopes
from protomem.study.stats import tail_p


def test_power_curve_agrees_with_a_simulated_pooled_test():
    rng = np.random.default_rng(0)
    sigma, null_sd = 0.06, {"grammar": 0.05, "calibrated": 0.04}
    null_mean = {"grammar": 0.02, "calibrated": 0.0}
    conditions = [
        {
            "rho": 0.1,
            "ci_low": 0.1 - norm.ppf(0.975) * sigma,
            "ci_high": 0.1 + norm.ppf(0.975) * sigma,
            **{f"null_mean_{k}": v for k, v in null_mean.items()},
            **{f"null_sd_{k}": v for k, v in null_sd.items()},
        }
    ] * 2
    curve = power_curve(conditions, effect=0.08, alpha=0.01, max_conditions=20)
    assert np.all(np.diff(curve["power"]) > 0)
    for count in (2, 6, 12):
        # the pooled test simulated: C conditions, 500 null draws each, rho at 0.08 beyond the stricter null
        hits = 0
        for _ in range(400):
            observed = rng.normal(0.02 + 0.08, sigma, count).mean()
            pooled = {k: rng.normal(null_mean[k], null_sd[k], (500, count)).mean(axis=1) for k in null_mean}
            hits += all(tail_p(observed, pooled[k]) < 0.01 for k in pooled)
        assert curve["power"][count - 1] == pytest.approx(hits / 400, abs=0.08)
    pairs = zip(curve["conditions"], curve["power"], strict=True)
    assert curve["required"] == next(c for c, p in pairs if p >= 0.9)
    assert power_curve([{"rho": float("nan")}]) is None


@pytest.fixture(scope="module")
def blocks():
    grammar = sample_grammar(8, 8, 3, 2, 3, seed=0, zipf_exponent=1.0)
    train = sample_distinct_strings(grammar, 256, seed=1)
    table = training_blocks(grammar, train.tokens)
    at = table["level"] == 2
    return {k: v[at] for k, v in table.items() if k != "tokens"}


def test_slop_test_nulls(blocks):
    rng = np.random.default_rng(1)
    train_count, prob, k = blocks["train_count"], blocks["grammar_prob"], 512
    # a model that samples the grammar: p against the grammar null is about uniform
    p_values = []
    for _ in range(60):
        counts = rng.poisson(k * prob)
        observed = slopes(train_count, counts, 256, k)[0]
        p_values.append(tail_p(observed, null_slopes(train_count, prob, counts, 256, k, 200, rng)["grammar"]))
    assert 0.2 < np.mean(p_values) < 0.8 and np.mean(np.array(p_values) < 0.05) < 0.2
    # a model that sharpens the grammar (counts ~ p^2) beats the grammar null, not the calibrated one
    sharp = k * prob**2 / (prob**2).sum() * prob.sum()
    counts = rng.poisson(sharp)
    observed = slopes(train_count, counts, 256, k)[0]
    nulls = null_slopes(train_count, prob, counts, 256, k, 300, rng)
    assert tail_p(observed, nulls["grammar"]) < 0.01
    assert tail_p(observed, nulls["calibrated"]) > 0.05
    # planted slop: counts grow with the training count itself, beyond the grammar probability
    planted = k * prob * (train_count / train_count.mean()) ** 1.0
    counts = rng.poisson(planted)
    observed = slopes(train_count, counts, 256, k)[0]
    nulls = null_slopes(train_count, prob, counts, 256, k, 300, rng)
    assert tail_p(observed, nulls["grammar"]) < 0.01 and tail_p(observed, nulls["calibrated"]) < 0.01


def test_poisson_power_fit_recovers_planted_parameters():
    rng = np.random.default_rng(2)
    prob = rng.uniform(1e-3, 0.1, 4000)
    a, g = poisson_power_fit(rng.poisson(np.exp(6.0 + 1.4 * np.log(prob))), prob)
    assert a == pytest.approx(6.0, abs=0.1) and g == pytest.approx(1.4, abs=0.03)


def test_tau_ratios_recover_planted_delays():
    conditions = get_preset("zipf-levels").conditions[:24]  # 8 seeds x 3 arms
    rng = np.random.default_rng(3)
    base = {seed: rng.uniform(500, 1500) for seed in range(8)}
    factor = {"uniform": 1.0, "top": 1.3, "bottom": 0.9}
    taus = {
        c.name: base[c.grammar.seed] * factor[skew_arm(c)] * np.exp(rng.normal(0, 0.03)) for c in conditions
    }
    ratios = tau_ratios(taus, conditions)
    assert ratios["top/uniform"]["ratio"] == pytest.approx(1.3, rel=0.05)
    assert ratios["top/uniform"]["ci_low"] < 1.3 < ratios["top/uniform"]["ci_high"]
    assert ratios["top/uniform"]["half_width"] < 0.1 and ratios["top/uniform"]["n_seeds"] == 8
    assert ratios["top/uniform"]["p_greater"] < 0.001 and ratios["bottom/uniform"]["p_less"] < 0.001
    assert skew_claim(ratios, 0.01)["verdict"] == "supported"
    slower_bottom = {**taus, **{c.name: taus[c.name] * 2 for c in conditions if skew_arm(c) == "bottom"}}
    assert skew_claim(tau_ratios(slower_bottom, conditions), 0.01)["verdict"] == "not supported"
    faster_top = {**taus, **{c.name: taus[c.name] / 2 for c in conditions if skew_arm(c) == "top"}}
    assert skew_claim(tau_ratios(faster_top, conditions), 0.01)["verdict"] == "refuted"
    censored = {**taus, conditions[1].name: float("nan")}  # one pair drops out
    assert tau_ratios(censored, conditions)["top/uniform"]["n_seeds"] == 7
    assert skew_claim(None, 0.01)["verdict"] == "not tested"


def test_verdict_rules():
    both = {"rho": 0.1, "n_conditions": 4, "p_grammar": 0.002, "p_calibrated": 0.004}
    assert verdict({**both, "p_lower_grammar": 0.99, "p_lower_calibrated": 0.99}, 0.01) == "supported"
    assert verdict({**both, "p_grammar": 0.02}, 0.01) == "not supported"
    low = {"rho": -0.2, "n_conditions": 4, "p_grammar": 0.99, "p_calibrated": 0.99}
    assert verdict({**low, "p_lower_grammar": 0.002, "p_lower_calibrated": 0.002}, 0.01) == "refuted"
    assert verdict({**low, "p_lower_grammar": 0.002, "p_lower_calibrated": 0.2}, 0.01) == "not supported"
    assert verdict({"rho": float("nan"), "n_conditions": 0}, 0.01) == "not tested"
    entry = pooled_claim("a", "a test", "copies", both, 0.01)
    assert entry["p_values"] == {"grammar": 0.002, "calibrated": 0.004} and entry["statistic"] == 0.1
