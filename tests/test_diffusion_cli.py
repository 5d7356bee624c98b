"""`protomem train` and `protomem sample`, run as a user would (subprocess)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from protomem.diffusion import load_checkpoint
from protomem.grammar import load_grammar, parse
from protomem.io import read_strings


def protomem(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from protomem.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_train_then_sample_then_resume(tmp_path):
    data_dir = tmp_path / "data"
    done = protomem(
        "grammar", "sample", "--vocab", "8", "--classes", "8", "--rules", "3", "--depth", "3",
        "--count", "64", "--distinct", "--zipf", "1", "--out", str(data_dir),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = tmp_path / "cfg.yaml"
    config.write_text("width: 32\nsteps: 30\nbatch_size: 16\ntimesteps: 20\nn_evals: 3\neval_samples: 4\n")
    run = tmp_path / "run"
    common = [
        "train", "--data", str(data_dir / "strings.parquet"), "--out", str(run), "--config", str(config),
        "--grammar", str(data_dir / "grammar.json"), "--conditional", "--threads", "1", "--quiet",
    ]  # fmt: skip
    done = protomem(*common)
    assert done.returncode == 0, done.stderr
    assert "parameters" in done.stderr and "done: step 30" in done.stderr
    loaded = load_checkpoint(run)
    assert loaded.step == 30 and loaded.config.n_classes == 8 and loaded.config.width == 32
    assert (run / "config.yaml").is_file() and (run / "metrics.parquet").is_file()

    # a second train into the same directory is refused; --resume of a finished run is a no-op
    done = protomem(*common)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "not empty" in done.stderr
    assert protomem(*common, "--resume").returncode == 0

    out = tmp_path / "samples.jsonl"
    done = protomem(
        "sample", "--run", str(run), "--count", "20", "--out", str(out), "--step", "30", "--threads", "1"
    )
    assert done.returncode == 0, done.stderr
    table = read_strings(out, vocab_size=8, length=8)
    assert table.tokens.shape == (20, 8) and table.classes is not None and (table.classes >= 0).all()
    grammar = load_grammar(data_dir / "grammar.json")
    assert parse(grammar, table.tokens).valid.dtype == bool
    again = tmp_path / "again.jsonl"
    assert (
        protomem(
            "sample", "--run", str(run), "--count", "20", "--out", str(again), "--threads", "1"
        ).returncode
        == 0
    )
    assert np.array_equal(read_strings(again).tokens, table.tokens)


def test_bad_inputs_are_one_line_errors(tmp_path):
    data = tmp_path / "strings.txt"
    data.write_text("0 1 2 3 4 5\n1 2 3 4 5 6\n")
    config = tmp_path / "cfg.yaml"
    config.write_text("width: 32\nlearnin_rate: 3\n")
    done = protomem("train", "--data", str(data), "--out", str(tmp_path / "r"), "--config", str(config))
    assert (
        done.returncode == 2 and "learnin_rate: unknown key" in done.stderr and "Traceback" not in done.stderr
    )
    done = protomem("train", "--data", str(data), "--out", str(tmp_path / "r"))
    assert done.returncode == 2 and "seq_len=6 does not fit the tree U-Net" in done.stderr
    done = protomem("train", "--data", str(data), "--out", str(tmp_path / "r"), "--lr", "-1")
    assert done.returncode == 2 and "lr:" in done.stderr
    done = protomem("sample", "--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "s.txt"))
    assert done.returncode == 2 and "no such run directory" in done.stderr
    assert not (tmp_path / "r").exists()
