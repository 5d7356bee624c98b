"""The cost of steps and the study plan: FLOP counts against the models' arithmetic, the schedule of parallel
conditions, the load correction, and `study --plan` / `sweep --plan` running nothing. (The estimate against
real runs: test_study_pipeline.py, fast on a tiny condition and slow on the quick preset.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protomem.diffusion import DiffusionConfig
from protomem.diffusion.cost import (
    count_step_flops,
    make_trainer,
    measure_step_cost,
    sample_step_flops,
    train_step_flops,
)
from protomem.study.plan import load_factor, longest_first, makespan

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def config(**fields) -> DiffusionConfig:
    base = dict(vocab_size=8, seq_len=16, width=64, batch_size=32, precision="fp32", device="cpu")
    base.update(fields)
    return DiffusionConfig(**base)


def test_transformer_flops_match_its_matrix_arithmetic():
    # a transformer's matmuls per token and layer: 2 * (3W^2 + W^2 + 8W^2) for the linear layers and
    # 2 * 2 * N * W for attention (scores and values); the head 2 * W * V per token; the conditioning MLP
    # 2 * (64 W + W^2) per sequence. torch's counter does not count the attention kernel this CPU uses
    # (it does count some others), so either total is the right answer.
    width, n, layers, vocab, batch = 64, 16, 2, 8, 32
    trainer = make_trainer(
        config(model="transformer", width=width, n_layers=layers, n_heads=4, batch_size=batch, seq_len=n)
    )
    linear = n * (layers * 2 * 12 * width**2 + 2 * width * vocab) + 2 * (64 * width + width * width)
    attention = n * layers * 4 * n * width
    counted = sample_step_flops(trainer, batch)
    assert counted in (pytest.approx(linear, rel=1e-9), pytest.approx(linear + attention, rel=1e-9))
    # training: the forward, then the backward's products (two per forward product, less the input-side
    # gradient of the first layer), so between 2x and 3x the forward
    assert 2.0 * batch * counted < train_step_flops(trainer) <= 3.0 * batch * counted


@pytest.mark.parametrize("model", ["tree_unet", "transformer"])
def test_sampler_flops_per_sequence_scale_with_the_batch(model):
    trainer = make_trainer(config(model=model))
    # sampling gives a batch one time, and the tree U-Net computes its conditioning MLP (2 (64 W + W^2))
    # once per batch: the only part that does not scale with the batch
    shared = 2 * (64 * 64 + 64 * 64) if model == "tree_unet" else 0
    difference = sample_step_flops(trainer, 8) - sample_step_flops(trainer, 40)
    assert difference == pytest.approx(shared * (1 / 8 - 1 / 40), abs=1e-6)
    small, large = (
        make_trainer(config(model=model, batch_size=16)),
        make_trainer(config(model=model, batch_size=64)),
    )
    assert train_step_flops(large) > 3.0 * train_step_flops(small)


def test_measured_costs_are_positive_and_on_the_asked_device():
    cost = measure_step_cost(config(), sample_batch=32)
    assert cost.device == "cpu" and cost.threads == 1 and cost.n_parameters > 0
    assert cost.train_seconds > 0 and cost.sample_seconds > 0 and cost.train_flops > cost.sample_flops > 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 1000.0), max_size=12), st.integers(1, 6))
def test_the_parallel_schedule_is_between_the_perfect_split_and_the_serial_run(durations, jobs):
    span = makespan(durations, jobs)
    total = sum(durations)
    assert span >= max(durations, default=0.0) - 1e-9
    assert span >= total / jobs - 1e-6
    assert span <= total + 1e-6
    assert makespan(durations, 1) == pytest.approx(total)
    # list scheduling is never worse than twice the optimum
    assert span <= total / jobs + max(durations, default=0.0) + 1e-6


def test_the_flop_count_alone_is_the_measured_one():
    counted = count_step_flops(config(), sample_batch=32)
    measured = measure_step_cost(config(), sample_batch=32)
    assert (counted.n_parameters, counted.train_flops, counted.sample_flops) == (
        measured.n_parameters,
        measured.train_flops,
        measured.sample_flops,
    )


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5).map(float), max_size=10))
def test_longest_first_orders_by_cost_and_keeps_ties_in_order(costs):
    order = longest_first(costs)
    assert sorted(order) == list(range(len(costs)))
    for a, b in zip(order, order[1:], strict=False):
        assert costs[a] > costs[b] or (costs[a] == costs[b] and a < b)


def test_longest_first_shortens_the_default_presets_schedule():
    # the default preset's CPU seconds per condition measured at idle (small-s0, deep-s0, small-s1, deep-s1)
    measured = [76.5, 141.1, 68.9, 126.6]
    listed = makespan(measured, 2)
    reordered = makespan([measured[i] for i in longest_first(measured)], 2)
    # as listed, the two deep conditions end up one after the other on one worker
    assert listed == pytest.approx(141.1 + 126.6) and reordered == pytest.approx(141.1 + 68.9)


def test_the_load_correction():
    assert load_factor(0.0, 2, 1, 2) == 1.0  # an idle 2-core machine runs two one-thread jobs at full speed
    assert load_factor(0.0, 2, 1, 4) == pytest.approx(2.0)  # four on two cores: half speed each
    assert load_factor(2.0, 2, 1, 2) == pytest.approx((2 / 3) / (2 / 4))  # two busy threads already
    assert load_factor(6.0, 2, 1, 1) == 1.0  # one job competes exactly as the timing did
    assert load_factor(1.0, 8, 1, 4) == 1.0


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "protomem.cli", *args], capture_output=True, text=True, timeout=600, cwd=cwd
    )


def test_study_plan_prints_the_estimate_and_runs_nothing(tmp_path):
    done = run_cli("study", "--preset", "quick", "--plan", "--gpu-tflops", "10", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    from protomem.study.presets import get_preset

    condition = get_preset("quick").conditions[0]
    evaluations = (
        f"{len(condition.diffusion_config().resolved_eval_steps())} x {condition.evaluation.n_samples}"
    )
    assert condition.name in out and f"{condition.diffusion.steps:,}" in out and evaluations in out
    assert "estimated wall time on this machine" in out and "GPU-hours at 10 TFLOP/s" in out
    assert "GFLOP/train step" in out
    assert list(tmp_path.iterdir()) == []  # no run directory


def test_sweep_plan_estimates_the_points_and_runs_nothing(tmp_path):
    out = tmp_path / "sweep"
    done = run_cli(
        "sweep", str(REPO / "examples" / "sweeps" / "tiny.yaml"), "--plan", "--out", str(out), cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("n_train=48,seed=0") == 2  # the points table and the estimate table
    assert "4 point(s) to run" in done.stdout and "estimated wall time" in done.stdout
    assert not out.exists()
