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
from protomem.audit.inputs import detect_modality, open_images
from protomem.audit.run import run_audit
from protomem.errors import ProtomemError
from tests.browser import render_report, require_chromium

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
    (tmp_path / "gen.txt").write_text(planted + "\nnothing to see here\n")
    out, result = run_audit(
        tmp_path / "train.txt",
        tmp_path / "gen.txt",
        tmp_path / "out",
        AuditConfig(span_tokens=50),
        progress=False,
    )
    assert result.matches["longest_span"].tolist() == [60, 0]
    html = (out / "report.html").read_text()
    assert "<mark>" + " ".join(docs[9].split()[:60]) + "</mark>" in html


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
