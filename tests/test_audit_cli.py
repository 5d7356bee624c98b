"""``protomem audit`` end to end: input detection, one-line errors naming the file, outputs, the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from protomem.audit.core import AuditConfig
from protomem.audit.inputs import (
    batches,
    count_documents,
    count_sequences,
    detect_modality,
    open_images,
    read_documents,
    read_sequences,
)
from protomem.audit.run import run_audit
from protomem.errors import ProtomemError
from tests.browser import chromium_path, render_report, require_chromium

PROTOMEM = [sys.executable, "-c", "from protomem.cli import main; main()"]


def digits(count: int, offset: int = 0) -> np.ndarray:
    from sklearn.datasets import load_digits

    return (load_digits().images[offset : offset + count] * 255 / 16).astype(np.uint8)


def write_pngs(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    return folder


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*PROTOMEM, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_detects_each_modality(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", digits(4))
    (tmp_path / "tokens.txt").write_text("1 2 3\n4 5 6\n")
    (tmp_path / "docs.txt").write_text("the cat sat\non the mat\n")
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    pd.DataFrame({"tokens": [[1, 2], [3, 4, 5]]}).to_parquet(tmp_path / "s.parquet")
    write_pngs(tmp_path / "pngs", digits(3))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("some text")
    expected = {
        "a.npy": "images",
        "tokens.txt": "sequences",
        "docs.txt": "text",
        "t.jsonl": "text",
        "s.parquet": "sequences",
        "pngs": "images",
        "docs": "text",
    }
    for name, kind in expected.items():
        assert detect_modality(tmp_path / name) == kind, name


def test_mixed_grey_and_colour_and_resize(tmp_path: Path) -> None:
    folder = write_pngs(tmp_path / "imgs", digits(3))
    Image.fromarray(np.stack([digits(1, 5)[0]] * 3, axis=-1)).save(folder / "colour.png")
    source = open_images(folder)
    source.conform(None, resize=False)
    assert source.shape == (8, 8, 3)
    batch = next(source.batches(10))[1]
    assert batch.shape == (4, 8, 8, 3)
    np.testing.assert_allclose(batch[0, ..., 0], batch[0, ..., 2])  # grey promoted to RGB
    Image.fromarray(np.zeros((16, 12), dtype=np.uint8)).save(folder / "big.png")
    with pytest.raises(ProtomemError, match="pass --resize") as info:
        open_images(folder).conform(None, resize=False)
    assert "big.png" in str(info.value)
    resized = open_images(folder)
    resized.conform(None, resize=True)
    assert next(resized.batches(10))[1].shape[1:3] == (8, 8)


@pytest.mark.parametrize(
    "case, message",
    [
        ("unreadable", "unreadable image"),
        ("empty", "empty folder"),
        ("mismatch", "mismatched modalities"),
        ("sizes", "pass --resize"),
    ],
)
def test_bad_input_is_one_line_naming_the_file(tmp_path: Path, case: str, message: str) -> None:
    train = write_pngs(tmp_path / "train", digits(20))
    generated = tmp_path / "gen"
    if case == "unreadable":
        write_pngs(generated, digits(2))
        (generated / "broken.png").write_bytes(b"not a png at all")
        culprit = "broken.png"
    elif case == "empty":
        generated.mkdir()
        culprit = "gen"
    elif case == "mismatch":
        generated = tmp_path / "gen.txt"
        generated.write_text("a document\n")
        culprit = "gen.txt"
    else:
        generated.mkdir()
        Image.fromarray(np.zeros((12, 12), dtype=np.uint8)).save(generated / "wide.png")
        culprit = "gen"
    result = run_cli(
        "audit", "--train", train, "--generated", generated, "--out", tmp_path / "out", "--quiet"
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert message in lines[0] and culprit in lines[0]
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    (tmp_path / "t.txt").write_text("a b c\n")
    with pytest.raises(ProtomemError, match="--overwrite"):
        run_audit(tmp_path / "t.txt", tmp_path / "t.txt", tmp_path / "out", AuditConfig(), progress=False)
    assert (tmp_path / "out" / "keep").exists()


def test_image_audit_cli_writes_tables_and_a_report_that_renders(tmp_path: Path) -> None:
    train = digits(200)
    np.save(tmp_path / "train.npy", train)
    copied = train[[3, 17, 42]]
    fresh = digits(5, offset=1000)
    generated = write_pngs(tmp_path / "gen", np.concatenate([copied, fresh]))
    out = tmp_path / "audit"
    result = run_cli(
        "audit", "--train", tmp_path / "train.npy", "--generated", generated, "--out", out, "--quiet"
    )
    assert result.returncode == 0, result.stderr
    matches = pd.read_parquet(out / "matches.parquet")
    assert matches["exact"].tolist() == [True] * 3 + [False] * 5
    assert matches["train_index"].tolist()[:3] == [3, 17, 42]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_copied_outputs"] == int(matches["copied"].sum()) >= 3
    assert summary["counts"]["exact"] == 3
    per_train = pd.read_parquet(out / "per_train.parquet")
    assert per_train["copies"].sum() == summary["n_copied_outputs"]
    require_chromium()
    page = render_report(out / "report.html", tmp_path / "shot.png")
    assert page["images"] >= 2 * 3 + 2  # three pairs drawn side by side, plus the figures
    assert page["images_loaded"] == page["images"]
    assert "Counts per criterion" in page["text"] and "tiled" in page["text"]


def test_text_audit_report_highlights_the_span(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    docs = [" ".join(f"w{x}" for x in rng.integers(0, 5000, 120)) for _ in range(50)]
    (tmp_path / "train.txt").write_text("\n".join(docs) + "\n")
    planted = " ".join(["fresh"] * 10 + docs[9].split()[:60])
    generated = ["nothing to see here"] * 7
    generated[5] = planted  # in the third batch of two: read back from the file for the report
    (tmp_path / "gen.txt").write_text("\n".join(generated) + "\n")
    out, result = run_audit(
        tmp_path / "train.txt",
        tmp_path / "gen.txt",
        tmp_path / "out",
        AuditConfig(span_tokens=50, batch_size=2),
        progress=False,
    )
    assert result.matches["longest_span"].tolist() == [0] * 5 + [60, 0]
    html = (out / "report.html").read_text()
    assert "<b>output 5:</b> " + "fresh " * 10 + "<mark>" + " ".join(docs[9].split()[:60]) + "</mark>" in html
    if chromium_path() is not None:  # fits a laptop and a phone screen (render_report checks)
        render_report(out / "report.html", tmp_path / "text.png")


def test_sequence_audit_report_draws_streamed_outputs_of_any_length(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    train = rng.integers(0, 40, size=(30, 24))
    (tmp_path / "train.txt").write_text("".join(" ".join(map(str, row)) + "\n" for row in train))
    generated = [list(rng.integers(0, 40, size=24)) for _ in range(9)]
    generated[4] = [99, 98] + list(train[6])  # longer than the training sequences: span, no Hamming
    generated[7] = list(train[2])
    (tmp_path / "gen.jsonl").write_text(
        "".join(json.dumps({"tokens": [int(t) for t in g]}) + "\n" for g in generated)
    )
    out, result = run_audit(
        tmp_path / "train.txt",
        tmp_path / "gen.jsonl",
        tmp_path / "out",
        AuditConfig(span_tokens=10, batch_size=2),
        progress=False,
    )
    m = result.matches
    assert m["train_index"][[4, 7]].tolist() == [6, 2] and m["exact"][7] and np.isnan(m["d1"][4])
    html = (out / "report.html").read_text()
    assert "<b>output 4:</b> 99 98 <mark>" + " ".join(map(str, train[6])) + "</mark>" in html
    assert "<b>output 7:</b> <mark>" + " ".join(map(str, train[2])) + "</mark>" in html
    if chromium_path() is not None:
        render_report(out / "report.html", tmp_path / "sequences.png")


def write_with_bad_line(path: Path, good: str | bytes, bad: str | bytes, bad_line: int, count: int) -> None:
    """``count`` lines of ``good`` (line 10 blank), the line numbered ``bad_line`` (1-based) ``bad``."""
    lines = [good] * count
    lines[9] = b"" if isinstance(good, bytes) else ""
    lines[bad_line - 1] = bad
    if isinstance(good, bytes):
        path.write_bytes(b"\n".join(lines) + b"\n")
    else:
        path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "name, message",
    [
        ("tokens.jsonl", "tokens must be integers"),
        ("tokens.txt", "tokens must be integers"),
        ("tokens.parquet", "negative token"),
        ("docs.jsonl", "expected an object with a 'text' string"),
        ("docs.txt", "not UTF-8 text"),
    ],
)
def test_a_bad_output_far_down_a_streamed_file_is_named(tmp_path: Path, name: str, message: str) -> None:
    bad_line, count = 2500, 3000  # past the first two batches of 1,024
    generated = tmp_path / name
    if name == "tokens.parquet":
        tokens = [[1, 2, 3, 4]] * count
        tokens[bad_line - 1] = [1, -2, 3, 4]
        pd.DataFrame({"tokens": tokens}).to_parquet(generated)
        where = f"row {bad_line}"
    else:
        good, bad = {
            "tokens.jsonl": ('{"tokens": [1, 2, 3, 4]}', '{"tokens": [1, "x", 3, 4]}'),
            "tokens.txt": ("1 2 3 4", "1 2 x 4"),
            "docs.jsonl": ('{"text": "a b c d"}', '{"text": 5}'),
            "docs.txt": (b"a b c d", b"a b \xff d"),
        }[name]
        write_with_bad_line(generated, good, bad, bad_line, count)
        where = f"line {bad_line}"
    train = tmp_path / ("train.txt" if name.startswith("docs") else "train.tokens")
    train.write_text("a b c d\ne f g h\n" if name.startswith("docs") else "1 2 3 4\n5 6 7 8\n")
    result = run_cli(
        "audit", "--train", train, "--generated", generated, "--out", tmp_path / "out", "--quiet"
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert name in lines[0] and f"({where})" in lines[0] and message in lines[0]
    assert not (tmp_path / "out").exists()


def test_streaming_readers_and_their_counts_agree(tmp_path: Path) -> None:
    (tmp_path / "s.txt").write_text("1 2 3\n\n4 5\r\n  \n6\n")
    (tmp_path / "s.jsonl").write_text('{"tokens": [1, 2]}\n\n{"tokens": [3]}\n')
    pd.DataFrame({"tokens": [[1, 2], [3, 4, 5], [6]]}).to_parquet(tmp_path / "s.parquet")
    for name, expected in (
        ("s.txt", [[1, 2, 3], [4, 5], [6]]),
        ("s.jsonl", [[1, 2], [3]]),
        ("s.parquet", None),
    ):
        sequences = read_sequences(tmp_path / name)
        assert count_sequences(tmp_path / name) == len(sequences)
        if expected is not None:
            assert [s.tolist() for s in sequences] == expected
    (tmp_path / "d.txt").write_text("first doc\n\n  second doc \r\nthird\n")
    (tmp_path / "docs").mkdir()
    for i in range(3):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"document {i}\nwith two lines")
    (tmp_path / "docs" / "notes.md").write_text("not a document")
    pd.DataFrame({"text": ["a", None, "b c"]}).to_parquet(tmp_path / "d.parquet")
    expected = {
        "d.txt": ["first doc", "  second doc ", "third"],
        "docs": [f"document {i}\nwith two lines" for i in range(3)],
        "d.parquet": ["a", "", "b c"],
    }
    for name, documents in expected.items():
        assert read_documents(tmp_path / name) == documents
        assert count_documents(tmp_path / name) == len(documents)
    assert [start for start, _ in batches(iter(range(7)), 3)] == [0, 3, 6]
    assert [batch for _, batch in batches(range(7), 3)][-1] == [6]
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(ProtomemError, match="no documents"):
        read_documents(tmp_path / "blank.txt")


def test_float_arrays_are_scaled_once_for_the_whole_file(tmp_path: Path) -> None:
    signed = np.zeros((4, 8, 8), dtype=np.float32)
    signed[0] = -1.0  # only the first image is negative: every batch must still map [-1, 1] -> [0, 1]
    signed[1:] = 0.5
    np.save(tmp_path / "signed.npy", signed)
    source = open_images(tmp_path / "signed.npy")
    source.conform(None, resize=False)
    batches = [batch for _, batch in source.batches(2)]
    assert batches[0][0].max() == 0.0 and batches[1][0].min() == 0.75  # (0.5 + 1) / 2
    np.save(tmp_path / "bad.npy", np.full((2, 8, 8), 3.0, dtype=np.float32))
    with pytest.raises(ProtomemError, match=r"\[0, 1\] or \[-1, 1\]"):
        open_images(tmp_path / "bad.npy")


def test_modality_can_be_forced(tmp_path: Path) -> None:
    (tmp_path / "numbers.txt").write_text("1 2 3 4\n5 6 7 8\n")
    (tmp_path / "out_numbers.txt").write_text("1 2 3 4\n")
    config = AuditConfig(modality="text", span_tokens=2)
    _, result = run_audit(
        tmp_path / "numbers.txt", tmp_path / "out_numbers.txt", tmp_path / "o", config, progress=False
    )
    assert result.modality == "text" and result.matches["exact"].tolist() == [True]
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["modality"] == "text"


def test_crop_search_from_the_cli_names_the_window_in_the_report(tmp_path: Path) -> None:
    from tests.test_audit import crop_and_enlarge, smooth_images

    train = smooth_images(60, 32, seed=0)[..., 0]
    cropped = crop_and_enlarge(train[7:8, :, :, None], 4, 2, 24)[..., 0]
    np.save(tmp_path / "train.npy", train)
    np.save(tmp_path / "gen.npy", np.concatenate([cropped, smooth_images(2, 32, seed=3)[..., 0]]))
    out = tmp_path / "audit"
    args = ("audit", "--train", tmp_path / "train.npy", "--generated", tmp_path / "gen.npy", "--out", out)
    result = run_cli(*args, "--max-crop", "0.25", "--quiet")
    assert result.returncode == 0, result.stderr
    matches = pd.read_parquet(out / "matches.parquet")
    assert matches["cropped"].tolist() == [True, False, False] and matches["train_index"][0] == 7
    assert "crop 24×24 at (4, 2)" in (out / "report.html").read_text()
    bad = run_cli(*args, "--max-crop", "1.5", "--overwrite", "--quiet")
    assert bad.returncode == 2 and "max_crop" in bad.stderr and "Traceback" not in bad.stderr
