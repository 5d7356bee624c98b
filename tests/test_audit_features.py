"""Copies in embedding space: precomputed feature vectors and a TorchScript embedder the test builds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from protomem.audit.core import AuditConfig, audit_images
from protomem.audit.features import Embedder, embedder_space
from protomem.audit.run import run_audit
from tests.test_audit_inputs import digit_images, run_main

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


class TinyEmbedder(torch.nn.Module):
    """A small fixed convolutional network: (B, 3, H, W) -> (B, 16)."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Linear(8 * 4 * 4, 16)
        for parameter in self.parameters():
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 4)
        return self.head(pooled.flatten(1))


class Flat(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3))  # (B,): not a batch of vectors


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    torch.jit.script(TinyEmbedder()).save(str(path))
    return path


def feature_data(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    """Training features (60 x 128), outputs' features: a near copy of item 3, item 10 scaled, 4 fresh."""
    rng = np.random.default_rng(0)
    train = rng.normal(size=(60, 128)).astype(np.float32)
    generated = np.concatenate(
        [train[3:4] + 0.05 * rng.normal(size=(1, 128)), 7 * train[10:11], rng.normal(size=(4, 128))]
    ).astype(np.float32)
    np.save(tmp_path / "ftrain.npy", train)
    np.save(tmp_path / "fgen.npy", generated)
    return tmp_path / "ftrain.npy", tmp_path / "fgen.npy", generated


def test_precomputed_features_flag_semantic_copies_pixels_miss(tmp_path: Path) -> None:
    ftrain, fgen, _ = feature_data(tmp_path)
    np.save(tmp_path / "train.npy", digit_images(60))
    np.save(tmp_path / "gen.npy", digit_images(6, offset=900))  # pixels: nothing in common
    out, result = run_audit(
        tmp_path / "train.npy",
        tmp_path / "gen.npy",
        tmp_path / "out",
        AuditConfig(),
        features_train=ftrain,
        features_generated=fgen,
        progress=False,
    )
    m = result.matches
    assert m["similar"].tolist() == [True, True, False, False, False, False]
    assert m["feature_ratio"][:2].all() and not m[["l2", "ratio", "tiled"]].any().any()
    assert m["train_index"][:2].tolist() == [3, 10] and m["train_source"][:2].tolist() == [
        "index 3",
        "index 10",
    ]
    assert m["feature_similarity"][1] == pytest.approx(1.0, abs=1e-5)  # a scaled vector: cosine 1
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["spaces"]["similar"] == "features ftrain.npy / fgen.npy"
        and summary["spaces"]["l2"] == "pixels"
    )
    assert "features ftrain.npy / fgen.npy" in (out / "report.html").read_text()


def test_features_apply_to_text_too(tmp_path: Path) -> None:
    ftrain, fgen, _ = feature_data(tmp_path)
    (tmp_path / "train.txt").write_text("".join(f"training document {i}\n" for i in range(60)))
    (tmp_path / "gen.txt").write_text("".join(f"an output {i}\n" for i in range(6)))
    _, result = run_audit(
        tmp_path / "train.txt",
        tmp_path / "gen.txt",
        tmp_path / "out",
        AuditConfig(span_tokens=3),
        features_train=ftrain,
        features_generated=fgen,
        progress=False,
    )
    assert result.matches["similar"].tolist() == [True, True, False, False, False, False]
    assert result.matches["train_source"][:2].tolist() == ["line 4", "line 11"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("rows", "fgen.npy: has 5 rows but there are 6 outputs"),
        ("nan", "fgen.npy (row 4): feature vector has NaN or infinity"),
        ("zero", "ftrain.npy (row 2): feature vector is all zeros"),
        ("width", "fgen.npy: feature vectors have 8 dimensions, the training features 128"),
        ("one-d", "fgen.npy: feature array must be 2-D"),
        ("alone", "--features-train and --features-generated go together"),
    ],
)
def test_bad_feature_files_are_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, case: str, message: str
) -> None:
    ftrain, fgen, generated = feature_data(tmp_path)
    if case == "rows":
        np.save(fgen, generated[:5])
    elif case == "nan":
        generated[4, 7] = np.nan
        np.save(fgen, generated)
    elif case == "zero":
        train = np.load(ftrain)
        train[2] = 0
        np.save(ftrain, train)
    elif case == "width":
        np.save(fgen, generated[:, :8])
    elif case == "one-d":
        np.save(fgen, generated[:, 0])
    np.save(tmp_path / "train.npy", digit_images(60))
    np.save(tmp_path / "gen.npy", digit_images(6, offset=900))
    features = ["--features-train", ftrain] + ([] if case == "alone" else ["--features-generated", fgen])
    args = [
        "audit",
        "--train",
        tmp_path / "train.npy",
        "--generated",
        tmp_path / "gen.npy",
        "--out",
        tmp_path / "o",
    ]
    code, stderr = run_main(monkeypatch, capsys, *args, *features, "--quiet")
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and message in stderr, stderr
    assert not (tmp_path / "o").exists()


def test_a_torchscript_embedder_end_to_end(
    tmp_path: Path, model_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    train = digit_images(80)
    copies = train[[5, 42]]
    fresh = digit_images(4, offset=1000)
    np.save(tmp_path / "train.npy", train)
    np.save(tmp_path / "gen.npy", np.concatenate([copies, fresh]))
    out = tmp_path / "out"
    args = ["audit", "--train", tmp_path / "train.npy", "--generated", tmp_path / "gen.npy", "--out", out]
    embedder = ["--embedder", model_file, "--embedder-size", "16", "--embedder-mean", "0.5,0.5,0.5"]
    code, stderr = run_main(
        monkeypatch, capsys, *args, *embedder, "--embedder-std", "0.25,0.25,0.25", "--quiet"
    )
    assert code == 0, stderr
    m = pd.read_parquet(out / "matches.parquet")
    assert m["similar"][:2].all() and m["train_index"][:2].tolist() == [5, 42]
    assert m["feature_similarity"][:2].to_numpy() == pytest.approx(1.0, abs=1e-5)
    # the features are the model's own outputs on resized, normalized RGB images
    model = TinyEmbedder().eval()
    images = torch.from_numpy(np.concatenate([train, fresh]).astype(np.float32) / 255)[:, None].expand(
        -1, 3, -1, -1
    )
    resized = torch.nn.functional.interpolate(images, size=(16, 16), mode="bilinear", antialias=True)
    with torch.no_grad():
        vectors = torch.nn.functional.normalize(model((resized - 0.5) / 0.25), dim=1).numpy()
    expected = (vectors[80:] @ vectors[:80].T).max(axis=1)
    np.testing.assert_allclose(m["feature_similarity"][2:], expected, atol=1e-4)
    assert json.loads((out / "summary.json").read_text())["spaces"]["similar"] == "embedder tiny.pt"


@pytest.mark.parametrize("case", ["pickle", "text", "shape", "text modality"])
def test_bad_embedders_are_refused_in_one_line(
    tmp_path: Path,
    model_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    case: str,
) -> None:
    np.save(tmp_path / "train.npy", digit_images(20))
    np.save(tmp_path / "gen.npy", digit_images(3, offset=900))
    train, generated = tmp_path / "train.npy", tmp_path / "gen.npy"
    model = tmp_path / "model.pt"
    message = "not a TorchScript model"
    if case == "pickle":
        torch.save(TinyEmbedder(), model)  # a pickle: torch.jit.load refuses it, nothing is unpickled
    elif case == "text":
        model.write_text("not a model")
    elif case == "shape":
        torch.jit.script(Flat()).save(str(model))
        message = "the embedder returned (20,) for a batch of 20 images"
    else:
        model = model_file
        (tmp_path / "train.txt").write_text("a b\n")
        (tmp_path / "gen.txt").write_text("a b\n")
        train, generated, message = (
            tmp_path / "train.txt",
            tmp_path / "gen.txt",
            "--embedder applies to images",
        )
    args = ["audit", "--train", train, "--generated", generated, "--out", tmp_path / "o", "--embedder", model]
    code, stderr = run_main(monkeypatch, capsys, *args, "--quiet")
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0] and model.name in lines[0], stderr


def test_feature_space_typicality_and_the_python_api(model_file: Path) -> None:
    train = digit_images(120).astype(np.float32)[..., None] / 255
    space = embedder_space(Embedder(model_file, size=16), train, batch_size=50)
    assert space.train.shape == (120, 16)
    np.testing.assert_allclose(np.linalg.norm(space.train, axis=1), 1, rtol=1e-5)
    result = audit_images(train, train[:30], AuditConfig(), features=space)
    assert result.matches["similar"].all() and "density_features" in result.summary["prototypicality"]
    assert result.per_train["density_features"].notna().sum() >= 30
