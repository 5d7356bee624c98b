"""The diffusion engine on real (small) RHM training runs: determinism, exact resume, checkpoint checks,
config validation, both noise processes learning, the sampler, and the matmul form of the tree convs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from protomem.diffusion import (
    DiffusionConfig,
    available_steps,
    build_model,
    build_process,
    config_from_dict,
    count_parameters,
    generate,
    load_checkpoint,
    load_config,
    train,
)
from protomem.diffusion.models import StrideConv, StrideConvTranspose, frozen_weights
from protomem.diffusion.processes import UniformProcess, strided_times, uniform_alpha_bar
from protomem.diffusion.sampling import seeded_generator
from protomem.diffusion.trainer import clip_gradients
from protomem.errors import ProtomemError
from protomem.grammar import parse, sample_distinct_strings, sample_grammar

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def rhm():
    grammar = sample_grammar(8, 8, 3, 2, 3, seed=0, zipf_exponent=1.0)
    return grammar, sample_distinct_strings(grammar, 64, seed=1)


def small_config(**fields) -> DiffusionConfig:
    base = dict(
        vocab_size=8,
        seq_len=8,
        width=32,
        steps=12,
        batch_size=16,
        threads=1,
        eval_steps=[6],
        eval_samples=8,
        warmup_steps=3,
        timesteps=20,
        log_every=1,
    )
    base.update(fields)
    return DiffusionConfig(**base)


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"bogus": 1}, "bogus: unknown key"),
        ({"lr": -1e-3}, "lr:"),
        ({"weight_decay": -0.1}, "weight_decay:"),
        ({"ema_decay": 1.5}, "ema_decay:"),
        ({"grad_clip": -1.0}, "grad_clip:"),
        ({"seq_len": 6}, "seq_len=6 does not fit the tree U-Net"),
        ({"seq_len": 9, "branching": 2}, "does not fit the tree"),
        ({"process": "gaussian"}, "process:"),
        ({"eval_steps": [0, 5]}, "outside 1..steps"),
        ({"model": "transformer", "width": 30, "n_heads": 4}, "not divisible by n_heads"),
        ({"sampling_steps": 50, "timesteps": 20}, "exceeds timesteps"),
    ],
)
def test_bad_configs_are_refused_with_the_field_named(fields, needle):
    with pytest.raises(ProtomemError) as info:
        small_config(**fields)
    assert needle in str(info.value)


def test_tree_free_lengths_are_fine_for_the_transformer():
    config = small_config(model="transformer", seq_len=6)
    assert config.seq_len == 6 and config.tree_depth is None


def test_yaml_config_round_trip_and_errors(tmp_path):
    config = small_config(process="masked", ema_decay=0.99)
    path = tmp_path / "cfg.yaml"
    path.write_text(config.to_yaml())
    assert load_config(path) == config
    assert load_config(path, width=64).width == 64
    path.write_text("vocab_size: 8\nseq_len: 8\nlearning_rate: 0.1\n")
    with pytest.raises(ProtomemError, match="learning_rate: unknown key") as info:
        load_config(path)
    assert str(path) in str(info.value)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ProtomemError, match="mapping"):
        load_config(path)
    with pytest.raises(ProtomemError, match="mapping"):
        config_from_dict([1, 2])


def test_eval_schedule_is_log_spaced_and_ends_at_the_last_step():
    steps = DiffusionConfig(vocab_size=8, seq_len=8, steps=10_000, n_evals=5).resolved_eval_steps()
    assert steps == [1, 10, 100, 1000, 10_000]
    assert small_config(eval_steps=[3, 6]).resolved_eval_steps() == [3, 6, 12]


def test_bad_training_data_fails_before_training(tmp_path):
    config = small_config()
    with pytest.raises(ProtomemError, match="shape"):
        train(config, np.zeros((4, 5), dtype=np.int64), tmp_path / "a", progress=False)
    with pytest.raises(ProtomemError, match="outside"):
        train(config, np.full((4, 8), 8, dtype=np.int64), tmp_path / "b", progress=False)
    with pytest.raises(ProtomemError, match="classes"):
        train(small_config(n_classes=3), np.zeros((4, 8), dtype=np.int64), tmp_path / "c", progress=False)
    assert not (tmp_path / "a" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------- models


def test_stride_convs_equal_conv1d_and_conv_transpose1d():
    torch.manual_seed(0)
    width_in, width_out, s = 5, 7, 3
    x = torch.randn(4, 9, width_in)  # channels-last (B, n, W)
    conv = torch.nn.Conv1d(width_in, width_out, kernel_size=s, stride=s)
    ours = StrideConv(width_in, width_out, s)
    with torch.no_grad():
        ours.linear.weight.copy_(conv.weight.permute(0, 2, 1).reshape(width_out, s * width_in))
        ours.linear.bias.copy_(conv.bias)
    expected = conv(x.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)

    up = torch.nn.ConvTranspose1d(width_in, width_out, kernel_size=s, stride=s)
    ours_up = StrideConvTranspose(width_in, width_out, s)
    with torch.no_grad():
        ours_up.linear.weight.copy_(up.weight.permute(2, 1, 0).reshape(s * width_out, width_in))
        ours_up.linear.bias.copy_(up.bias.repeat(s))
    expected = up(x.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(ours_up(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model", ["tree_unet", "transformer"])
@pytest.mark.parametrize("process", ["uniform", "masked"])
def test_denoisers_map_tokens_to_clean_logits(model, process):
    config = small_config(model=model, process=process, n_classes=3)
    proc = build_process(config)
    net = build_model(config, proc.n_input_tokens)
    x = torch.randint(0, proc.n_input_tokens, (5, 8))
    logits = net(x, torch.rand(5), torch.tensor([0, 1, 2, 0, 1]))
    assert logits.shape == (5, 8, 8) and logits.dtype == torch.float32
    assert count_parameters(net) > 0


def test_tree_unet_parameter_count_matches_the_reference_layout():
    # per level: down conv (W x sW), transposed conv (sW x W), skip merge (W x 2W): 18 W^2 for L = 3
    config = DiffusionConfig(vocab_size=8, seq_len=8, width=256)
    net = build_model(config, 8)
    layers = ("down", "up", "merge_up", "merge_skip")
    big = sum(p.numel() for name, p in net.named_parameters() if name.split(".")[0] in layers and p.ndim == 2)
    assert big == 18 * 256 * 256


@pytest.mark.parametrize(
    ("precision", "n_classes", "blocks", "n_input_tokens", "same_time"),
    [
        ("fp32", 3, 0, 8, False),  # all folds; per-row conditioning
        ("bf16", 3, 0, 8, False),
        ("fp32", 0, 0, 9, True),  # masked-process vocabulary; one time for the batch: shared conditioning
        ("fp32", 0, 1, 8, True),  # residual blocks at level 0: the plain forward, no folds
        ("fp32", 0, 0, 300, True),  # training path without tables (too few tokens), sampling with them
    ],
)
def test_fused_inference_path_computes_the_training_function(
    precision, n_classes, blocks, n_input_tokens, same_time
):
    config = small_config(width=48, n_classes=n_classes, precision=precision, blocks_per_level=blocks)
    net = build_model(config, n_input_tokens)
    x = torch.randint(0, n_input_tokens, (6, 8))
    t = torch.full((6,), 0.3) if same_time else torch.rand(6)
    c = torch.tensor([0, 1, 2, 0, 1, 2]) if n_classes else None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        training_path = net(x, t, c)
        with torch.no_grad(), frozen_weights(net):
            fused = net(x, t, c)
            assert ("down_table" in net._fused_cache) == (blocks == 0)  # the folds were kept in the block
            again = net(x, t, c)
        assert net._fused_cache is None
    tolerance = 1e-4 if precision == "fp32" else 0.1
    torch.testing.assert_close(fused, training_path.detach(), rtol=tolerance, atol=tolerance)
    assert torch.equal(again, fused)


@pytest.mark.parametrize("vocab_size", [8, 300])
def test_level0_tables_compute_the_plain_network_and_its_gradients(vocab_size):
    """Level 0 by table lookups is the embedding + convolution + skip merge, values and gradients."""
    config = small_config(vocab_size=vocab_size, width=48)
    net = build_model(config, vocab_size)
    x, t = torch.randint(0, vocab_size, (6, 8)), torch.rand(6)
    assert net._uses_tables(x) == (vocab_size == 8)  # 300 tokens: tables larger than the batch's matmul
    outputs, grads = [], []
    for tables in (True, False):
        net._uses_tables = lambda x, tables=tables: tables
        net.zero_grad()
        out = net(x, t)
        out.square().mean().backward()
        outputs.append(out.detach())
        grads.append({name: p.grad.clone() for name, p in net.named_parameters()})
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("scale", [1e-3, 1e3])  # gradient norm far below / above the limit
def test_clip_gradients_equals_clip_grad_norm(scale):
    generator = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (7,), (3, 3, 2)]
    ours = [nn.Parameter(torch.zeros(shape)) for shape in shapes]
    theirs = [nn.Parameter(torch.zeros(shape)) for shape in shapes]
    for a, b in zip(ours, theirs, strict=True):
        a.grad = torch.randn(a.shape, generator=generator) * scale
        b.grad = a.grad.clone()
    before = [p.grad.clone() for p in ours]
    clip_gradients(ours, 1.0)
    torch.nn.utils.clip_grad_norm_(theirs, 1.0, foreach=True)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.grad, b.grad)  # bit for bit
    total = torch.linalg.vector_norm(torch.cat([p.grad.ravel() for p in ours])).item()
    if scale < 1:
        assert all(torch.equal(p.grad, g) for p, g in zip(ours, before, strict=True))
    else:
        assert total == pytest.approx(1.0, rel=1e-5)


def test_sampling_after_a_fused_adamw_step_uses_the_new_weights():
    """Fused AdamW updates weights without bumping their version: sampling must not reuse old folds."""
    config = small_config(width=48)
    net = build_model(config, 8)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.05, fused=True)
    x, t = torch.randint(0, 8, (6, 8)), torch.rand(6)
    with torch.no_grad(), frozen_weights(net):
        before = net(x, t)
    net(x, t).logsumexp(-1).sum().backward()
    optimizer.step()
    with torch.no_grad(), frozen_weights(net):
        after = net(x, t)
    with torch.no_grad():
        unfused = net(x, t)  # outside frozen_weights: the training path's function
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, unfused, rtol=1e-4, atol=1e-4)


def test_uniform_schedules_run_from_clean_to_pure_noise():
    for schedule in ("linear", "cosine"):
        alpha_bar = uniform_alpha_bar(schedule, 100)
        assert alpha_bar[0] == 1.0 and alpha_bar[-1] == 0.0
        assert torch.all(alpha_bar[1:] < alpha_bar[:-1])
    assert strided_times(200, 4) == [200, 150, 100, 50, 0]
    assert strided_times(10, 50) == list(range(10, -1, -1))


def test_uniform_posterior_matches_bayes_rule_by_enumeration():
    config = small_config(vocab_size=3, seq_len=2, timesteps=5, schedule="cosine")
    proc = UniformProcess(config)
    v = 3
    abar = proc.alpha_bar
    t, s = 4, 2
    keep = abar[t] / abar[s]
    x0, x_t = 1, 2
    # q(x_s | x_t, x0) = q(x_t | x_s) q(x_s | x0) / q(x_t | x0)
    q_s_given_x0 = [abar[s] * (j == x0) + (1 - abar[s]) / v for j in range(v)]
    q_t_given_s = [keep * (x_t == j) + (1 - keep) / v for j in range(v)]
    expected = torch.tensor([a * b for a, b in zip(q_s_given_x0, q_t_given_s, strict=True)])
    expected = expected / expected.sum()
    log_x0 = torch.log(torch.nn.functional.one_hot(torch.tensor([[x0]]), v).float())
    got = proc._log_posterior(torch.tensor([[x_t]]), torch.tensor([t]), torch.tensor([s]), log_x0).exp()
    torch.testing.assert_close(got[0, 0].double(), expected, rtol=1e-5, atol=1e-7)


def test_perfect_denoiser_has_zero_uniform_kl():
    config = small_config(ce_weight=0.0)
    proc = build_process(config)
    x0 = torch.randint(0, 8, (32, 8))

    def oracle(x, t, classes):  # knows x0: a near one-hot prediction
        return 50.0 * torch.nn.functional.one_hot(x0, 8).float()

    loss = proc.loss(oracle, x0, None, seeded_generator(0))
    assert float(loss) < 1e-6


def test_masked_loss_is_an_nll_bound_at_chance_level():
    # A denoiser that always predicts uniform: the ELBO is exactly log V nats per token in expectation.
    config = small_config(process="masked", batch_size=4096)
    proc = build_process(config)
    x0 = torch.randint(0, 8, (4096, 8))
    losses = [
        float(proc.loss(lambda x, t, c: torch.zeros(*x.shape, 8), x0, None, seeded_generator(k)))
        for k in range(4)
    ]
    assert abs(np.mean(losses) - np.log(8)) < 0.05


# ---------------------------------------------------------------------------------------------- training


def weights_of(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


@pytest.mark.parametrize("process", ["uniform", "masked"])
def test_same_seed_gives_bit_identical_losses_and_weights(tmp_path, rhm, process):
    _, strings = rhm
    config = small_config(process=process, ema_decay=0.9)
    a = train(config, strings.tokens, tmp_path / "a", progress=False)
    b = train(config, strings.tokens, tmp_path / "b", progress=False)
    assert a.metrics["loss"] == b.metrics["loss"]
    wa, wb = weights_of(tmp_path / "a", 12), weights_of(tmp_path / "b", 12)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = train(config.model_copy(update={"seed": 1}), strings.tokens, tmp_path / "c", progress=False)
    assert c.metrics["loss"] != a.metrics["loss"]


class Killed(Exception):
    pass


@pytest.mark.parametrize("process", ["uniform", "masked"])
def test_resume_gives_identical_weights_samples_and_metrics(tmp_path, rhm, process):
    grammar, strings = rhm
    config = small_config(
        process=process, n_classes=8, ema_decay=0.8, lr_schedule="cosine", eval_steps=[3, 6], steps=12
    )
    seen: dict[str, list] = {"full": [], "killed": [], "resumed": []}

    def recorder(name):
        return lambda step, samples, info: seen[name].append((step, samples.copy(), info["loss"]))

    full = train(
        config,
        strings.tokens,
        tmp_path / "full",
        classes=strings.classes,
        eval_callback=recorder("full"),
        progress=False,
    )

    def dies_after_six(step, samples, info):
        seen["killed"].append((step, samples.copy(), info["loss"]))
        if step == 6:
            raise Killed  # the process dies in the middle of step 6's evaluation

    with pytest.raises(Killed):
        train(
            config,
            strings.tokens,
            tmp_path / "cut",
            classes=strings.classes,
            eval_callback=dies_after_six,
            progress=False,
        )
    resumed = train(
        config,
        strings.tokens,
        tmp_path / "cut",
        classes=strings.classes,
        resume=True,
        eval_callback=recorder("resumed"),
        progress=False,
    )
    # resumed from step 3: step 6's evaluation is repeated (it never completed), then 12
    assert [s for s, _, _ in seen["resumed"]] == [6, 12]
    for (s1, x1, l1), (s2, x2, l2) in zip(seen["full"][1:], seen["resumed"], strict=True):
        assert s1 == s2 and np.array_equal(x1, x2) and l1 == l2
    wa, wb = weights_of(tmp_path / "full", 12), weights_of(tmp_path / "cut", 12)
    assert set(wa) == set(wb) and any(k.startswith("ema.") for k in wa)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    for column in ("step", "loss", "lr", "eval"):  # (timings differ, of course)
        assert full.metrics[column] == resumed.metrics[column]
    table = pq.read_table(tmp_path / "cut" / "metrics.parquet").to_pydict()
    assert table["step"] == list(range(1, 13))
    assert set(table) >= {"step", "loss", "lr", "seconds", "samples_per_second"}


def test_resume_of_a_finished_run_changes_nothing_and_a_different_config_is_refused(tmp_path, rhm):
    _, strings = rhm
    config = small_config()
    train(config, strings.tokens, tmp_path / "run", progress=False)
    before = weights_of(tmp_path / "run", 12)
    calls = []
    train(
        config,
        strings.tokens,
        tmp_path / "run",
        resume=True,
        progress=False,
        eval_callback=lambda *a: calls.append(a),
    )
    assert calls == [] and all(torch.equal(before[k], weights_of(tmp_path / "run", 12)[k]) for k in before)
    with pytest.raises(ProtomemError, match="different config.*lr"):
        train(
            config.model_copy(update={"lr": 0.5}),
            strings.tokens,
            tmp_path / "run",
            resume=True,
            progress=False,
        )
    with pytest.raises(ProtomemError, match="not empty"):
        train(config, strings.tokens, tmp_path / "run", progress=False)
    train(config, strings.tokens, tmp_path / "run", overwrite=True, progress=False)


def test_eval_callback_contract(tmp_path, rhm):
    _, strings = rhm
    config = small_config(n_classes=8, eval_steps=None, n_evals=3, eval_samples=5)
    calls = []
    result = train(
        config,
        strings.tokens,
        tmp_path / "run",
        classes=strings.classes,
        progress=False,
        eval_callback=lambda step, samples, info: calls.append((step, samples, info)),
    )
    assert [c[0] for c in calls] == config.resolved_eval_steps() == result.eval_steps == [1, 3, 12]
    for step, samples, info in calls:
        assert samples.shape == (5, 8) and samples.dtype == np.int64
        assert samples.min() >= 0 and samples.max() < 8
        assert {"loss", "lr", "seconds", "classes", "checkpoint"} <= set(info)
        assert info["classes"].shape == (5,) and np.isin(info["classes"], strings.classes).all()
        assert Path(info["checkpoint"]).is_dir() and step in available_steps(tmp_path / "run")
    assert calls[-1][2]["seconds"] >= calls[0][2]["seconds"]


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture
def finished_run(tmp_path, rhm):
    _, strings = rhm
    run = tmp_path / "run"
    train(small_config(ema_decay=0.5), strings.tokens, run, progress=False)
    return run


def test_load_checkpoint_picks_ema_and_latest(finished_run):
    loaded = load_checkpoint(finished_run)
    assert loaded.step == 12 and loaded.uses_ema and not loaded.model.training
    raw = load_checkpoint(finished_run, step=6, use_ema=False)
    assert raw.step == 6 and not raw.uses_ema
    with pytest.raises(ProtomemError, match=r"no checkpoint at step 7 \(available: \[6, 12\]\)"):
        load_checkpoint(finished_run, step=7)


def test_corrupt_checkpoint_is_refused(finished_run):
    weights = finished_run / "checkpoints" / "step_00000012" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ProtomemError, match="corrupt"):
        load_checkpoint(finished_run)
    weights.write_bytes(bytes(data[:100]))
    with pytest.raises(ProtomemError, match="corrupt"):
        load_checkpoint(finished_run)
    state = finished_run / "checkpoints" / "step_00000006" / "state.json"
    state.write_text("{not json")
    with pytest.raises(ProtomemError, match=r"state.json \(line 1\): malformed JSON"):
        load_checkpoint(finished_run, step=6)


def test_foreign_checkpoint_is_refused(finished_run, tmp_path):
    directory = finished_run / "checkpoints" / "step_00000012"
    doc = json.loads((directory / "state.json").read_text())
    # someone else's format tag
    (directory / "state.json").write_text(json.dumps({**doc, "format": "other-tool/3"}))
    with pytest.raises(ProtomemError, match="not a protomem diffusion checkpoint"):
        load_checkpoint(finished_run)
    # intact file of another model (wrong shapes), re-hashed so only the shape check can catch it
    import hashlib

    foreign = {"model.embedding.weight": torch.zeros(3, 3)}
    save_file(foreign, str(directory / "model.safetensors"))
    doc["files"] = {
        "model.safetensors": hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
    }
    (directory / "state.json").write_text(json.dumps(doc))
    with pytest.raises(ProtomemError, match="does not match the model"):
        load_checkpoint(finished_run)
    with pytest.raises(ProtomemError, match="no such run directory"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProtomemError, match="no checkpoint yet"):
        load_checkpoint(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("process", ["uniform", "masked"])
def test_generate_shapes_ranges_and_determinism(tmp_path, rhm, process):
    _, strings = rhm
    train(
        small_config(process=process, n_classes=8),
        strings.tokens,
        tmp_path / "r",
        classes=strings.classes,
        progress=False,
    )
    loaded = load_checkpoint(tmp_path / "r")
    a = generate(loaded, 37, seed=5, batch_size=16)
    b = generate(loaded, 37, seed=5, batch_size=16)
    c = generate(loaded, 37, seed=6, batch_size=16)
    assert a.shape == (37, 8) and a.dtype == np.int64 and a.min() >= 0 and a.max() < 8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    for steps in (1, 3, 20):
        out = generate(loaded, 10, seed=0, sampling_steps=steps, classes=np.arange(10) % 8)
        assert out.shape == (10, 8) and out.min() >= 0 and out.max() < 8
    with pytest.raises(ProtomemError, match="classes must lie"):
        generate(loaded, 2, classes=np.array([0, 9]))
    assert generate(loaded, 0).shape == (0, 8)


# ---------------------------------------------------------------------------------------------- learning


@pytest.mark.parametrize(
    ("process", "model"), [("uniform", "tree_unet"), ("masked", "tree_unet"), ("masked", "transformer")]
)
def test_training_reduces_the_loss_on_rhm_strings(tmp_path, rhm, process, model):
    grammar, strings = rhm
    config = small_config(
        process=process,
        model=model,
        width=64,
        steps=160,
        batch_size=64,
        lr=3e-3,
        warmup_steps=10,
        eval_steps=[160],
        eval_samples=64,
        timesteps=50,
        log_every=20,
        n_layers=2,
    )
    valid = {}
    result = train(
        config,
        strings.tokens,
        tmp_path / "run",
        progress=False,
        eval_callback=lambda step, samples, info: valid.setdefault(step, parse(grammar, samples).valid),
    )
    losses = result.metrics["loss"]
    if model == "tree_unet":
        assert np.mean(losses[-2:]) < 0.8 * losses[0]
        # random strings of 8 tokens over 8 symbols are almost never valid (about 1 in 10^4 here)
        assert valid[160].mean() > 0.1
    else:  # the generic transformer learns this tiny set more slowly
        assert np.mean(losses[-2:]) < 0.9 * losses[0]


KILL_SCRIPT = """
import sys, numpy as np, torch
from protomem.diffusion import DiffusionConfig, train
torch.set_num_threads(1)
config = DiffusionConfig.model_validate_json(sys.argv[1])
train(config, np.load(sys.argv[2]), sys.argv[3], progress=False, resume=True)
"""


def test_a_killed_process_resumes_to_identical_weights(tmp_path, rhm):
    import os
    import signal
    import subprocess
    import sys
    import time

    _, strings = rhm
    config = small_config(steps=150, eval_steps=[150], checkpoint_every=10)
    np.save(tmp_path / "data.npy", strings.tokens)
    args = [
        sys.executable,
        "-c",
        KILL_SCRIPT,
        config.model_dump_json(),
        str(tmp_path / "data.npy"),
        str(tmp_path / "cut"),
    ]
    process = subprocess.Popen(args)
    latest = tmp_path / "cut" / "checkpoints" / "latest.json"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if latest.is_file() and json.loads(latest.read_text())["step"] >= 20:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)  # no chance to clean up
    process.wait()
    killed_at = json.loads(latest.read_text())["step"]
    assert 20 <= killed_at < 150, killed_at
    subprocess.run(args, check=True, timeout=300)  # resume=True in the script
    train(config, strings.tokens, tmp_path / "full", progress=False)
    wa, wb = weights_of(tmp_path / "full", 150), weights_of(tmp_path / "cut", 150)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
