"""Audit inputs: every item traceable to its source, the same numbering for every format, and hostile files
refused in one line naming them (exit code 2) before anything large is decoded or allocated."""

from __future__ import annotations

import json
import struct
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from protomem.audit.core import AuditConfig
from protomem.audit.inputs import natural_key, open_images
from protomem.audit.run import run_audit
from protomem.errors import ProtomemError
from protomem.memorization.text import longest_common_run


def run_main(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: object
) -> tuple[int, str]:
    """``protomem ARGS`` in this process: (exit code, stderr)."""
    from protomem.cli import main

    monkeypatch.setattr(sys, "argv", ["protomem", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        main()
    return int(info.value.code or 0), capsys.readouterr().err


def digit_images(count: int, offset: int = 0) -> np.ndarray:
    from sklearn.datasets import load_digits

    return (load_digits().images[offset : offset + count] * 255 / 16).astype(np.uint8)


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header declares ``width`` x ``height`` grey pixels (its data is 10 bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 10))
        + chunk(b"IEND", b"")
    )
    return path


# ------------------------------------------------------------------------------------------ traceability


def test_natural_order_and_sources_in_both_tables(tmp_path: Path) -> None:
    assert sorted(["10.png", "2.png", "1.png", "b.png", "A.png"], key=natural_key) == [
        "1.png",
        "2.png",
        "10.png",
        "A.png",
        "b.png",
    ]
    train = digit_images(30)
    np.save(tmp_path / "train.npy", train)
    generated = tmp_path / "gen"
    generated.mkdir()
    for name, image in (("1.png", digit_images(1, 900)[0]), ("2.png", train[4]), ("10.png", train[7])):
        Image.fromarray(image).save(generated / name)
    out, result = run_audit(
        tmp_path / "train.npy", generated, tmp_path / "out", AuditConfig(), progress=False
    )
    matches = pd.read_parquet(out / "matches.parquet")
    assert matches["generated_source"].tolist() == ["1.png", "2.png", "10.png"]  # alphabetical: 1, 10, 2
    assert matches["exact"].tolist() == [False, True, True]
    assert matches["train_source"].fillna("-").tolist() == ["-", "index 4", "index 7"]  # null: no copy
    per_train = pd.read_parquet(out / "per_train.parquet")
    assert per_train["train_source"].tolist() == [f"index {i}" for i in range(30)]
    spaces = json.loads(pq.read_schema(out / "matches.parquet").metadata[b"protomem.spaces"])
    assert spaces["l2"] == "pixels" and spaces["exact"] == "8-bit pixels"


def test_text_numbering_is_the_same_for_txt_jsonl_and_folders(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train_docs = [" ".join(f"w{x}" for x in rng.integers(0, 900, 40)) for _ in range(20)] + [""]
    (tmp_path / "train.txt").write_text("\n".join(train_docs[:-1]) + "\n\n" + "x y\n")  # an empty document
    outputs = ["fresh words only", "", train_docs[3], "   ", " ".join(train_docs[5].split()[:30])]
    (tmp_path / "gen.txt").write_text("\n".join(outputs) + "\n\n\n")  # blank lines at the end: no items
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps({"text": doc}) + "\n" for doc in outputs))
    folder = tmp_path / "gen"
    folder.mkdir()
    for i, doc in enumerate(outputs):
        (folder / f"{i + 1}.txt").write_text(doc)
    config = AuditConfig(span_tokens=20)
    tables = {}
    for name in ("gen.txt", "gen.jsonl", "gen"):
        _, result = run_audit(
            tmp_path / "train.txt", tmp_path / name, tmp_path / f"out-{name}", config, progress=False
        )
        tables[name] = result.matches
    assert tables["gen.txt"]["generated_source"].tolist() == [f"line {i}" for i in range(1, 6)]
    assert tables["gen"]["generated_source"].tolist() == [f"{i}.txt" for i in range(1, 6)]
    flags = ["output", "exact", "span", "train_index", "longest_span"]
    for name in ("gen.jsonl", "gen"):
        pd.testing.assert_frame_equal(tables[name][flags], tables["gen.txt"][flags])
    m = tables["gen.txt"]
    assert m["exact"].tolist() == [False, False, True, False, False]  # empty outputs match nothing
    assert m["train_index"].tolist() == [-1, -1, 3, -1, 5]
    assert m["train_source"].fillna("-").tolist() == ["-", "-", "line 4", "-", "line 6"]


def test_npz_arrays_are_named_or_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "one.npz", digit_images(5))
    assert open_images(tmp_path / "one.npz").count == 5  # a single array needs no name
    np.savez(tmp_path / "two.npz", images=digit_images(6), labels=np.arange(6))
    with pytest.raises(
        ProtomemError, match=r"two.npz: holds 2 arrays \(images, labels\): name one, e.g. two.npz:"
    ):
        open_images(tmp_path / "two.npz")
    assert open_images(f"{tmp_path / 'two.npz'}:images").count == 6
    with pytest.raises(ProtomemError, match="has no array 'pixels'"):
        open_images(f"{tmp_path / 'two.npz'}:pixels")
    out, result = run_audit(
        f"{tmp_path / 'two.npz'}:images",
        tmp_path / "one.npz",
        tmp_path / "out",
        AuditConfig(),
        progress=False,
    )
    assert result.matches["exact"].all() and result.matches["train_source"].tolist() == [
        f"index {i}" for i in range(5)
    ]


# ------------------------------------------------------------------------------------------------ limits


def test_a_longest_common_run_of_two_200k_token_documents_stays_small() -> None:
    """Two 200,000-token lines asked for a 200,000 x 200,000 comparison matrix (37 GiB) before."""
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 50_000, 200_000), rng.integers(0, 50_000, 200_000)
    b[120_000:120_500] = a[3_000:3_500]
    tracemalloc.start()
    try:
        found = longest_common_run(a, b)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert found == (500, 3_000, 120_000)
    assert peak < 100 * 2**20


def hostile(tmp_path: Path, case: str) -> tuple[list[object], str, list[str]]:
    """Files for one hostile input: (arguments after ``audit``, the file to be named, words expected)."""
    images = digit_images(20)
    np.save(tmp_path / "train.npy", images)
    text_train = tmp_path / "train.txt"
    text_train.write_text("a b c d\ne f g h\n")
    token_train = tmp_path / "train.tokens"
    token_train.write_text("1 2 3 4\n5 6 7 8\n")
    if case == "png declaring 100000x100000":
        folder = tmp_path / "gen"
        folder.mkdir()
        Image.fromarray(images[0]).save(folder / "fine.png")
        png_declaring(folder / "bomb.png", 100_000, 100_000)
        return [tmp_path / "train.npy", folder], "bomb.png", ["100000x100000", "--max-image-pixels"]
    if case == "zero-byte npy":
        (tmp_path / "empty.npy").write_bytes(b"")
        return [tmp_path / "train.npy", tmp_path / "empty.npy"], "empty.npy", ["unreadable array file"]
    if case == "max-shift 16 on 8x8":
        np.save(tmp_path / "gen.npy", images[:3])
        args = [tmp_path / "train.npy", tmp_path / "gen.npy", "--max-shift", "16"]
        return args, "gen.npy", ["--max-shift 16", "8x8", "at most 2"]
    if case == "jsonl not utf-8":
        (tmp_path / "gen.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
        return [text_train, tmp_path / "gen.jsonl"], "gen.jsonl (line 2)", ["not UTF-8"]
    if case == "jsonl nested 100k deep":
        (tmp_path / "gen.jsonl").write_text('{"text": "fine"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
        return [text_train, tmp_path / "gen.jsonl"], "gen.jsonl (line 2)", ["nested too deeply"]
    if case == "token 2^64":
        (tmp_path / "gen.jsonl").write_text(
            '{"tokens": [1, 2, 3, 4]}\n{"tokens": [1, 18446744073709551616]}\n'
        )
        return [token_train, tmp_path / "gen.jsonl"], "gen.jsonl (line 2)", ["token too large"]
    parquet = {
        "tokens list<string>": ("tokens", pa.array([["1", "2"], ["3"]])),
        "tokens list<null>": ("tokens", pa.array([[None], [None]])),
        "tokens timestamps": ("tokens", pa.array(pd.to_datetime(["2020-01-01", "2021-01-01"]))),
        "tokens list<double> 1.5": ("tokens", pa.array([[1.5, 2.0], [3.0]])),
        "text int64": ("text", pa.array([1, 2])),
    }
    column, values = parquet[case]
    pq.write_table(pa.table({column: values}), tmp_path / "gen.parquet")
    train = token_train if column == "tokens" else text_train
    return [train, tmp_path / "gen.parquet"], "gen.parquet", [f"column '{column}' holds"]


@pytest.mark.parametrize(
    "case",
    [
        "png declaring 100000x100000",
        "zero-byte npy",
        "max-shift 16 on 8x8",
        "jsonl not utf-8",
        "jsonl nested 100k deep",
        "token 2^64",
        "tokens list<string>",
        "tokens list<null>",
        "tokens timestamps",
        "tokens list<double> 1.5",
        "text int64",
    ],
)
def test_hostile_audit_inputs_get_one_line_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, case: str
) -> None:
    (train, generated, *flags), culprit, words = hostile(tmp_path, case)
    out = tmp_path / "out"
    code, stderr = run_main(
        monkeypatch,
        capsys,
        "audit",
        "--train",
        train,
        "--generated",
        generated,
        "--out",
        out,
        "--quiet",
        *flags,
    )
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr
    assert culprit in lines[0] and all(word in lines[0] for word in words), lines[0]
    assert not out.exists()


def test_the_image_limit_can_be_raised_and_memory_is_checked_before_reading(tmp_path: Path) -> None:
    folder = tmp_path / "big"
    folder.mkdir()
    Image.fromarray(np.zeros((40, 50), dtype=np.uint8)).save(folder / "a.png")
    with pytest.raises(
        ProtomemError, match=r"a.png: image declares 50x40 pixels, more than the limit of 1,000"
    ):
        open_images(folder, max_pixels=1000)
    assert open_images(folder, max_pixels=2000).count == 1
    source = open_images(folder)
    source.conform(None, resize=False)
    source.count = 10**9  # as if the folder held a billion such images
    with pytest.raises(
        ProtomemError, match=r"big: 1,000,000,000 training images of \(40, 50, 1\) need .* GiB"
    ):
        source.require_memory(5, "training images")
