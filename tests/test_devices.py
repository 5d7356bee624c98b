"""The device setting on a CPU-only machine, through the same code path a GPU run takes: resolution of
``auto`` and named devices (a GPU simulated where torch is asked), the resolved device recorded, CPU runs
unchanged by it, checkpoints from another device loaded via the CPU and resumed, bf16 on CUDA, and a
one-line refusal of a device this machine lacks, before any work."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from protomem.diffusion import DiffusionConfig, generate, load_checkpoint, train
from protomem.diffusion.device import native_bf16, resolve_device
from protomem.diffusion.sampling import precision_context
from protomem.errors import ProtomemError
from protomem.grammar import sample_distinct_strings, sample_grammar

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
NO_GPU = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def strings():
    grammar = sample_grammar(8, 8, 3, 2, 3, seed=0, zipf_exponent=1.0)
    return sample_distinct_strings(grammar, 64, seed=1)


def small_config(**fields) -> DiffusionConfig:
    base = dict(
        vocab_size=8, seq_len=8, width=32, steps=12, batch_size=16, threads=1, eval_steps=[6],
        eval_samples=8, warmup_steps=3, timesteps=20, log_every=1, ema_decay=0.8, n_classes=8,
    )  # fmt: skip
    base.update(fields)
    return DiffusionConfig(**base)


def protomem(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "protomem.cli", *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


# ---------------------------------------------------------------------------------------------- resolution


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:-1", "CPU", "cuda 0", "tpu"])
def test_a_malformed_device_is_refused_naming_the_field(bad):
    with pytest.raises(ProtomemError, match=r"device: must be auto, cpu, cuda, cuda:N or mps"):
        small_config(device=bad)
    with pytest.raises(ProtomemError, match="device must be"):
        resolve_device(bad)


@pytest.mark.skipif(not NO_GPU, reason="checks the CPU-only answers")
def test_auto_is_the_cpu_here_and_named_devices_we_lack_are_one_line_errors():
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    for name in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(ProtomemError, match=f"device {name} requested, but .*(CPU-only|no CUDA)"):
            resolve_device(name)


def test_auto_picks_the_current_gpu_when_torch_sees_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ProtomemError, match=r"cuda:2 requested, but torch sees 2 CUDA device\(s\): 0..1"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ProtomemError, match="mps requested, but torch sees no MPS"):
        resolve_device("mps")


def test_bf16_is_automatic_on_a_cuda_device_that_supports_it(monkeypatch):
    cuda, mps, cpu = torch.device("cuda", 0), torch.device("mps"), torch.device("cpu")
    config = small_config()
    for supported in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert native_bf16(cuda) is supported
        assert config.resolved_precision(cuda) == ("bf16" if supported else "fp32")
    assert config.resolved_precision(mps) == "fp32"
    assert (
        config.resolved_precision(cpu)
        == config.resolved_precision()
        == ("bf16" if native_bf16(cpu) else "fp32")
    )
    assert small_config(precision="fp32").resolved_precision(cuda) == "fp32"
    with precision_context("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with precision_context("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")


# ---------------------------------------------------------------------------------------------- training


def test_auto_and_cpu_train_identically_and_the_resolved_device_is_recorded(tmp_path, strings):
    runs = {}
    for device in ("auto", "cpu"):
        evals = []
        result = train(
            small_config(device=device),
            strings.tokens,
            tmp_path / device,
            classes=strings.classes,
            progress=False,
            eval_callback=lambda step, samples, info, evals=evals: evals.append((samples, info["classes"])),
        )
        assert result.device == "cpu"
        saved = yaml.safe_load((tmp_path / device / "config.yaml").read_text())
        state = json.loads((tmp_path / device / "checkpoints" / "step_00000012" / "state.json").read_text())
        assert saved["device"] == state["config"]["device"] == state["device"] == "cpu"
        assert state["device_label"].startswith("cpu (")
        for samples, classes in evals:  # evaluation samples come back as numpy
            assert isinstance(samples, np.ndarray) and isinstance(classes, np.ndarray)
        runs[device] = (
            result,
            evals,
            load_file(str(tmp_path / device / "checkpoints" / "step_00000012" / "model.safetensors")),
        )
    (a, evals_a, weights_a), (b, evals_b, weights_b) = runs["auto"], runs["cpu"]
    assert a.metrics["loss"] == b.metrics["loss"]
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert all(
        np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1])
        for x, y in zip(evals_a, evals_b, strict=True)
    )


class Killed(Exception):
    pass


def test_a_checkpoint_written_on_another_device_loads_via_the_cpu_and_resumes(tmp_path, strings):
    config = small_config(device="cpu")
    full = train(config, strings.tokens, tmp_path / "full", classes=strings.classes, progress=False)

    def die_at_six(step, samples, info):
        if step == 6:
            raise Killed

    with pytest.raises(Killed):
        train(
            config,
            strings.tokens,
            tmp_path / "cut",
            classes=strings.classes,
            progress=False,
            eval_callback=die_at_six,
        )
    # make the interrupted run look as if it had trained on a GPU: the config it recorded names cuda:0
    # (state.json is not covered by the tensor files' checksums)
    state_path = tmp_path / "cut" / "checkpoints" / "step_00000006" / "state.json"
    state = json.loads(state_path.read_text())
    state["config"]["device"] = state["device"] = "cuda:0"
    state_path.write_text(json.dumps(state))
    loaded = load_checkpoint(tmp_path / "cut", step=6)  # no GPU needed: read and checked on the CPU
    assert loaded.config.device == "cuda:0" and loaded.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())
    reference = load_checkpoint(tmp_path / "full", step=6, device="auto")
    assert np.array_equal(generate(loaded, 20, seed=3), generate(reference, 20, seed=3))
    # resuming on this machine's device (the device may change between a run and its resumption)
    resumed = train(
        config, strings.tokens, tmp_path / "cut", classes=strings.classes, resume=True, progress=False
    )
    assert resumed.metrics["loss"] == full.metrics["loss"]
    final_a = load_file(str(tmp_path / "full" / "checkpoints" / "step_00000012" / "model.safetensors"))
    final_b = load_file(str(tmp_path / "cut" / "checkpoints" / "step_00000012" / "model.safetensors"))
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    if NO_GPU:
        with pytest.raises(ProtomemError, match="device cuda requested"):
            load_checkpoint(tmp_path / "full", device="cuda")


# ---------------------------------------------------------------------------------------------- every tensor

# Torch factories that create a tensor: each call in the modules below must say where (device=...), except
# the listed CPU-side ones (schedules of Python scalars, the CPU copy a table is built from).
FACTORIES = {"rand", "randint", "randn", "full", "arange", "zeros", "ones", "empty", "linspace", "tensor"}
CPU_BY_DESIGN = {
    ("processes.py", "uniform_alpha_bar"),  # float64 table, copied to the device once (keep_probability)
    ("processes.py", "strided_times"),  # Python ints
    ("processes.py", "sample"),  # MaskedProcess.sample: the time grid, read as Python floats
    ("images.py", "__init__"),  # NoiseSchedule's tables, moved by NoiseSchedule.to
    ("models.py", "__init__"),  # initial weights: built on the CPU (the same everywhere), then moved
    ("cost.py", "make_trainer"),  # the data a Trainer moves to its device once
}


def factory_calls_without_device(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    missing = []
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef):
            continue
        for node in ast.walk(function):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
                and node.func.attr in FACTORIES
                and not any(k.arg == "device" for k in node.keywords)
                and (path.name, function.name) not in CPU_BY_DESIGN
            ):
                missing.append((f"{path.name}:{function.name}", node.lineno))
    return missing


def test_every_tensor_the_trainer_sampler_processes_and_evaluation_create_names_its_device():
    diffusion = REPO / "src" / "protomem" / "diffusion"
    modules = [
        "trainer.py",
        "sampling.py",
        "processes.py",
        "models.py",
        "likelihood.py",
        "images.py",
        "cost.py",
    ]
    missing = [call for name in modules for call in factory_calls_without_device(diffusion / name)]
    assert missing == []


# ---------------------------------------------------------------------------------------------- commands


@pytest.mark.skipif(not NO_GPU, reason="needs a machine without CUDA")
def test_commands_refuse_a_missing_device_in_one_line_before_any_work(tmp_path, strings):
    from protomem.io import write_strings

    data = tmp_path / "strings.parquet"
    write_strings(data, strings.tokens)
    done = protomem("train", "--data", str(data), "--out", str(tmp_path / "run"), "--device", "cuda")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "device cuda requested" in done.stderr
    assert not (tmp_path / "run").exists()
    done = protomem("train", "--data", str(data), "--out", str(tmp_path / "run"), "--device", "gpu")
    assert done.returncode == 2 and "device must be" in done.stderr
    done = protomem("study", "--preset", "quick", "--out", str(tmp_path / "study"), "--device", "cuda:1")
    assert (
        done.returncode == 2
        and "device cuda:1 requested" in done.stderr
        and not (tmp_path / "study").exists()
    )
    done = protomem(
        "sweep", str(REPO / "examples" / "sweeps" / "tiny.yaml"), "--dry-run", "--device", "cuda:1"
    )
    assert done.returncode == 2 and "name it cuda" in done.stderr


def test_sample_on_the_auto_and_cpu_devices_gives_the_same_strings(tmp_path, strings):
    from protomem.io import read_strings

    train(small_config(), strings.tokens, tmp_path / "run", classes=strings.classes, progress=False)
    outputs = []
    for device in ("auto", "cpu"):
        out = tmp_path / f"{device}.jsonl"
        done = protomem(
            "sample", "--run", str(tmp_path / "run"), "--out", str(out), "--count", "16", "--device", device
        )
        assert done.returncode == 0, done.stderr
        outputs.append(read_strings(out).tokens)
    assert np.array_equal(*outputs)
    if NO_GPU:
        done = protomem(
            "sample", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "x.jsonl"), "--device", "cuda"
        )
        assert done.returncode == 2 and "device cuda requested" in done.stderr
        assert not (tmp_path / "x.jsonl").exists()


def test_study_command_passes_device_jobs_and_threads_through(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from protomem.cli import app
    from protomem.study import runner

    seen = {}

    def fake_run_study(out_dir, **kwargs):
        seen.update(kwargs)
        return Path(out_dir)

    monkeypatch.setattr(runner, "run_study", fake_run_study)
    monkeypatch.setattr(runner, "summary_paragraph", lambda path: "")
    args = ["study", "--preset", "quick", "--out", str(tmp_path / "s"), "--device", "cpu", "--jobs", "1"]
    done = CliRunner().invoke(app, [*args, "--threads", "2"])
    assert done.exit_code == 0, done.output
    assert (seen["device"], seen["jobs"], seen["threads"]) == ("cpu", 1, 2)
