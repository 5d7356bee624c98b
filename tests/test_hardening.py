"""Regression tests of issue 13: every crash, traceback, overwrite and resource bomb a hostile-but-fair user
found, each run as that user ran it (the ``protomem`` command line, in-process; a segfault in a child).

Each test asserts the promised behaviour: exit code 2, one line on stderr naming the file (and line or
field), no traceback, nothing created or changed. See docs/robustness.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.cli_runner import invoke, snapshot

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--steps", "12", "--width", "8", "--batch-size", "8", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A grammar, its strings, and two finished tiny runs (one with EMA weights)."""
    root = tmp_path_factory.mktemp("runs")
    grammar = ["--vocab", "4", "--classes", "2", "--rules", "2", "--depth", "2"]
    result = invoke(
        "grammar", "sample", "--out", root / "g", *grammar, "--count", "12", "--distinct", "--format", "jsonl"
    )
    assert result.code == 0, result.stderr
    data = ["--data", root / "g" / "strings.jsonl", "--grammar", root / "g" / "grammar.json"]
    assert invoke("train", *data, "--out", root / "run", *TRAIN).code == 0
    (root / "ema.yaml").write_text("ema_decay: 0.9\n")
    result = invoke("train", *data, "--config", root / "ema.yaml", "--out", root / "run_ema", *TRAIN)
    assert result.code == 0, result.stderr
    return root


def copy_run(runs: Path, tmp_path: Path, name: str = "run") -> Path:
    target = tmp_path / name
    shutil.copytree(runs / name, target, symlinks=True)
    return target


def latest(run: Path) -> Path:
    step = json.loads((run / "checkpoints" / "latest.json").read_text())["step"]
    return run / "checkpoints" / f"step_{step:08d}"


def rehash(directory: Path, name: str) -> None:
    """Make state.json vouch for the (tampered) file ``name``: only the content checks can catch it."""
    state = json.loads((directory / "state.json").read_text())
    state["files"][name] = hashlib.sha256((directory / name).read_bytes()).hexdigest()
    (directory / "state.json").write_text(json.dumps(state))


def data_args(runs: Path) -> list[object]:
    return ["--data", runs / "g" / "strings.jsonl", "--grammar", runs / "g" / "grammar.json"]


def resume(runs: Path, run: Path) -> list[object]:
    return ["train", *data_args(runs), "--out", run, "--resume", *TRAIN]


# --- 1. the optimizer state that crashed libtorch -------------------------------------------------------


def test_reshaped_optimizer_moments_are_refused_not_a_segfault(runs, tmp_path):
    run = copy_run(runs, tmp_path)
    directory = latest(run)
    moments = load_file(str(directory / "optimizer.safetensors"))
    name = next(k for k, v in moments.items() if k.endswith("exp_avg") and v.numel() > 1)
    moments[name] = moments[name].reshape(-1)[:-1].contiguous()  # one element short, flattened
    save_file(moments, str(directory / "optimizer.safetensors"))
    rehash(directory, "optimizer.safetensors")
    before = snapshot(run)
    command = [sys.executable, "-m", "protomem.cli", *map(str, resume(runs, run))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr  # was -11 (SIGSEGV) inside libtorch
    assert len(lines) == 1 and "optimizer.safetensors" in lines[0] and name in lines[0]
    assert snapshot(run) == before


def test_optimizer_state_with_wrong_dtype_or_hyperparameters_is_refused(runs, tmp_path):
    run = copy_run(runs, tmp_path)
    directory = latest(run)
    moments = load_file(str(directory / "optimizer.safetensors"))
    name = next(k for k in moments if k.endswith("exp_avg_sq"))
    moments[name] = moments[name].double()
    save_file(moments, str(directory / "optimizer.safetensors"))
    rehash(directory, "optimizer.safetensors")
    assert invoke(*resume(runs, run)).is_one_line_error("optimizer.safetensors", "float64")
    run = copy_run(runs, tmp_path / "second")
    state = json.loads((latest(run) / "state.json").read_text())
    state["optimizer_param_groups"][0]["betas"] = ["x", 1]
    (latest(run) / "state.json").write_text(json.dumps(state))
    assert invoke(*resume(runs, run)).is_one_line_error("state.json", "betas")


# --- 2. overwrites ------------------------------------------------------------------------------------


def test_grammar_check_never_writes_over_its_input(runs, tmp_path):
    strings = tmp_path / "s.jsonl"
    shutil.copy(runs / "g" / "strings.jsonl", strings)
    before = strings.read_bytes()
    for extra in ([], ["--overwrite"]):
        result = invoke(
            "grammar",
            "check",
            "--grammar",
            runs / "g" / "grammar.json",
            "--strings",
            strings,
            "--out",
            strings,
            *extra,
        )
        assert result.is_one_line_error(strings, "input"), result.stderr
    assert strings.read_bytes() == before


def test_sample_never_writes_into_a_runs_checkpoints(runs, tmp_path):
    run = copy_run(runs, tmp_path)
    before = snapshot(run)
    for target in (run / "checkpoints" / "latest.json", latest(run) / "x.jsonl"):
        for extra in ([], ["--overwrite"]):
            result = invoke("sample", "--run", run, "--out", target, "--count", "4", *extra)
            assert result.is_one_line_error("checkpoints"), result.stderr
    assert snapshot(run) == before


def test_sample_refuses_an_existing_output_without_overwrite(runs, tmp_path):
    out = tmp_path / "samples.jsonl"
    out.write_text("keep me\n")
    result = invoke("sample", "--run", runs / "run", "--out", out, "--count", "4")
    assert result.is_one_line_error(out, "--overwrite") and out.read_text() == "keep me\n"
    assert invoke("sample", "--run", runs / "run", "--out", out, "--count", "4", "--overwrite").code == 0
    assert len(out.read_text().splitlines()) == 4


def _special_files(tmp_path: Path) -> dict[str, Path]:
    """A FIFO, a socket, a directory and (as root) a character device like /dev/full (1, 7)."""
    made = {
        "fifo": tmp_path / "fifo.jsonl",
        "directory": tmp_path / "dir.jsonl",
        "socket": tmp_path / "s.jsonl",
    }
    os.mkfifo(made["fifo"])
    made["directory"].mkdir()
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(made["socket"]))
    server.close()
    try:
        os.mknod(tmp_path / "full.jsonl", 0o666 | stat.S_IFCHR, os.makedev(1, 7))
        made["device"] = tmp_path / "full.jsonl"
    except PermissionError:
        pass
    return made


def test_outputs_that_are_not_regular_files_are_never_replaced(runs, tmp_path):
    for kind, path in _special_files(tmp_path).items():
        mode = path.lstat().st_mode
        result = invoke("sample", "--run", runs / "run", "--out", path, "--count", "4", "--overwrite")
        assert result.is_one_line_error(path), (kind, result.stderr)
        assert path.lstat().st_mode == mode, kind  # still a device / FIFO / socket / directory


def test_the_atomic_writer_never_renames_onto_a_special_file(tmp_path):
    from protomem.errors import ProtomemError
    from protomem.io import write_text_atomic

    for kind, path in _special_files(tmp_path).items():
        mode = path.lstat().st_mode
        with pytest.raises(ProtomemError, match="not a regular file"):
            write_text_atomic(path, "x")
        assert path.lstat().st_mode == mode, kind
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_overwrite_never_deletes_a_folder_holding_an_input_or_the_current_folder(runs, tmp_path, monkeypatch):
    folder = tmp_path / "work"
    folder.mkdir()
    shutil.copy(runs / "g" / "strings.jsonl", folder / "strings.jsonl")
    before = snapshot(tmp_path)
    result = invoke("train", "--data", folder / "strings.jsonl", "--out", folder, "--overwrite", *TRAIN)
    assert result.is_one_line_error(folder, "input"), result.stderr
    monkeypatch.chdir(folder)
    result = invoke("grammar", "sample", "--out", tmp_path, "--overwrite", "--count", "4")
    assert result.is_one_line_error(tmp_path), result.stderr
    assert snapshot(tmp_path) == before


# --- 3. resuming a study folder protomem did not write --------------------------------------------------


@pytest.mark.parametrize("content", [b"null", b"", b"\xff\xfe{}", b'{"preset": "quick"}', b"[1, 2]"])
def test_study_resume_refuses_a_record_it_did_not_write(tmp_path, content):
    run = tmp_path / "study"
    run.mkdir()
    (run / "study.json").write_bytes(content)
    (run / "notes.txt").write_text("mine\n")
    before = snapshot(run)
    result = invoke("study", "--resume", run)
    assert result.is_one_line_error(run / "study.json"), result.stderr
    assert snapshot(run) == before


# --- 4. resource bombs ------------------------------------------------------------------------------


def test_a_small_grammar_file_cannot_ask_for_a_huge_grammar(runs, tmp_path):
    doc = json.loads((runs / "g" / "grammar.json").read_text())
    for field, value, limit in (
        ("branching", 10**9, "PROTOMEM_MAX_STRING_TOKENS"),
        ("depth", 10**6, "PROTOMEM_MAX_STRING_TOKENS"),
        ("vocab_size", 10**12, "PROTOMEM_MAX_VOCAB"),
    ):
        path = tmp_path / f"{field}.json"
        path.write_text(json.dumps({**doc, field: value}))
        result = invoke("grammar", "check", "--grammar", path, "--strings", runs / "g" / "strings.jsonl")
        assert result.is_one_line_error(path, limit), (field, result.stderr)
    result = invoke("grammar", "sample", "--out", tmp_path / "x", "--vocab", "64", "--branching", "5")
    assert result.is_one_line_error("PROTOMEM_MAX_GRAMMAR_TUPLES") and not (tmp_path / "x").exists()


def test_a_sweep_grid_is_counted_before_it_is_expanded(tmp_path):
    keys = {f"diffusion.k{i}": list(range(10)) for i in range(12)}  # 10^12 points in a few hundred bytes
    path = tmp_path / "huge.yaml"
    path.write_text(json.dumps({"grid": keys}))
    result = invoke("sweep", path, "--dry-run", "--out", tmp_path / "sweep")
    assert result.is_one_line_error(path, "PROTOMEM_MAX_SWEEP_POINTS"), result.stderr
    assert not (tmp_path / "sweep").exists()


def test_one_huge_token_cannot_make_the_vocabulary_huge(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("0 1 2 3\n1 2 3 2147483647\n")
    result = invoke("train", "--data", data, "--out", tmp_path / "run", *TRAIN)
    assert result.is_one_line_error(data, "PROTOMEM_MAX_VOCAB"), result.stderr
    assert not (tmp_path / "run").exists()


def test_a_string_longer_than_the_limit_is_refused(tmp_path, monkeypatch):
    data = tmp_path / "data.txt"
    data.write_text("1 2 3 4\n" + " ".join(["1"] * 300) + "\n")
    monkeypatch.setenv("PROTOMEM_MAX_STRING_TOKENS", "256")
    result = invoke("train", "--data", data, "--out", tmp_path / "run", *TRAIN)
    assert result.is_one_line_error(data, "line 2", "PROTOMEM_MAX_STRING_TOKENS"), result.stderr


def test_a_model_too_large_for_the_machine_is_refused_before_it_is_built(runs, tmp_path):
    result = invoke("train", *data_args(runs), "--out", tmp_path / "run", *TRAIN, "--width", "100000")
    assert result.is_one_line_error("PROTOMEM_MAX_PARAMETERS"), result.stderr
    assert not (tmp_path / "run").exists()


def png_header(width: int, height: int) -> bytes:
    """A small PNG file whose header declares width x height grey pixels (its data is far too short)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 9))
        + chunk(b"IEND", b"")
    )


def audit_images_folder(folder: Path, count: int = 4, size: int = 8) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_an_image_declaring_huge_dimensions_is_refused_before_decoding(tmp_path, monkeypatch):
    train = audit_images_folder(tmp_path / "train")
    bombs = tmp_path / "bombs"
    bombs.mkdir()
    (bombs / "huge.png").write_bytes(png_header(100000, 100000))  # 10^10 pixels in 80 bytes
    for first, second in ((train, bombs), (bombs, train)):
        result = invoke(
            "audit", "--train", first, "--generated", second, "--out", tmp_path / "out", "--quiet"
        )
        assert result.is_one_line_error(bombs / "huge.png"), result.stderr  # was DecompressionBombError
    monkeypatch.setenv("PROTOMEM_MAX_IMAGE_PIXELS", "32")
    result = invoke("audit", "--train", train, "--generated", train, "--out", tmp_path / "out", "--quiet")
    assert result.is_one_line_error(train / "0.png", "PROTOMEM_MAX_IMAGE_PIXELS"), result.stderr
    assert not (tmp_path / "out").exists()


def test_audit_text_and_sequences_longer_than_the_limit_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PROTOMEM_MAX_STRING_TOKENS", "256")
    long_text = tmp_path / "long.txt"  # was: two 200k-token lines asking for 37 GiB
    long_text.write_text("a short line\n" + " ".join(f"w{i}" for i in range(300)) + "\n")
    long_tokens = tmp_path / "long.jsonl"
    long_tokens.write_text(json.dumps({"tokens": [1, 2]}) + "\n" + json.dumps({"tokens": [1] * 300}) + "\n")
    for path in (long_text, long_tokens):
        result = invoke("audit", "--train", path, "--generated", path, "--out", tmp_path / "out", "--quiet")
        assert result.is_one_line_error(path, "line 2", "PROTOMEM_MAX_STRING_TOKENS"), result.stderr
        assert not (tmp_path / "out").exists()


def test_the_longest_common_run_needs_memory_for_one_row_not_the_table():
    import tracemalloc

    import numpy as np

    from protomem.memorization.text import longest_common_run

    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 3, 3000), rng.integers(0, 3, 4000)
    b[1000:1100] = a[2000:2100] = 7  # one run of 100 tokens shared, nowhere else a 7
    tracemalloc.start()
    try:
        length, start_a, start_b = longest_common_run(a, b)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert length >= 100 and np.array_equal(a[start_a : start_a + length], b[start_b : start_b + length])
    assert peak < 1 << 20  # the (3000, 4000) table and its skewed copy took 36 MB


# --- 5. decoding ------------------------------------------------------------------------------------


def test_bytes_that_are_not_utf8_name_the_file_and_line(runs, tmp_path):
    grammar = runs / "g" / "grammar.json"
    bad = b"\xff\xfe"
    cases = {
        "grammar.json": (
            b"{\n" + bad + b"\n}",
            ["grammar", "check", "--grammar", "{}", "--strings", runs / "g" / "strings.jsonl"],
        ),
        "s.jsonl": (
            b'{"tokens": [0, 1, 2, 3]}\n{"tokens": [0, 1' + bad + b"]}\n",
            ["grammar", "check", "--grammar", grammar, "--strings", "{}"],
        ),
        "s.txt": (
            b"0 1 2 3\n0 1 2 3 " + bad + b"\n",
            ["grammar", "check", "--grammar", grammar, "--strings", "{}"],
        ),
        "c.yaml": (
            b"steps: 3\nwidth: " + bad + b"\n",
            ["train", *data_args(runs), "--out", tmp_path / "r", "--config", "{}"],
        ),
        "sweep.yaml": (b"base:\n  " + bad + b": quick\n", ["sweep", "{}", "--dry-run"]),
    }
    for name, (content, command) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        result = invoke(*[path if c == "{}" else c for c in command])
        assert result.is_one_line_error(path, "line 2", "UTF-8"), (name, result.stderr)
    assert not (tmp_path / "r").exists()


def test_deeply_nested_json_and_yaml_are_one_line_errors(runs, tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    grammar = tmp_path / "grammar.json"
    grammar.write_text(deep)
    result = invoke("grammar", "check", "--grammar", grammar, "--strings", runs / "g" / "strings.jsonl")
    assert result.is_one_line_error(grammar, "nested too deeply"), result.stderr
    strings = tmp_path / "s.jsonl"
    strings.write_text('{"tokens": [0, 1, 2, 3]}\n{"tokens": ' + deep + "}\n")
    result = invoke("grammar", "check", "--grammar", runs / "g" / "grammar.json", "--strings", strings)
    assert result.is_one_line_error(strings, "line 2"), result.stderr
    config = tmp_path / "c.yaml"
    config.write_text("steps: " + deep)
    result = invoke("train", *data_args(runs), "--out", tmp_path / "r", "--config", config)
    assert result.is_one_line_error(config, "nested too deeply"), result.stderr


def test_tokens_beyond_int64_are_one_line_errors(runs, tmp_path):
    grammar = runs / "g" / "grammar.json"
    for name, content in (
        ("s.jsonl", '{"tokens": [0, 1, 2, 3]}\n{"tokens": [0, 1, 2, 9223372036854775808]}\n'),
        ("s.txt", "0 1 2 3\n0 1 2 18446744073709551616\n"),
        ("t.jsonl", '{"tokens": [0, 1, 2, 3]}\n{"tokens": [0, 1, 2, ' + "9" * 5000 + "]}\n"),
    ):
        path = tmp_path / name
        path.write_text(content)
        result = invoke("grammar", "check", "--grammar", grammar, "--strings", path)
        assert result.is_one_line_error(path, "line 2"), (name, result.stderr)


@pytest.mark.parametrize(
    "tokens",
    [
        pa.array([["0", "1", "2", "3"]], pa.list_(pa.string())),
        pa.array([[None, None, None, None]], pa.list_(pa.null())),
        pa.array([[1, 2]], pa.list_(pa.timestamp("s"))),
        pa.array([1], pa.timestamp("ms")),
        pa.array([[0.0, 1.5, 2.0, 3.0]], pa.list_(pa.float64())),
        pa.array([[0, 1, 2, 2**64 - 1]], pa.list_(pa.uint64())),
        pa.array([[0, None, 2, 3]], pa.list_(pa.int64())),
    ],
)
def test_parquet_tokens_must_be_whole_numbers(runs, tmp_path, tokens):
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"tokens": tokens}), path)
    result = invoke("grammar", "check", "--grammar", runs / "g" / "grammar.json", "--strings", path)
    assert result.is_one_line_error(path), result.stderr


def test_parquet_whole_floats_are_read_exactly(runs, tmp_path):
    from protomem.io import read_strings

    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"tokens": pa.array([[0.0, 1.0, 2.0, 3.0]], pa.list_(pa.float64()))}), path)
    assert read_strings(path).tokens.tolist() == [[0, 1, 2, 3]]


def test_malformed_yaml_config_names_its_line(runs, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("steps: 3\nwidth: [8\nlr: 0.1\n")
    result = invoke("train", *data_args(runs), "--out", tmp_path / "r", "--config", config)
    assert result.is_one_line_error(config, "line 3", "YAML"), result.stderr
    assert not (tmp_path / "r").exists()


def test_a_seed_beyond_int64_leaves_nothing_behind(runs, tmp_path):
    for command in (
        ["train", *data_args(runs), "--out", tmp_path / "r", *TRAIN, "--seed", str(2**64)],
        ["grammar", "sample", "--out", tmp_path / "g", "--seed", str(2**64)],
        ["grammar", "sample", "--out", tmp_path / "g", "--seed", "-1"],
    ):
        result = invoke(*command)
        assert result.is_one_line_error("seed"), (command, result.stderr)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_learning_rates_are_refused(runs, tmp_path, value):
    result = invoke("train", *data_args(runs), "--out", tmp_path / "r", *TRAIN, "--lr", value)
    assert result.is_one_line_error("lr"), result.stderr
    config = tmp_path / "c.yaml"
    config.write_text(f"lr: .{value.lstrip('-')}\nweight_decay: .nan\n")
    result = invoke("train", *data_args(runs), "--out", tmp_path / "r", *TRAIN[2:], "--config", config)
    assert result.is_one_line_error(config), result.stderr
    assert not (tmp_path / "r").exists()


# --- 6. checkpoint trust ----------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["../../../../etc/passwd", "/etc/passwd", "sub/model.safetensors"])
def test_state_json_file_entries_outside_our_names_are_refused(runs, tmp_path, entry):
    run = copy_run(runs, tmp_path)
    state_path = latest(run) / "state.json"
    state = json.loads(state_path.read_text())
    state["files"][entry] = "0" * 64
    state_path.write_text(json.dumps(state))
    for command in (
        ["sample", "--run", run, "--out", tmp_path / "o.jsonl", "--count", "2"],
        resume(runs, run),
    ):
        assert invoke(*command).is_one_line_error(state_path, "files"), command
    assert not (tmp_path / "o.jsonl").exists()


def test_links_out_of_the_run_folder_are_not_followed(runs, tmp_path):
    other = copy_run(runs, tmp_path, "run")
    victim = tmp_path / "victim"
    shutil.copytree(runs / "run", victim)
    directory = latest(victim)
    shutil.rmtree(directory)
    directory.symlink_to(latest(other), target_is_directory=True)  # a checkpoint borrowed from another run
    for command in (
        ["sample", "--run", victim, "--out", tmp_path / "o.jsonl", "--count", "2"],
        resume(runs, victim),
    ):
        result = invoke(*command)
        assert result.is_one_line_error("outside the run folder"), (command, result.stderr)
    third = tmp_path / "third"
    shutil.copytree(runs / "run", third)
    weights = latest(third) / "model.safetensors"
    weights.unlink()
    weights.symlink_to(latest(other) / "model.safetensors")
    result = invoke("sample", "--run", third, "--out", tmp_path / "o.jsonl", "--count", "2")
    assert result.is_one_line_error("outside the run folder"), result.stderr


def test_sample_checks_the_model_weights_even_when_it_uses_the_ema(runs, tmp_path):
    run = copy_run(runs, tmp_path, "run_ema")
    directory = latest(run)
    tensors = load_file(str(directory / "model.safetensors"))
    name = next(k for k, v in tensors.items() if k.startswith("model.") and v.ndim == 2)
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, str(directory / "model.safetensors"))
    rehash(directory, "model.safetensors")
    result = invoke("sample", "--run", run, "--out", tmp_path / "o.jsonl", "--count", "2")
    assert result.is_one_line_error("model.safetensors", name.removeprefix("model.")), result.stderr


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(runs, tmp_path, value):
    run = copy_run(runs, tmp_path)
    directory = latest(run)
    tensors = load_file(str(directory / "model.safetensors"))
    name = next(iter(tensors))
    tensors[name] = tensors[name].clone().fill_(value)
    save_file(tensors, str(directory / "model.safetensors"))
    rehash(directory, "model.safetensors")
    for command in (
        ["sample", "--run", run, "--out", tmp_path / "o.jsonl", "--count", "2"],
        resume(runs, run),
    ):
        assert invoke(*command).is_one_line_error("NaN or infinite"), command


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_a_damaged_safetensors_file_is_a_clean_error_when_resuming(runs, tmp_path, damage):
    run = copy_run(runs, tmp_path)
    directory = latest(run)
    data = (directory / "model.safetensors").read_bytes()
    data = data[: len(data) // 2] if damage == "truncated" else b"\xff" * 8 + data[8:]
    (directory / "model.safetensors").write_bytes(data)
    rehash(directory, "model.safetensors")
    before = snapshot(run)
    result = invoke(*resume(runs, run))
    assert result.is_one_line_error("model.safetensors", "safetensors"), result.stderr
    assert snapshot(run) == before


def test_the_image_study_never_unpickles_a_checkpoint(tmp_path):
    from protomem.errors import ProtomemError
    from protomem.study.images import get_image_preset, run_image_study

    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    from dataclasses import asdict

    (run / "config.json").write_text(json.dumps({"preset": asdict(get_image_preset("quick"))}))
    (run / "checkpoint" / "state.pt").write_bytes(b"\x80\x04\x95not a real pickle")
    with pytest.raises(ProtomemError, match="not read"):
        run_image_study(run, preset="quick", resume=True, progress=False, threads=1)


# --- 8. permissions -----------------------------------------------------------------------------------


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_outputs_get_the_users_umask_permissions(runs, tmp_path, umask, file_mode, dir_mode):
    previous = os.umask(umask)
    try:
        assert invoke("grammar", "sample", "--out", tmp_path / "g", "--count", "4").code == 0
        out = tmp_path / "o.jsonl"
        assert invoke("sample", "--run", runs / "run", "--out", out, "--count", "2").code == 0
        assert invoke("train", *data_args(runs), "--out", tmp_path / "r", *TRAIN).code == 0
    finally:
        os.umask(previous)
    files = [out, *(p for p in tmp_path.rglob("*") if p.is_file())]
    dirs = [p for p in tmp_path.rglob("*") if p.is_dir()]
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {oct(file_mode)}
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in dirs} == {oct(dir_mode)}


def _read_only(locked: Path) -> list[str]:
    """A command prefix under which ``locked`` cannot be written: chmod for a normal user; for root (who
    writes anywhere) a read-only bind mount in a private mount namespace."""
    if os.geteuid() != 0:
        os.chmod(locked, 0o555)
        return []
    if shutil.which("unshare") is None:
        pytest.skip("root, and no unshare to make a read-only folder")
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(locked), "true"]
    )
    if probe.returncode != 0:
        pytest.skip("root, and mount namespaces are not available")
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(locked)]


def test_a_read_only_output_location_is_a_one_line_error(runs, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    prefix = _read_only(locked)
    commands = [
        ["grammar", "sample", "--out", locked / "g", "--count", "4"],
        [
            "grammar",
            "check",
            "--grammar",
            runs / "g" / "grammar.json",
            "--strings",
            runs / "g" / "strings.jsonl",
            "--out",
            locked / "c.jsonl",
        ],
        ["train", *data_args(runs), "--out", locked / "r", *TRAIN],
        ["sample", "--run", runs / "run", "--out", locked / "s.jsonl", "--count", "2"],
        ["study", "--preset", "quick", "--out", locked / "s"],
    ]
    try:
        for command in commands:
            done = subprocess.run(
                [*prefix, sys.executable, "-m", "protomem.cli", *map(str, command)],
                capture_output=True,
                text=True,
                timeout=300,
            )
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            assert done.returncode == 2 and len(lines) == 1, (command, done.stderr)
            assert str(locked) in lines[0] and ("ermission denied" in lines[0] or "ead-only" in lines[0]), (
                lines
            )
        assert list(locked.iterdir()) == []
    finally:
        os.chmod(locked, 0o755)


def test_the_image_study_checkpoint_is_safetensors_and_json_and_checked(tmp_path):
    from protomem.diffusion.images import ImageUNet
    from protomem.errors import ProtomemError
    from protomem.study import images

    torch.manual_seed(0)
    model = ImageUNet(channels=1, width=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2])).pow(2).mean().backward()
    optimizer.step()
    generator = torch.Generator().manual_seed(5)
    torch.randn(3, generator=generator)
    images._save_checkpoint(tmp_path, model, optimizer, generator, 1, [0.25])
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == [
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]
    fresh = ImageUNet(channels=1, width=4)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    fresh_generator = torch.Generator()
    step, losses = images._load_checkpoint(tmp_path, fresh, fresh_optimizer, fresh_generator)
    assert step == 1 and losses == [0.25]
    assert torch.equal(fresh_generator.get_state(), generator.get_state())
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value)
    # a reshaped moment, vouched for by its digest, is refused before torch sees it
    directory = tmp_path / "checkpoint"
    moments = load_file(str(directory / "optimizer.safetensors"))
    key = next(k for k in moments if k.endswith("exp_avg"))
    moments[key] = moments[key].reshape(-1)[:1].contiguous()
    save_file(moments, str(directory / "optimizer.safetensors"))
    rehash(directory, "optimizer.safetensors")
    with pytest.raises(ProtomemError, match=key):
        images._load_checkpoint(tmp_path, fresh, fresh_optimizer, fresh_generator)


# --- 7. report on damaged run folders -------------------------------------------------------------------


def test_report_on_a_study_record_without_conditions_is_one_line(tmp_path):
    run = tmp_path / "study"
    run.mkdir()
    for content in ('{"preset": "quick"}', '{"conditions": ["../../etc"]}', "[]", '{"conditions": [1]}'):
        (run / "study.json").write_text(content)
        before = snapshot(run)
        result = invoke("report", run)
        assert result.is_one_line_error(run), (content, result.stderr)  # was KeyError: 'conditions'
        assert snapshot(run) == before


def test_report_on_damaged_condition_tables_is_one_line(runs, tmp_path):
    run = tmp_path / "condition"
    run.mkdir()
    shutil.copy(runs / "g" / "grammar.json", run / "grammar.json")
    (run / "summary.json").write_text(json.dumps({"primary_score": "logprob", "correlations": {}}))
    (run / "metrics.parquet").write_bytes(b"PAR1 not really a parquet file PAR1")  # was ArrowInvalid
    before = snapshot(run)
    result = invoke("report", run)
    assert result.is_one_line_error(run / "metrics.parquet"), result.stderr
    pq.write_table(pa.table({"step": [1, 2]}), run / "metrics.parquet")
    for name in ("per_example", "nulls", "slop"):
        pq.write_table(pa.table({"index": [0]}), run / f"{name}.parquet")
    before = snapshot(run)
    result = invoke("report", run)  # readable tables that lack the columns the report needs
    assert result.is_one_line_error(run, "damaged or incomplete"), result.stderr
    assert snapshot(run) == before


# --- 9. audit -----------------------------------------------------------------------------------------


def test_a_zero_byte_npy_is_a_one_line_error(tmp_path):
    import numpy as np

    good = tmp_path / "good.npy"
    np.save(good, np.random.default_rng(0).integers(0, 256, (6, 8, 8), dtype=np.uint8))
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    for train, generated in ((good, empty), (empty, good)):
        before = snapshot(tmp_path)
        result = invoke(
            "audit", "--train", train, "--generated", generated, "--out", tmp_path / "out", "--quiet"
        )
        assert result.is_one_line_error(empty), result.stderr  # was exit 1, "Aborted."
        assert snapshot(tmp_path) == before


def test_a_training_set_of_one_image_is_refused_naming_the_file(tmp_path):
    import numpy as np

    one = tmp_path / "one.npy"
    np.save(one, np.zeros((1, 8, 8), dtype=np.uint8))
    generated = tmp_path / "generated.npy"
    np.save(generated, np.zeros((3, 8, 8), dtype=np.uint8))
    before = snapshot(tmp_path)
    result = invoke("audit", "--train", one, "--generated", generated, "--out", tmp_path / "out", "--quiet")
    assert result.is_one_line_error(one, "at least 2"), result.stderr  # the file was not named (fuzz run)
    assert snapshot(tmp_path) == before


def npy_with_overlong_header(path, fill: bytes) -> None:
    """A .npy whose header-length field reaches into the data, and the data ``fill`` repeated: numpy's header
    parser then reads data bytes as the header's text."""
    import io
    import struct

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.zeros((12, 8, 8), dtype=np.uint8))
    raw = bytearray(buffer.getvalue())
    length = struct.unpack("<H", raw[8:10])[0]
    raw[10 + length :] = fill * (len(raw) - 10 - length)
    raw[8:10] = struct.pack("<H", length + 100)
    path.write_bytes(bytes(raw))


def test_a_npy_header_that_runs_into_its_data_is_a_one_line_error(tmp_path):
    import numpy as np

    good = tmp_path / "good.npy"
    np.save(good, np.random.default_rng(0).integers(0, 256, (6, 8, 8), dtype=np.uint8))
    for name, fill in (("open.npy", b"("), ("garbage.npy", b"\xff")):  # found by the fuzzer: TokenError
        bad = tmp_path / name
        npy_with_overlong_header(bad, fill)
        for train, generated in ((good, bad), (bad, good)):
            before = snapshot(tmp_path)
            result = invoke(
                "audit", "--train", train, "--generated", generated, "--out", tmp_path / "out", "--quiet"
            )
            assert result.is_one_line_error(bad, "unreadable array file"), result.stderr
            assert snapshot(tmp_path) == before


def test_a_shift_larger_than_the_images_is_refused_before_the_audit(tmp_path):
    train = audit_images_folder(tmp_path / "train", count=6)
    args = ["audit", "--train", train, "--generated", train, "--out", tmp_path / "out", "--quiet"]
    result = invoke(*args, "--max-shift", "16")  # 8x8 images: was a broadcasting ValueError traceback
    assert result.is_one_line_error("--max-shift 16", "8x8"), result.stderr
    assert not (tmp_path / "out").exists()
    assert invoke(*args, "--max-shift", "2").code == 0  # at most a quarter of the shorter side


def test_the_script_freezes_the_garbage_collector_only_at_exit(tmp_path):
    """``main`` defers ``gc.freeze`` (a faster exit) to an exit handler: a process that calls it in-process
    keeps collecting afterwards, and the script still writes its outputs and runs its exit handlers."""
    import gc

    assert invoke("grammar", "sample", "--out", tmp_path / "a", "--count", "4").code == 0
    assert gc.get_freeze_count() == 0
    script = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))\n"
        "from protomem.cli import main\n"
        "sys.argv = ['protomem', 'grammar', 'sample', '--out', sys.argv[1], '--count', '4']\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "b")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "frozen at exit: True" in done.stdout
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted(
        p.name for p in (tmp_path / "a").iterdir()
    )


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_a_training_set_of_one_item_has_no_ratio_flag_and_no_numpy_warnings(tmp_path, kind):
    """One training item has no second-nearest item, so no d1/d2 ratio: an unrelated output is not a
    copy (it was: d2 = inf made every output's ratio 0). Nor has it neighbours to measure a density
    from: the summary says so without numpy's "Mean of empty slice" warnings (found by the fuzz run)."""
    import warnings

    if kind == "txt":
        train, generated = "the cat sat on the mat today\n", "the cat sat on the mat today\nanother line\n"
    else:
        train, generated = (
            '{"tokens": [1, 2, 3, 4]}\n',
            '{"tokens": [1, 2, 3, 4]}\n{"tokens": [4, 3, 2, 1]}\n',
        )
    (tmp_path / f"train.{kind}").write_text(train)
    (tmp_path / f"generated.{kind}").write_text(generated)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning becomes a traceback, which the checks below refuse
        result = invoke(
            "audit",
            "--train",
            tmp_path / f"train.{kind}",
            "--generated",
            tmp_path / f"generated.{kind}",
            "--out",
            tmp_path / "out",
            "--quiet",
        )
    assert result.code == 0, result.stderr
    assert "Warning" not in result.stderr and "Traceback" not in result.stderr
    assert "1 of 2 outputs flagged" in result.stdout + result.stderr
