"""Fuzzing every command that reads user files (issue 13): malformed grammar files, string files (txt,
jsonl, Parquet), training configs, sweep files, audit inputs (text, token sequences, images), tampered
checkpoints, damaged study folders.

Each case mutates one valid input (one value replaced by a nasty one, a key dropped or added, bytes
damaged or not UTF-8, Parquet columns of the wrong type), runs the command in-process and checks, in
:func:`tests.fuzzing.run_case`: no traceback; exit code 2 with one line on stderr naming an input file
(or 0 if the mutation left the input valid; always 2 when it certainly did not); no output and no
change anywhere on refusal; inputs never changed.

The fast suite runs a few cases per family; ``make test-slow`` runs the same properties with
``PROTOMEM_FUZZ_EXAMPLES`` cases per family (default 400: 3,200 cases in all) and prints the tally.
Every case runs with small resource limits (see ``LIMITS``), so an input that is valid is also cheap.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.cli_runner import invoke
from tests.fuzzing import (
    Raw,
    Tally,
    dumps,
    fresh_copy,
    mutated_bytes,
    mutated_document,
    nasty_scalars,
    run_case,
)

REPO = Path(__file__).resolve().parents[1]
FAST_EXAMPLES = 6
LONG_EXAMPLES = int(os.environ.get("PROTOMEM_FUZZ_EXAMPLES", "400"))
LIMITS = {
    "PROTOMEM_MAX_TOTAL_TOKENS": "4096",
    "PROTOMEM_MAX_TIMESTEPS": "200",
    "PROTOMEM_MAX_LAYERS": "4",
    "PROTOMEM_MAX_EVALUATIONS": "50",
    "PROTOMEM_MAX_PARAMETERS": "200000",
    "PROTOMEM_MAX_SWEEP_POINTS": "40",
    "PROTOMEM_MAX_VOCAB": "4096",
    "PROTOMEM_MAX_STRING_TOKENS": "1024",
}
TINY_TRAIN = ["--steps", "2", "--width", "8", "--batch-size", "4", "--threads", "1", "--quiet"]
RUN_TRAIN = ["--steps", "6", *TINY_TRAIN[2:]]  # the finished run the checkpoint cases tamper with
TALLIES: dict[str, Tally] = {}


def fuzz_settings(examples: int):
    return settings(
        max_examples=examples,
        deadline=None,
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.function_scoped_fixture,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """Valid inputs of every kind, and a finished tiny run, written once."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("assets")
    grammar = ["--vocab", "4", "--classes", "2", "--rules", "2", "--depth", "2"]
    result = invoke(
        "grammar", "sample", "--out", root / "g", *grammar, "--count", "12", "--distinct", "--format", "jsonl"
    )
    assert result.code == 0, result.stderr
    from protomem.io import read_strings, write_strings

    table = read_strings(root / "g" / "strings.jsonl")
    write_strings(root / "strings.parquet", table.tokens, table.classes, table.logprobs)
    write_strings(root / "strings.txt", table.tokens)
    data = ["--data", root / "g" / "strings.jsonl", "--grammar", root / "g" / "grammar.json"]
    result = invoke("train", *data, "--out", root / "run", *RUN_TRAIN)
    assert result.code == 0, result.stderr
    config = {
        "process": "uniform",
        "timesteps": 20,
        "eval_samples": 0,
        "n_evals": 2,
        "warmup_steps": 0,
        "lr_schedule": "cosine",
        "ema_decay": 0.9,
        "seed": 3,
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    (root / "sweep.yaml").write_text((REPO / "examples" / "sweeps" / "tiny.yaml").read_text())
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 8, 8), dtype=np.uint8)
    np.save(root / "train.npy", images)
    np.save(root / "generated.npy", np.concatenate([images[:3], rng.integers(0, 256, (3, 8, 8), np.uint8)]))
    words = ["the cat sat on the mat", "a dog ran in the park today", "it rained all day long here"]
    (root / "train.txt").write_text("\n".join(words * 2) + "\n")
    (root / "generated.txt").write_text(words[0] + "\nsomething else entirely new\n")
    return root


@pytest.fixture(autouse=True)
def small_limits(monkeypatch):
    for name, value in LIMITS.items():
        monkeypatch.setenv(name, value)


def tally(name: str) -> Tally:
    return TALLIES.setdefault(name, Tally())


def _write_yaml_or_json(path: Path, doc: object) -> None:
    path.write_text(dumps(doc) + "\n")  # JSON is YAML; Raw values splice in what YAML parses oddly


# ------------------------------------------------------------------------------------- the properties


@st.composite
def mutation(draw: st.DrawFn, path: Path, structured: bool, text: bool = True) -> tuple[bytes, bool]:
    """New bytes for the file at ``path`` (a valid input) and whether they are certainly invalid."""
    data = path.read_bytes()
    if structured and draw(st.integers(0, 9)) < 7:
        doc = json.loads(data) if path.suffix == ".json" else yaml.safe_load(data)
        new, certain = draw(mutated_document(doc))
        return dumps(new).encode("utf-8", "surrogatepass"), certain
    return draw(mutated_bytes(data, text))


def check_grammar_file(assets: Path, data, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        grammar = fresh_copy(assets / "g" / "grammar.json", root / "grammar.json")
        strings = fresh_copy(assets / "g" / "strings.jsonl", root / "strings.jsonl")
        content, certain = data.draw(mutation(grammar, structured=True))
        grammar.write_bytes(content)
        if data.draw(st.booleans()):
            out = root / "out.jsonl"
            args = ["grammar", "check", "--grammar", grammar, "--strings", strings, "--out", out]
        else:
            out = root / "run"
            args = ["train", "--data", strings, "--grammar", grammar, "--out", out, *TINY_TRAIN]
        run_case(root, args, [grammar, strings], out, certain, tally(name))


@st.composite
def parquet_tokens(draw: st.DrawFn) -> pa.Table:
    """A strings table whose columns may have the wrong types or values."""
    rows = draw(st.integers(0, 4))
    kind = draw(
        st.sampled_from(["ints", "floats", "strings", "nulls", "timestamps", "uint64", "ragged", "bad_class"])
    )
    good = [[0, 1, 2, 3]] * rows
    columns = {
        "ints": pa.array(good, pa.list_(pa.int64())),
        "floats": pa.array([[0.0, 1.5, 2.0, 3.0]] * rows, pa.list_(pa.float64())),
        "strings": pa.array([["0", "1", "2", "3"]] * rows, pa.list_(pa.string())),
        "nulls": pa.array([[None] * 4] * rows, pa.list_(pa.null())),
        "timestamps": pa.array([[0, 1, 2, 3]] * rows, pa.list_(pa.timestamp("s"))),
        "uint64": pa.array([[0, 1, 2, 2**64 - 1]] * rows, pa.list_(pa.uint64())),
        "ragged": pa.array([[0, 1], [0, 1, 2, 3]][:rows], pa.list_(pa.int64())),
        "bad_class": pa.array(good, pa.list_(pa.int64())),
    }
    table = pa.table({"tokens": columns[kind]})
    if kind == "bad_class":
        table = table.append_column("class", pa.array([draw(st.sampled_from(["a", "1.5", ""]))] * rows))
    return table


def is_token(word: str) -> bool:
    """Whether the readers take ``word`` as one token: what int() reads ('-0', '+1', '1_0' included)."""
    try:
        return 0 <= int(word) < 2**63
    except ValueError:  # not a number, or more than int()'s 4,300 digits
        return False


def check_strings_file(assets: Path, data, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        grammar = fresh_copy(assets / "g" / "grammar.json", root / "grammar.json")
        fmt = data.draw(st.sampled_from(["jsonl", "txt", "parquet"]))
        source = assets / "g" / "strings.jsonl" if fmt == "jsonl" else assets / f"strings.{fmt}"
        strings = fresh_copy(source, root / f"strings.{fmt}")
        certain = False
        if fmt == "parquet" and data.draw(st.booleans()):
            pq.write_table(data.draw(parquet_tokens()), strings)
        elif fmt == "jsonl" and data.draw(st.booleans()):
            lines = strings.read_text().splitlines()
            index = data.draw(st.integers(0, len(lines) - 1))
            new, certain = data.draw(mutated_document(json.loads(lines[index])))
            lines[index] = dumps(new).replace("\n", " ")
            strings.write_text("\n".join(lines) + "\n")
        elif fmt == "txt" and data.draw(st.booleans()):
            lines = strings.read_text().splitlines()
            index = data.draw(st.integers(0, len(lines) - 1))
            value = data.draw(nasty_scalars)
            word = value.text if isinstance(value, Raw) else str(value)
            lines[index] += " " + word
            strings.write_text("\n".join(lines) + "\n")
            # one token more than the others (refused where strings must share a length), or not a token
            certain = "ragged" if word.strip() else False
        else:
            content, certain = data.draw(mutated_bytes(strings.read_bytes(), text=fmt != "parquet"))
            strings.write_bytes(content)
        command = data.draw(st.sampled_from(["check", "train", "audit"]))
        if certain == "ragged":
            certain = command != "audit" or not is_token(word)  # ragged outputs are fine to audit
        if command == "check":
            out = root / "out.jsonl"
            args = ["grammar", "check", "--grammar", grammar, "--strings", strings, "--out", out]
        elif command == "train":
            out = root / "run"
            args = ["train", "--data", strings, "--out", out, *TINY_TRAIN]
        else:
            out = root / "audit"
            other = fresh_copy(assets / "g" / "strings.jsonl", root / "other.jsonl")
            args = [
                "audit",
                "--train",
                other,
                "--generated",
                strings,
                "--out",
                out,
                "--quiet",
                "--modality",
                "sequences",
                "--span-tokens",
                "2",
            ]
        run_case(root, args, [grammar, strings, *(root.glob("other.*"))], out, certain, tally(name))


def check_config_file(assets: Path, data, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        strings = fresh_copy(assets / "g" / "strings.jsonl", root / "strings.jsonl")
        config = fresh_copy(assets / "config.yaml", root / "config.yaml")
        special = data.draw(st.integers(0, 9))
        certain = False
        if special == 0:  # a YAML alias bomb: 10^9 values in a few hundred bytes
            lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
            lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
            config.write_text("\n".join(lines) + "\n")
            certain = True
        elif special == 1:  # values JSON cannot hold
            value = data.draw(
                st.sampled_from(["2001-01-01", "!!binary aGk=", "!!set {a, b}", "!!python/tuple [1]"])
            )
            config.write_text(f"lr: {value}\n")
            certain = True
        else:
            content, certain = data.draw(mutation(config, structured=True))
            config.write_bytes(content)
        out = root / "run"
        args = [
            "train",
            "--data",
            strings,
            "--grammar",
            fresh_copy(assets / "g" / "grammar.json", root / "g.json"),
            "--config",
            config,
            "--out",
            out,
            *TINY_TRAIN,
        ]
        run_case(root, args, [config, strings, root / "g.json"], out, certain, tally(name))


def check_sweep_file(assets: Path, data, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sweep = fresh_copy(assets / "sweep.yaml", root / "sweep.yaml")
        content, certain = data.draw(mutation(sweep, structured=True))
        sweep.write_bytes(content)
        args = ["sweep", sweep, "--dry-run", "--out", root / "sweep-out"]
        result = run_case(root, args, [sweep], None, certain, tally(name))
        assert not (root / "sweep-out").exists(), result.stderr


def check_audit_inputs(assets: Path, data, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        modality = data.draw(st.sampled_from(["images", "text"]))
        suffix = ".npy" if modality == "images" else ".txt"
        train = fresh_copy(assets / f"train{suffix}", root / f"train{suffix}")
        generated = fresh_copy(assets / f"generated{suffix}", root / f"generated{suffix}")
        target = data.draw(st.sampled_from([train, generated]))
        certain = False
        if modality == "images" and data.draw(st.booleans()):
            shape = data.draw(st.sampled_from([(0, 8, 8), (3, 8), (2, 8, 8, 2), (2, 0, 8), (2, 8, 8, 3)]))
            dtype = data.draw(st.sampled_from(["uint8", "float32", "float64", "int64", "bool", "complex64"]))
            array = np.zeros(shape, dtype=dtype)
            if dtype.startswith("float") and array.size:
                array.flat[0] = data.draw(st.sampled_from([np.nan, np.inf, -3.0, 0.5]))
            np.save(target, array)
        else:
            content, certain = data.draw(mutated_bytes(target.read_bytes(), text=modality == "text"))
            target.write_bytes(content)
        out = root / "audit"
        args = [
            "audit",
            "--train",
            train,
            "--generated",
            generated,
            "--out",
            out,
            "--quiet",
            "--modality",
            modality,
        ]
        if modality == "text":
            args += ["--span-tokens", "3"]
        run_case(root, args, [train, generated], out, certain, tally(name))


def _rehash(directory: Path, name: str) -> None:
    import hashlib

    state = json.loads((directory / "state.json").read_text())
    state["files"][name] = hashlib.sha256((directory / name).read_bytes()).hexdigest()
    (directory / "state.json").write_text(json.dumps(state))


def check_checkpoint(assets: Path, data, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = fresh_copy(assets / "run", root / "run")
        step = json.loads((run / "checkpoints" / "latest.json").read_text())["step"]
        directory = run / "checkpoints" / f"step_{step:08d}"
        target = data.draw(
            st.sampled_from(
                [
                    "latest.json",
                    "state.json",
                    "model.safetensors",
                    "optimizer.safetensors",
                    "metrics.parquet",
                    "link",
                ]
            )
        )
        if target == "latest.json":
            content, _ = data.draw(mutation(run / "checkpoints" / "latest.json", structured=True))
            (run / "checkpoints" / "latest.json").write_bytes(content)
        elif target == "state.json":
            content, _ = data.draw(mutation(directory / "state.json", structured=True))
            (directory / "state.json").write_bytes(content)
        elif target == "metrics.parquet":
            content, _ = data.draw(mutated_bytes((run / "metrics.parquet").read_bytes(), text=False))
            (run / "metrics.parquet").write_bytes(content)
        elif target == "link":  # a checkpoint file or folder replaced by a link out of the run
            outside = fresh_copy(assets / "run", root / "elsewhere")
            victim = data.draw(
                st.sampled_from([directory / "model.safetensors", directory, run / "checkpoints"])
            )
            import shutil

            relative = victim.relative_to(run)
            shutil.rmtree(victim) if victim.is_dir() else victim.unlink()
            victim.symlink_to(outside / relative, target_is_directory=(outside / relative).is_dir())
        else:
            content, _ = data.draw(mutated_bytes((directory / target).read_bytes(), text=False))
            (directory / target).write_bytes(content)
            if data.draw(st.booleans()):
                _rehash(directory, target)  # vouched for: only the content checks can catch it
        if data.draw(st.booleans()):
            out = root / "samples.jsonl"
            args = ["sample", "--run", run, "--out", out, "--count", "2"]
            may_change: tuple[Path, ...] = ()
        else:
            out = None
            args = [
                "train",
                "--data",
                assets / "g" / "strings.jsonl",
                "--grammar",
                assets / "g" / "grammar.json",
                "--out",
                run,
                "--resume",
                *RUN_TRAIN,
            ]
            may_change = (run,)  # a resume that is accepted writes into the run it continues
        inputs = [run, *(root.glob("elsewhere"))]
        run_case(root, args, inputs, out, False, tally(name), may_change=_expand(may_change))


def _expand(paths: tuple[Path, ...]) -> tuple[Path, ...]:
    out: list[Path] = []
    for path in paths:
        out.append(path)
        out += list(path.rglob("*")) if path.is_dir() else []
    return tuple(out)


def _study_record() -> dict:
    from protomem.study.presets import get_preset
    from protomem.study.runner import STUDY_FORMAT

    return {
        "format": STUDY_FORMAT,
        "preset": "quick",
        "conditions": [c.name for c in get_preset("quick").conditions],
        "threads": 1,
        "jobs": 1,
        "status": "running",
    }


def check_study_record(assets: Path, data, name: str) -> None:
    """study --resume on a record protomem did not write: always refused (never a study started)."""
    from protomem.study.presets import PRESETS

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        study = root / "study"
        study.mkdir()
        record = _study_record()
        if data.draw(st.booleans()):
            field = data.draw(st.sampled_from(["", "format", "preset", "conditions", "threads", "jobs"]))
            value = data.draw(nasty_scalars | st.lists(st.text(max_size=8), max_size=3))
            valid = {
                "": isinstance(value, dict),
                "format": value == record["format"],
                "preset": value in PRESETS,
                "conditions": value == record["conditions"],
                "threads": value is None or (type(value) is int and value >= 1),
                "jobs": value is None or (type(value) is int and value >= 1),
            }[field]
            if valid:
                value = Raw("[[[")
            doc = value if not field else {**record, field: value}
            (study / "study.json").write_text(dumps(doc))
        else:
            content = json.dumps(record).encode()
            where = data.draw(st.integers(0, len(content) - 2))
            junk = data.draw(st.sampled_from([b"\xff", b"\x80", b"\xc3(", b""]))
            (study / "study.json").write_bytes(content[:where] + junk)
        run_case(root, ["study", "--resume", study], [study], None, True, tally(name))


TINY_CONDITION = {
    "data.n_train": 16,
    "diffusion.steps": 40,
    "diffusion.threads": 1,
    "diffusion.sampling_steps": 8,
    "diffusion.width": 16,
    "evaluation.eval_steps": [20, 40],
    "evaluation.n_samples": 32,
    "evaluation.finer_sampling_steps": 8,
    "analysis.n_null_draws": 10,
    "analysis.n_bootstrap": 10,
    "analysis.n_permutations": 10,
    "analysis.calibration_samples": 100,
}


@pytest.fixture(scope="module")
def condition_run(tmp_path_factory) -> Path:
    """A finished tiny study condition (for ``protomem report``)."""
    from protomem.study.config import apply_overrides
    from protomem.study.pipeline import run_condition
    from protomem.study.presets import get_preset

    out = tmp_path_factory.mktemp("condition") / "tiny"
    run_condition(apply_overrides(get_preset("quick").conditions[0], TINY_CONDITION), out, progress=False)
    return out


def check_report_folder(condition: Path, data, name: str) -> None:
    """protomem report on a damaged condition folder: one line, or the report rebuilt (nothing else)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = fresh_copy(condition, root / "run")
        (run / "report.html").unlink()
        tables = sorted(p.name for p in run.glob("*.parquet"))
        target = run / data.draw(st.sampled_from(["summary.json", "grammar.json", *tables]))
        if target.suffix == ".json":
            content, _ = data.draw(mutation(target, structured=True))
        else:
            content, _ = data.draw(mutated_bytes(target.read_bytes(), text=False))
        target.write_bytes(content)
        run_case(root, ["report", run], [run], run / "report.html", False, tally(name))


# ------------------------------------------------------------------------------------- fast and long

FAMILIES = {
    "grammar files": check_grammar_file,
    "string files": check_strings_file,
    "training configs": check_config_file,
    "sweep files": check_sweep_file,
    "audit inputs": check_audit_inputs,
    "checkpoints": check_checkpoint,
    "study records": check_study_record,
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fuzz(assets, family):
    @fuzz_settings(FAST_EXAMPLES)
    @given(data=st.data())
    def run(data):
        FAMILIES[family](assets, data, family)

    run()


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fuzz_long(assets, family):
    start = tally(family).cases

    @fuzz_settings(LONG_EXAMPLES)
    @given(data=st.data())
    def run(data):
        FAMILIES[family](assets, data, family)

    run()
    done = tally(family)
    print(f"\nfuzz {family}: {done.cases - start} cases, {dict(done.outcomes)}")
    assert done.cases - start >= LONG_EXAMPLES * 0.9  # hypothesis ran (nearly) every case asked for


@pytest.mark.slow
def test_fuzz_report_on_damaged_run_folders(condition_run):
    examples = max(LONG_EXAMPLES // 4, 10)  # a rebuilt report takes seconds: fewer cases
    start = tally("report folders").cases

    @fuzz_settings(examples)
    @given(data=st.data())
    def run(data):
        check_report_folder(condition_run, data, "report folders")

    run()
    done = tally("report folders")
    print(f"\nfuzz report folders: {done.cases - start} cases, {dict(done.outcomes)}")
    assert done.cases - start >= examples * 0.9
