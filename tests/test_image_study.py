"""The image DDPM and the image memorization study (quick preset), checked against its own tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from protomem.diffusion.images import ImageUNet, NoiseSchedule, diffusion_loss, sample_images
from protomem.errors import ProtomemError
from protomem.study import images as image_study
from protomem.study.images import first_memorized, get_image_preset, load_digit_subset, run_image_study
from protomem.study.report import render_report as render_report_of_run
from tests.browser import render_report, require_chromium


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_noise_schedule_and_forward_process() -> None:
    schedule = NoiseSchedule(timesteps=50)
    a = schedule.alpha_bar
    assert a.shape == (50,) and (a[1:] < a[:-1]).all() and 0 < a[-1] < 1e-3 and a[0] > 0.99
    t = torch.full((4000,), 25)
    noisy = schedule.add_noise(torch.zeros(4000, 1, 2, 2), t, torch.randn(4000, 1, 2, 2))
    assert float(noisy.var()) == pytest.approx(float(1 - a[25]), rel=0.05)  # x0 = 0: variance 1 - alpha_bar


def test_ddpm_learns_and_samples_deterministically() -> None:
    torch.manual_seed(0)
    digits, *_ = load_digit_subset(8, seed=0)
    x = torch.tensor(digits.transpose(0, 3, 1, 2) * 2 - 1)
    model = ImageUNet(channels=1, width=8)
    schedule = NoiseSchedule(timesteps=50)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        loss = diffusion_loss(model, schedule, x[torch.randint(0, 8, (32,), generator=generator)], generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-30:]) < 0.6 * np.mean(losses[:10])
    first = sample_images(model, schedule, 6, (1, 8, 8), seed=3)
    again = sample_images(model, schedule, 6, (1, 8, 8), seed=3)
    assert first.shape == (6, 1, 8, 8) and torch.equal(first, again)
    assert float(first.min()) >= -1 and float(first.max()) <= 1


def test_digit_subset_is_class_balanced() -> None:
    images, index, labels, all_digits = load_digit_subset(30, seed=1)
    assert images.shape == (30, 8, 8, 1) and all_digits.shape == (1797, 8, 8, 1)
    assert np.bincount(labels, minlength=10).tolist() == [3] * 10
    np.testing.assert_array_equal(all_digits[index], images)


def test_first_memorized_by_hand() -> None:
    copies = np.array([[0, 1, 0], [2, 1, 0], [3, 2, 1]])  # 3 evaluations x 3 items
    first = first_memorized(copies, np.array([10, 20, 40]), threshold=2)
    assert first[:2].tolist() == [20.0, 40.0] and np.isnan(first[2])


def test_detector_bias_of_a_uniform_copier() -> None:
    digits, *_ = load_digit_subset(20, seed=0)
    exact = image_study.detector_bias(digits, sigma=0.0, seed=0, replicates=2)
    assert (exact["ratio"] == 1).all() and (exact["l2"] == 1).all()  # noiseless copies: always flagged
    heavy = image_study.detector_bias(digits, sigma=0.5, seed=0, replicates=2)
    assert heavy["l2"].max() == 0  # clipped noise of RMS far above the 0.05 threshold: never flagged


def test_quick_study_tables_agree_and_report_renders(tmp_path: Path) -> None:
    run = run_image_study(tmp_path / "run", preset="quick", progress=False, threads=1)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete"
    if not torch.cuda.is_available():  # auto: the CPU here, recorded with the hardware
        config = json.loads((run / "config.json").read_text())
        assert summary["device"] == config["device"] == "cpu" and config["device_label"].startswith("cpu (")
    preset = get_image_preset("quick")
    per_example = pd.read_parquet(run / "per_example.parquet")
    metrics = pd.read_parquet(run / "metrics.parquet")
    evals = json.loads((run / "evals.json").read_text())
    assert metrics["step"].tolist() == summary["eval_steps"] == [e["step"] for e in evals]
    assert len(per_example) == preset.n_train
    copies = np.stack([per_example[f"copies_ratio_step{s}"] for s in summary["eval_steps"]])
    for e, row in zip(evals, copies, strict=True):
        assert row.tolist() == e["copies"]["ratio"]
        assert row.sum() == round(e["frac_ratio"] * preset.eval_samples)
    recomputed = first_memorized(copies, np.array(summary["eval_steps"]), preset.copies_for_memorized)
    np.testing.assert_array_equal(recomputed, per_example["first_memorized_ratio"].to_numpy())
    assert summary["n_memorized"] == int(np.isfinite(recomputed).sum()) >= 1  # the quick preset memorizes
    with pytest.raises(ProtomemError, match="--overwrite"):
        run_image_study(run, preset="quick", progress=False, threads=1)
    (run / "report.html").unlink()
    image_study.rebuild_image_study(run)  # from the stored tables alone
    rebuilt = json.loads((run / "summary.json").read_text())
    (run / "report.html").unlink()
    assert render_report_of_run(run) == run / "report.html"  # `protomem report` knows an image-study run
    assert rebuilt["verdict"] == summary["verdict"] and (run / "report.html").exists()
    require_chromium()
    page = render_report(run / "report.html", tmp_path / "shot.png")
    assert page["images"] >= 4 and page["images_loaded"] == page["images"]
    assert "Null: a perfect generalizer" in page["text"] and "uniform copier" in page["text"]


@pytest.mark.slow
def test_quick_study_resumes_to_the_same_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = run_image_study(tmp_path / "full", preset="quick", progress=False, threads=1)
    original = image_study._evaluate
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(image_study, "_evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_image_study(tmp_path / "cut", preset="quick", progress=False, threads=1)
    monkeypatch.setattr(image_study, "_evaluate", original)
    assert not (tmp_path / "cut" / "summary.json").exists()
    resumed = run_image_study(tmp_path / "cut", preset="quick", resume=True, progress=False, threads=1)
    a = json.loads((full / "evals.json").read_text())
    b = json.loads((resumed / "evals.json").read_text())
    for x, y in zip(a, b, strict=True):
        assert x["step"] == y["step"] and x["copies"] == y["copies"] and x["samples"] == y["samples"]
