"""The study pipeline on real (tiny) training runs: tables against each other and against the grammar,
resume after a kill, refusing to overwrite, the report in headless Chromium, the quick preset end to end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from protomem.errors import ProtomemError
from protomem.grammar import load_grammar, parse
from protomem.io import read_strings
from protomem.study.config import apply_overrides
from protomem.study.pipeline import run_condition
from protomem.study.presets import get_preset
from tests.browser import render_report, require_chromium

TINY = {
    "data.n_train": 32,
    "diffusion.steps": 160,
    "diffusion.threads": 1,
    "diffusion.sampling_steps": 16,
    "evaluation.eval_steps": [20, 40, 80, 160],
    "evaluation.n_samples": 128,
    "evaluation.finer_sampling_steps": 32,
    "analysis.n_null_draws": 40,
    "analysis.n_bootstrap": 40,
    "analysis.n_permutations": 40,
    "analysis.calibration_samples": 500,
}


def tiny_condition():
    return apply_overrides(get_preset("quick").conditions[0], TINY)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("study") / "tiny"
    run_condition(tiny_condition(), out, progress=False)
    return out


def _samples(run: Path, sampler: str = "train") -> pd.DataFrame:
    table = pd.read_parquet(run / "samples.parquet")
    return table[table["sampler"] == sampler].reset_index(drop=True)


def test_run_directory_has_every_output(tiny_run):
    for name in (
        "config.yaml",
        "grammar.json",
        "train.parquet",
        "metrics.parquet",
        "samples.parquet",
        "per_example.parquet",
        "slop.parquet",
        "summary.json",
        "report.html",
        "heldout.parquet",
    ):
        assert (tiny_run / name).is_file(), name
    assert list((tiny_run / "train" / "checkpoints").glob("step_*"))
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert summary["steps"] == [20, 40, 80, 160]
    assert set(summary["slop"]["levels"]) == {"l1", "l2"}
    assert summary["finer_sampler"]["sampling_steps"] == 32
    assert summary["verdict"] and summary["cpu_seconds"] > 0
    # secondary scores carry Benjamini-Hochberg adjusted p-values (never below the raw p); the primary not
    correlations = summary["correlations"]
    secondary = [c for name, c in correlations.items() if name != summary["primary_score"]]
    assert secondary and all(c["p_calibrated_bh"] >= c["p_calibrated"] - 1e-12 for c in secondary)
    assert "p_calibrated_bh" not in correlations.get(summary["primary_score"], {})
    # the primary score with log p(x) held out: a secondary score and a per-example column, its ranks
    # uncorrelated with those of log p(x)
    held_out = f"{summary['primary_score']}_beyond_logprob"
    assert held_out in correlations and "p_grammar_bh" in correlations[held_out]
    per_example = pd.read_parquet(tiny_run / "per_example.parquet")
    logprob_ranks = per_example["logprob"].round(9).rank()
    assert abs(np.corrcoef(per_example[held_out], logprob_ranks)[0, 1]) < 1e-9
    doc = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert doc["versions"]["torch"] == torch.__version__
    assert set(doc["seeds"]) == {"grammar", "data", "model", "analysis"}
    # the matched design: the primary score and log p(x) (nearly) uncorrelated in the training set
    design = summary["training_set"]
    assert design["design"] == "matched" and abs(design["rho_score_logprob"]) <= 0.01
    ranks = per_example[summary["primary_score"]].rank()
    assert abs(np.corrcoef(ranks, logprob_ranks)[0, 1] - design["rho_score_logprob"]) < 1e-9
    # the likelihood endpoint and the slop test
    assert 0.0 <= summary["likelihood"]["frac_memorized_final"] <= 1.0
    assert summary["primary_score"] in summary["likelihood"]["correlations"]
    assert np.isfinite(summary["likelihood"]["agreement_rho"])
    test = summary["slop"]["test"]
    assert test is None or {"slope", "p_grammar", "p_calibrated"} <= set(test)


def test_likelihood_endpoint_recomputed_from_the_stored_elbos(tiny_run):
    """Gains, thresholds and first crossings of per_example.parquet, recomputed from the ELBO files."""
    summary = json.loads((tiny_run / "summary.json").read_text())
    per_example = pd.read_parquet(tiny_run / "per_example.parquet")
    train = read_strings(tiny_run / "train.parquet")
    heldout = read_strings(tiny_run / "heldout.parquet")
    steps = summary["steps"]
    nll_train = np.zeros((len(train.tokens), len(steps)))
    nll_heldout = np.zeros((len(heldout.tokens), len(steps)))
    for t, step in enumerate(steps):
        table = pd.read_parquet(tiny_run / "evals" / f"likelihood_step_{step:08d}.parquet")
        for frame, rows in (
            (nll_train, table[table["set"] == "train"]),
            (nll_heldout, table[table["set"] == "heldout"]),
        ):
            frame[rows["index"].to_numpy(), t] = rows["nll"].to_numpy()
    assert np.isfinite(nll_train).all() and (nll_train > 0).all()
    r = summary["likelihood"]["heldout_matches"]

    def reference(logprob, classes, exclude):
        out = []
        for i in range(len(logprob)):
            distance = np.abs(np.round(heldout.logprobs, 9) - round(logprob[i], 9)) + 1e6 * (
                heldout.classes != classes[i]
            )
            if exclude:
                distance[i] = np.inf
            out.append(nll_heldout[np.argsort(distance, kind="stable")[:r]].mean(axis=0))
        return np.array(out)

    gain = reference(train.logprobs, train.classes, False) - nll_train
    heldout_gain = reference(heldout.logprobs, heldout.classes, True) - nll_heldout
    assert np.allclose(np.array(per_example["likelihood_gain"].tolist()), gain)
    threshold = np.quantile(heldout_gain, 0.99, axis=0)
    assert np.allclose(summary["likelihood"]["thresholds"], threshold)
    crossed = gain > threshold
    first = np.where(crossed.any(1), np.array(steps)[crossed.argmax(1)], -1)
    assert (per_example["first_memorized_step_likelihood"].to_numpy() == first).all()


def test_copies_and_novel_samples_agree_with_the_training_set(tiny_run):
    grammar = load_grammar(tiny_run / "grammar.json")
    train = read_strings(tiny_run / "train.parquet").tokens
    samples = _samples(tiny_run)
    tokens = np.array(samples["tokens"].tolist())
    copies = samples["status"] == "copy"
    assert (tokens[copies] == train[samples["copy_index"][copies]]).all()
    train_set = {tuple(t) for t in train.tolist()}
    novel = samples["status"] == "novel_valid"
    assert not any(tuple(t) in train_set for t in tokens[novel])
    parsed = parse(grammar, tokens)
    assert (parsed.valid == (samples["status"] != "invalid")).all()
    invalid = ~parsed.valid
    assert (samples["failing_level"][invalid] == parsed.deepest_valid_level[invalid] - 1).all()
    # Hamming distance to the nearest training string, recomputed by brute force
    distances = (tokens[:, None, :] != train[None, :, :]).sum(axis=2).min(axis=1)
    assert (samples["nn_hamming"] == distances).all()


def test_metrics_recomputed_from_samples(tiny_run):
    grammar = load_grammar(tiny_run / "grammar.json")
    samples = _samples(tiny_run)
    metrics = pd.read_parquet(tiny_run / "metrics.parquet")
    assert metrics["step"].tolist() == sorted(samples["step"].unique())
    for _, row in metrics.iterrows():
        part = samples[samples["step"] == row["step"]]
        assert row["frac_exact_copy"] == pytest.approx((part["status"] == "copy").mean())
        assert row["frac_novel_valid"] == pytest.approx((part["status"] == "novel_valid").mean())
        assert row["frac_invalid"] == pytest.approx((part["status"] == "invalid").mean())
        for level in range(grammar.depth):
            copied = np.array(part[f"copied_l{level}"].tolist(), dtype=bool)
            assert copied.shape == (len(part), grammar.branching**level)
            assert row[f"frac_block_copy_l{level}"] == pytest.approx(copied.mean())
        assert row["frac_block_copy_l0"] == pytest.approx(row["frac_exact_copy"])


def test_per_example_tracking_agrees_with_samples(tiny_run):
    per_example = pd.read_parquet(tiny_run / "per_example.parquet")
    samples = _samples(tiny_run)
    summary = json.loads((tiny_run / "summary.json").read_text())
    steps = summary["steps"]
    copies = np.array(per_example["copies"].tolist())
    for t, step in enumerate(steps):
        index = samples.loc[samples["step"] == step, "copy_index"].to_numpy()
        assert (copies[:, t] == np.bincount(index[index >= 0], minlength=len(per_example))).all()
    k = summary["n_samples"]
    assert per_example["expected_copies"].to_numpy() == pytest.approx(k * np.exp(per_example["logprob"]))
    threshold = np.round(per_example["expected_copies"].to_numpy())[:, None] + summary["min_excess"]
    memorized = copies >= threshold
    first = np.where(memorized.any(axis=1), memorized.argmax(axis=1), len(steps))
    assert (per_example["first_memorized_index"] == first).all()
    assert summary["train_mass"] == pytest.approx(np.exp(per_example["logprob"]).sum())


def test_refuses_to_overwrite_and_resumes_a_complete_run(tiny_run, tmp_path):
    with pytest.raises(ProtomemError, match="--overwrite"):
        run_condition(tiny_condition(), tiny_run, progress=False)
    before = (tiny_run / "summary.json").stat().st_mtime_ns
    run_condition(tiny_condition(), tiny_run, resume=True, progress=False)
    assert (tiny_run / "summary.json").stat().st_mtime_ns == before
    other = apply_overrides(tiny_condition(), {"diffusion.lr": 1e-3})
    with pytest.raises(ProtomemError, match="different condition"):
        run_condition(other, tiny_run, resume=True, progress=False)


def test_the_device_is_recorded_and_may_change_on_resume(tiny_run):
    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert config["device"] == "cpu" and config["device_label"].startswith("cpu (")
    assert config["condition"]["diffusion"]["device"] == "auto"  # as asked; the resolved one beside it
    assert json.loads((tiny_run / "summary.json").read_text())["device"] == "cpu"
    assert yaml.safe_load((tiny_run / "train" / "config.yaml").read_text())["device"] == "cpu"
    before = (tiny_run / "summary.json").stat().st_mtime_ns
    on_cpu = apply_overrides(tiny_condition(), {"diffusion.device": "cpu"})
    run_condition(on_cpu, tiny_run, resume=True, progress=False)  # same condition, another device: fine
    assert (tiny_run / "summary.json").stat().st_mtime_ns == before


def test_cli_errors_are_one_line(tiny_run):
    result = subprocess.run(
        [sys.executable, "-m", "protomem.cli", "study", "--preset", "quick", "--out", str(tiny_run)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    result = subprocess.run(
        [sys.executable, "-m", "protomem.cli", "report", str(tiny_run / "nowhere")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "no such run directory" in result.stderr


@pytest.mark.parametrize(
    "field, value", [("grammar", None), ("training_set", "matched"), ("finer_sampler", [1]), ("slop", 3)]
)
def test_report_on_a_summary_with_fields_of_the_wrong_type_is_one_line(tiny_run, tmp_path, field, value):
    """The report's template reads these fields; a hand-edited summary.json that breaks them is a damaged
    record (found by the long fuzz run: 'grammar': null was a jinja2 UndefinedError traceback)."""
    from tests.cli_runner import invoke, snapshot

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("train"))
    summary = json.loads((run / "summary.json").read_text())
    summary[field] = value
    (run / "summary.json").write_text(json.dumps(summary))
    before = snapshot(run)
    result = invoke("report", run)
    assert result.is_one_line_error(run, "damaged or incomplete"), result.stderr
    assert snapshot(run) == before


def test_report_rebuilt_from_tables_renders_every_figure(tiny_run, tmp_path):
    require_chromium()
    (tiny_run / "report.html").unlink()
    for checkpoint in (tiny_run / "train" / "checkpoints").glob("step_*"):
        assert checkpoint.is_dir()
    result = subprocess.run(
        [sys.executable, "-m", "protomem.cli", "report", str(tiny_run)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    seen = render_report(tiny_run / "report.html", tmp_path / "report.png")
    assert seen["images"] >= 11
    assert seen["images_loaded"] == seen["images"]
    assert "memorized first" in seen["text"]
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_study_report_of_real_conditions_fits_the_screen(tiny_run, tmp_path, monkeypatch):
    """The study report (conditions table, pooled tables, forest plot, survival curves) over two real
    conditions, pooled for real: the tiny run stands in for training (copied, not re-run)."""
    require_chromium()
    from protomem.study import runner
    from protomem.study.presets import StudyPreset

    conditions = [
        apply_overrides(tiny_condition(), {"name": "tiny-zipf-with-a-long-name-s0"}),
        apply_overrides(tiny_condition(), {"name": "tiny-zipf-with-a-long-name-s1"}),
    ]
    monkeypatch.setattr(runner, "get_preset", lambda name: StudyPreset(name, "test", conditions))
    monkeypatch.setattr(
        runner, "run_condition", lambda config, out, **_: shutil.copytree(tiny_run, out, dirs_exist_ok=True)
    )
    out = tmp_path / "study"
    runner.run_study(out, preset="quick", progress=False, threads=1, jobs=1)
    seen = render_report(out / "report.html", tmp_path / "study.png")
    assert seen["images"] >= 2 and "tiny-zipf-with-a-long-name-s1" in seen["text"]
    for width in (1280, 390):
        assert seen["widths"][width]["screenshot"].stat().st_size > 10_000


def test_study_report_of_conditions_without_the_likelihood_endpoint(tiny_run, tmp_path, monkeypatch):
    """Presets that skip the likelihood endpoint (zipf-levels: likelihood_draws = 0) pool and render; the
    study report once failed on them (UndefinedError: no attribute 'frac_memorized_final')."""
    from protomem.study import runner
    from protomem.study.presets import StudyPreset

    def without_likelihood(config, out, **_):
        shutil.copytree(tiny_run, out, dirs_exist_ok=True)
        summary = json.loads((Path(out) / "summary.json").read_text())
        summary.pop("likelihood", None)
        (Path(out) / "summary.json").write_text(json.dumps(summary))

    conditions = [apply_overrides(tiny_condition(), {"name": f"tiny-s{seed}"}) for seed in (0, 1)]
    monkeypatch.setattr(runner, "get_preset", lambda name: StudyPreset(name, "test", conditions))
    monkeypatch.setattr(runner, "run_condition", without_likelihood)
    out = tmp_path / "study"
    runner.run_study(out, preset="quick", progress=False, threads=1, jobs=1)
    study = json.loads((out / "study.json").read_text())
    assert study["status"] == "complete"
    by_endpoint = {c["endpoint"]: c for c in study["claims"] if c["claim"] == "a"}
    assert by_endpoint["likelihood"]["verdict"] == "not tested"
    assert "tiny-s1" in (out / "report.html").read_text()


KILL_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from tests.test_study_pipeline import tiny_condition
from protomem.study.pipeline import run_condition
run_condition(tiny_condition(), sys.argv[1], progress=False)
"""


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tiny_run, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(out)], env=env)
    deadline = time.time() + 300
    while not (out / "evals" / "step_00000040.parquet").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()
    with pytest.raises(ProtomemError, match="--resume"):
        run_condition(tiny_condition(), out, progress=False)
    run_condition(tiny_condition(), out, resume=True, progress=False)
    resumed, reference = _samples(out), _samples(tiny_run)
    assert resumed["step"].tolist() == reference["step"].tolist()
    assert (np.array(resumed["tokens"].tolist()) == np.array(reference["tokens"].tolist())).all()
    a = pd.read_parquet(out / "per_example.parquet")
    b = pd.read_parquet(tiny_run / "per_example.parquet")
    assert (a["first_memorized_index"] == b["first_memorized_index"]).all()


def test_the_plan_of_a_condition_is_within_5x_of_its_run(tiny_run):
    from protomem.study.plan import plan_conditions

    plan = plan_conditions([tiny_condition()], jobs=1, threads=1)
    estimate = plan.conditions[0]
    measured = sum(json.loads((tiny_run / "summary.json").read_text())["stage_seconds"].values())
    assert measured / 5 < estimate.seconds < 5 * measured, (estimate, measured)
    assert estimate.steps == 160 and estimate.n_evals == 4 and estimate.n_samples == 128
    assert plan.wall_seconds > estimate.seconds  # plus the study's own start-up and report


def test_the_parallel_runner_starts_the_longest_condition_first_as_the_plan_does(tmp_path, monkeypatch):
    import concurrent.futures

    from protomem.study import runner
    from protomem.study.plan import plan_conditions, submission_order

    small = apply_overrides(tiny_condition(), {"name": "tiny-small"})
    conditions = [
        small,
        apply_overrides(small, {"name": "tiny-wide", "diffusion.width": 2 * small.diffusion.width}),
        apply_overrides(small, {"name": "tiny-small-again", "grammar.seed": 1}),
    ]
    assert submission_order(conditions) == [1, 0, 2]  # the wide model first, equal ones as listed
    submitted = []

    class Recording(concurrent.futures.ThreadPoolExecutor):
        """Records what the runner submits, in order, and runs nothing."""

        def __init__(self, max_workers, **_):
            super().__init__(max_workers)

        def submit(self, fn, condition, *args):
            submitted.append(condition.name)
            future = concurrent.futures.Future()
            future.set_result(None)
            return future

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", Recording)
    runner._run_parallel(conditions, tmp_path, 2, progress=False)
    assert submitted == ["tiny-wide", "tiny-small", "tiny-small-again"]
    plan = plan_conditions(conditions, jobs=2, threads=1)
    assert plan.order == submitted  # --plan simulates the runner's schedule
    assert [e.name for e in plan.conditions] == [c.name for c in conditions]  # rows as listed


@pytest.mark.slow
def test_quick_preset_study_end_to_end(tmp_path):
    from protomem.study.plan import plan_conditions

    require_chromium()
    out = tmp_path / "study"
    plan = plan_conditions(get_preset("quick").conditions, jobs=1, threads=1)
    started = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "protomem.cli",
            "study",
            "--preset",
            "quick",
            "--out",
            str(out),
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    elapsed = time.perf_counter() - started
    assert result.stdout.strip().endswith("report.html")
    study = json.loads((out / "study.json").read_text())
    assert study["status"] == "complete" and study["threads"] == 1
    assert "memorized first" in study["verdict"]
    claims = {(c["claim"], c["endpoint"]): c for c in study["claims"]}
    assert set(claims) == {("a", "copies"), ("a", "likelihood"), ("b", "tau_mem"), ("c", "slop")}
    assert claims[("b", "tau_mem")]["verdict"] == "not tested"  # the quick preset has no skew arms
    verdicts = {"supported", "not supported", "refuted", "not tested"}
    assert all(c["verdict"] in verdicts and c["statement"] and c["test"] for c in claims.values())
    assert claims[("a", "copies")]["n_conditions"] == 1
    condition = out / "conditions" / study["conditions"][0]
    summary = json.loads((condition / "summary.json").read_text())
    assert summary["finer_sampler"]["sampling_steps"] > summary["sampling_steps"]
    # the quick preset crosses into memorization
    assert summary["final"]["frac_exact_copy"] > 0.1
    seen = render_report(out / "report.html", tmp_path / "study.png")
    assert seen["images"] >= 2 and seen["images_loaded"] == seen["images"]
    seen = render_report(condition / "report.html", tmp_path / "condition.png")
    assert seen["images"] >= 11 and seen["images_loaded"] == seen["images"]
    # refuses to overwrite, then does with --overwrite
    again = subprocess.run(
        [sys.executable, "-m", "protomem.cli", "study", "--preset", "quick", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 2 and "--overwrite" in again.stderr
    # the plan made before the run is the right order of magnitude (generously: timings share the machine)
    assert elapsed / 5 < plan.wall_seconds < 5 * elapsed
    print(
        f"quick preset wall time {elapsed:.1f} s (planned {plan.wall_seconds:.1f} s), "
        f"load average {os.getloadavg()}"
    )


@pytest.mark.slow
def test_parallel_study_pools_conditions_and_renders(tmp_path, monkeypatch):
    from protomem.study import runner
    from protomem.study.presets import StudyPreset

    conditions = [
        apply_overrides(tiny_condition(), {"name": "tiny-zipf"}),
        apply_overrides(tiny_condition(), {"name": "tiny-uniform", "grammar.zipf_exponent": 0.0}),
    ]
    monkeypatch.setattr(runner, "get_preset", lambda name: StudyPreset(name, "test", conditions))
    out = tmp_path / "study"
    runner.run_study(out, preset="quick", progress=False, threads=1, jobs=2)
    study = json.loads((out / "study.json").read_text())
    assert study["status"] == "complete" and study["jobs"] == 2
    assert set(study["pooled_groups"]) == {"all conditions", "Zipf rules", "uniform rules"}
    rhos = [
        json.loads((out / "conditions" / c.name / "summary.json").read_text())["primary"]["rho"]
        for c in conditions
    ]
    assert study["pooled"]["rho"] == pytest.approx(np.nanmean(rhos))
    assert 0 < study["pooled"]["p_calibrated"] <= 1
    # the held-out-likelihood score exists where log p(x) varies (Zipf), and is pooled over those only
    held_out = study["pooled_beyond_likelihood"]
    assert held_out["score"] == "rule_count_mean_beyond_logprob" and held_out["conditions"] == ["tiny-zipf"]
    zipf = json.loads((out / "conditions" / "tiny-zipf" / "summary.json").read_text())
    assert held_out["rho"] == pytest.approx(zipf["correlations"][held_out["score"]]["rho"])
    with pytest.raises(ProtomemError, match="--overwrite"):
        runner.run_study(out, preset="quick", progress=False)
    runner.run_study(out, resume=True, progress=False)  # everything done: only pools and re-renders
    seen = render_report(out / "report.html", tmp_path / "study.png")
    # the power curve, the forest plot and one survival figure per condition
    assert seen["images"] == 4 and seen["images_loaded"] == 4


STUDY_KILL_SCRIPT = """
import sys
from protomem.study import runner
from protomem.study.config import apply_overrides
from protomem.study.presets import StudyPreset
from tests.test_study_pipeline import tiny_condition
conditions = [apply_overrides(tiny_condition(), {"name": f"tiny-{i}", "grammar.seed": i}) for i in range(2)]
runner.get_preset = lambda name: StudyPreset(name, "test", conditions)
runner.run_study(sys.argv[1], preset="quick", progress=False, threads=1, jobs=2)
"""


WATCHDOG_SCRIPT = """
import sys, time
from protomem.study.runner import _watch_parent
_watch_parent(int(sys.argv[1]))
time.sleep(1.0)
print("alive")
"""


def test_study_worker_exits_when_its_study_process_is_already_gone():
    # A worker is told its study's pid. One whose study died while it was still starting (its parent is
    # now another process) must end at once, before taking any condition, not run on as an orphan.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = [sys.executable, "-c", WATCHDOG_SCRIPT]
    # this test's own parent is never the child's parent (pid 1 would be, were the test itself pid 1)
    not_parent = str(os.getppid())
    orphan = subprocess.run([*run, not_parent], env=env, capture_output=True, text=True, timeout=120)
    assert orphan.returncode == 1 and "alive" not in orphan.stdout
    child = subprocess.run([*run, str(os.getpid())], env=env, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0 and child.stdout.strip() == "alive", child.stderr


@pytest.mark.slow
def test_killed_parallel_study_leaves_no_orphans_and_resumes(tmp_path, monkeypatch):
    from protomem.study import runner
    from protomem.study.presets import StudyPreset

    out = tmp_path / "study"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", STUDY_KILL_SCRIPT, str(out)], env=env)
    deadline = time.time() + 300
    while not list(out.glob("conditions/*/evals/step_00000040.parquet")):
        assert proc.poll() is None and time.time() < deadline, "the study ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(3)  # the workers notice their parent is gone within half a second
    before = sorted(str(p) for p in out.rglob("*"))
    time.sleep(3)
    assert sorted(str(p) for p in out.rglob("*")) == before, "an orphaned worker is still writing"
    conditions = [
        apply_overrides(tiny_condition(), {"name": f"tiny-{i}", "grammar.seed": i}) for i in range(2)
    ]
    monkeypatch.setattr(runner, "get_preset", lambda name: StudyPreset(name, "test", conditions))
    runner.run_study(out, resume=True, progress=False)
    assert json.loads((out / "study.json").read_text())["status"] == "complete"
