"""The grammar command line and the string-file format, run as a user would (subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from protomem.errors import ProtomemError
from protomem.grammar import load_grammar, parse
from protomem.io import read_strings, write_strings


def protomem(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from protomem.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


SAMPLE = [
    "grammar",
    "sample",
    "--vocab",
    "8",
    "--classes",
    "8",
    "--rules",
    "3",
    "--branching",
    "2",
    "--depth",
    "3",
    "--zipf",
    "1.0",
    "--count",
    "500",
    "--seed",
    "0",
]


def test_sample_then_check_round_trip(tmp_path: Path):
    out = tmp_path / "run"
    result = protomem(*SAMPLE, "--out", str(out), "--distinct", "--zipf-levels", "0,1")
    assert result.returncode == 0, result.stderr
    doc = json.loads((out / "grammar.json").read_text())
    assert doc["format"] == "protomem.rhm/1" and doc["zipf_levels"] == [0, 1] and doc["seed"] == 0
    assert len(doc["levels"]) == 3 and len(doc["levels"][0]["rules"]) == 8
    table = pq.read_table(out / "strings.parquet")
    assert table.column_names == ["tokens", "class", "logprob"]
    grammar = load_grammar(out / "grammar.json")
    strings = read_strings(out / "strings.parquet", vocab_size=8, length=8)
    assert np.unique(strings.tokens, axis=0).shape[0] == 500
    parsed = parse(grammar, strings.tokens)
    np.testing.assert_array_equal(parsed.classes, strings.classes)
    np.testing.assert_allclose(parsed.logprob, strings.logprobs)

    check = protomem(
        "grammar",
        "check",
        "--grammar",
        str(out / "grammar.json"),
        "--strings",
        str(out / "strings.parquet"),
        "--out",
        str(tmp_path / "check.jsonl"),
    )
    assert check.returncode == 0, check.stderr
    assert "fully valid: 1.0000" in check.stdout
    records = [json.loads(line) for line in (tmp_path / "check.jsonl").read_text().splitlines()]
    assert len(records) == 500 and all(r["valid"] and r["deepest_valid_level"] == 0 for r in records)


def test_check_reports_corrupted_strings_per_string(tmp_path: Path):
    out = tmp_path / "run"
    assert protomem(*SAMPLE, "--out", str(out), "--format", "jsonl").returncode == 0
    grammar = load_grammar(out / "grammar.json")
    strings = read_strings(out / "strings.jsonl")
    lowest = {tuple(r) for r in grammar.rules[-1].reshape(-1, 2).tolist()}
    not_a_rule = next((a, b) for a in range(8) for b in range(8) if (a, b) not in lowest)
    tokens = strings.tokens[:4].copy()
    tokens[1, 2:4] = not_a_rule
    write_strings(tmp_path / "mixed.txt", tokens)
    result = protomem(
        "grammar",
        "check",
        "--grammar",
        str(out / "grammar.json"),
        "--strings",
        str(tmp_path / "mixed.txt"),
        "--out",
        str(tmp_path / "r.parquet"),
    )
    assert result.returncode == 0, result.stderr
    rows = pq.read_table(tmp_path / "r.parquet").to_pylist()
    assert [r["valid"] for r in rows] == [True, False, True, True]
    assert rows[1] == {"valid": False, "deepest_valid_level": 3, "class": None, "logprob": None}


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ("0 1 2 3 4 5 6 7\n0 1 2\n", ".txt", r"line 2\): string has 3 tokens, expected 8"),
        ("0 1 2 3 4 5 6 9\n", ".txt", r"line 1\): token 9 out of range \[0, 8\)"),
        ('{"tokens": [0,1,2,3,4,5,6,7]}\n{"tokens": [0,1,\n', ".jsonl", r"line 2\): malformed JSON"),
        ("0 1 x 3 4 5 6 7\n", ".txt", r"line 1\): tokens must be integers"),
        ("", ".txt", "no strings in file"),
    ],
)
def test_bad_string_files_give_one_line_errors(tmp_path: Path, content: str, suffix: str, message: str):
    out = tmp_path / "run"
    assert protomem(*SAMPLE, "--out", str(out)).returncode == 0
    bad = tmp_path / f"bad{suffix}"
    bad.write_text(content)
    result = protomem("grammar", "check", "--grammar", str(out / "grammar.json"), "--strings", str(bad))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert str(bad) in result.stderr
    import re

    assert re.search(message, result.stderr), result.stderr


def test_bad_grammar_file_names_the_field(tmp_path: Path):
    out = tmp_path / "run"
    assert protomem(*SAMPLE, "--out", str(out)).returncode == 0
    doc = json.loads((out / "grammar.json").read_text())
    doc["levels"][2]["probs"][3] = [0.5, 0.5, 0.5]
    (tmp_path / "g.json").write_text(json.dumps(doc))
    result = protomem(
        "grammar", "check", "--grammar", str(tmp_path / "g.json"), "--strings", str(out / "strings.parquet")
    )
    assert result.returncode == 2
    assert "levels[2].probs" in result.stderr and "symbol 3" in result.stderr
    (tmp_path / "broken.json").write_text('{"format": "protomem.rhm/1",\n "vocab_size": }')
    result = protomem(
        "grammar",
        "check",
        "--grammar",
        str(tmp_path / "broken.json"),
        "--strings",
        str(out / "strings.parquet"),
    )
    assert result.returncode == 2 and "line 2" in result.stderr and "malformed JSON" in result.stderr


def test_existing_output_is_refused_and_failures_leave_nothing(tmp_path: Path):
    out = tmp_path / "run"
    assert protomem(*SAMPLE, "--out", str(out)).returncode == 0
    before = (out / "strings.parquet").read_bytes()
    again = protomem(*SAMPLE, "--out", str(out), "--seed", "1")
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert (out / "strings.parquet").read_bytes() == before
    impossible = protomem("grammar", "sample", "--classes", "100", "--out", str(tmp_path / "never"))
    assert impossible.returncode == 2 and "impossible grammar" in impossible.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no partial directory left behind
    replaced = protomem(*SAMPLE, "--out", str(out), "--seed", "1", "--overwrite")
    assert replaced.returncode == 0 and (out / "strings.parquet").read_bytes() != before


def test_same_seed_same_files(tmp_path: Path):
    for name in ("a", "b"):
        assert protomem(*SAMPLE, "--out", str(tmp_path / name), "--format", "jsonl").returncode == 0
    for file in ("grammar.json", "strings.jsonl"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()


def test_read_strings_validates_parquet(tmp_path: Path):
    write_strings(tmp_path / "s.parquet", np.array([[0, 1], [2, 3]]), classes=np.array([1, -1]))
    table = read_strings(tmp_path / "s.parquet")
    assert table.classes.tolist() == [1, -1] and table.logprobs is None
    with pytest.raises(ProtomemError, match=r"row 2\): token 3 out of range"):
        read_strings(tmp_path / "s.parquet", vocab_size=3)
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(ProtomemError, match="not a readable Parquet file"):
        read_strings(tmp_path / "x.parquet")
