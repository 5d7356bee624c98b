"""Sweeps on a real local Ray: retries, kills, resumption, skipping finished points, the database.

The first test drives the Ray machinery with the stand-in run_condition of test_sweep_support (seconds);
the slow test runs the Done-means scenario with the real study: a tiny 2x2 sweep on the quick preset,
one point killed midway, the sweep re-run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pytest

from protomem.sweep.layout import SweepLayout, is_complete, read_attempts
from protomem.sweep.runner import run_sweep
from protomem.sweep.spec import expand_points, load_spec, spec_from_dict
from tests.browser import chromium_path, render_report
from tests.test_sweep_support import FakeCondition, eval_steps, fake_run_condition

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]


def kill_when(predicate, layout: SweepLayout, name: str, timeout: float = 120.0) -> threading.Thread:
    """Background thread: once ``predicate(run_dir)`` holds, SIGKILL the worker running point ``name``."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            starts = [e for e in read_attempts(layout.attempts_path(name)) if e["event"] == "start"]
            if starts and predicate(layout.run_dir(name)):
                os.kill(starts[-1]["pid"], signal.SIGKILL)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def evaluations_done(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "state.json").read_text())["done"]
    except (OSError, ValueError, KeyError):
        return 0


def test_ray_sweep_retries_failed_and_killed_points_and_skips_finished_ones(tmp_path, monkeypatch):
    # workers import the stand-in runner from this repository's tests package
    monkeypatch.setenv("PYTHONPATH", f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    spec = spec_from_dict(
        {"grid": {"data.n_train": [16, 64], "seed": [0, 1]}, "retries": 1}, path=tmp_path / "fake.yaml"
    )
    points = expand_points(spec)
    failing, killed = points[0].name, points[3].name
    configs = {}
    for point in points:
        configs[point.name] = FakeCondition(
            n_train=point.params["data.n_train"],
            seed=point.params["seed"],
            sleep=0.25 if point.name == killed else 0.02,
            fail_first=point.name == failing,
        )
    layout = SweepLayout(tmp_path / "sweep")
    watcher = kill_when(lambda d: evaluations_done(d) >= 4, layout, killed)
    result = run_sweep(
        spec, layout.root, num_cpus=2, progress=False, condition_runner=fake_run_condition, configs=configs
    )
    watcher.join(timeout=1)
    import ray

    assert not ray.is_initialized()  # the private local Ray was shut down
    assert result.failed == {} and sorted(result.completed) == sorted(p.name for p in points)
    assert result.attempts[failing] == 2 and result.attempts[killed] == 2
    for name in (failing, killed):
        starts = [e for e in read_attempts(layout.attempts_path(name)) if e["event"] == "start"]
        assert [s["resume"] for s in starts] == [False, True]
    # the killed point continued from its 4+ evaluations instead of starting over
    state = json.loads((layout.run_dir(killed) / "state.json").read_text())
    assert state["starts"] == 2 and state["done"] == eval_steps(configs[killed]).size

    con = duckdb.connect(str(layout.database), read_only=True)
    rows = con.execute("SELECT point, status, attempts, resumed FROM points ORDER BY point").fetchall()
    per_point = con.execute(
        "SELECT point, count(*), count(DISTINCT step) FROM checkpoints GROUP BY point"
    ).fetchall()
    con.close()
    assert sorted(r[0] for r in rows) == sorted(p.name for p in points)
    assert all(r[1] == "complete" for r in rows)
    assert {r[0]: r[3] for r in rows} == {p.name: p.name in (failing, killed) for p in points}
    assert all(n == distinct == eval_steps(FakeCondition()).size for _, n, distinct in per_point)

    # a re-run skips every finished point and changes nothing
    mtimes = {p.name: (layout.run_dir(p.name) / "summary.json").stat().st_mtime_ns for p in points}
    again = run_sweep(
        spec, layout.root, num_cpus=2, progress=False, condition_runner=fake_run_condition, configs=configs
    )
    assert sorted(again.skipped) == sorted(mtimes) and again.completed == [] and again.attempts == {}
    assert mtimes == {p.name: (layout.run_dir(p.name) / "summary.json").stat().st_mtime_ns for p in points}


def test_a_point_that_keeps_failing_is_reported_and_the_rest_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    spec = spec_from_dict({"grid": {"data.n_train": [16, 32]}, "retries": 0}, path=tmp_path / "fake.yaml")
    points = expand_points(spec)
    configs = {
        p.name: FakeCondition(n_train=p.params["data.n_train"], fail_first=p.params["data.n_train"] == 32)
        for p in points
    }
    layout = SweepLayout(tmp_path / "sweep")
    result = run_sweep(
        spec, layout.root, num_cpus=1, progress=False, condition_runner=fake_run_condition, configs=configs
    )
    assert list(result.failed) == [points[1].name] and "injected failure" in result.failed[points[1].name]
    assert result.completed == [points[0].name]
    con = duckdb.connect(str(layout.database), read_only=True)
    statuses = dict(con.execute("SELECT point, status FROM points").fetchall())
    con.close()
    assert statuses == {points[0].name: "complete", points[1].name: "failed"}
    # re-running retries only the failed point, which now resumes and finishes
    again = run_sweep(
        spec, layout.root, num_cpus=1, progress=False, condition_runner=fake_run_condition, configs=configs
    )
    assert again.skipped == [points[0].name] and again.completed == [points[1].name]


# --- the real study ----------------------------------------------------------------------------------


def evaluations(run_dir: Path) -> dict[str, int]:
    """The study's per-evaluation records in a run directory: file name -> mtime (ns)."""
    return {p.name: p.stat().st_mtime_ns for p in sorted((run_dir / "evals").glob("step_*.parquet"))}


@pytest.mark.slow
def test_tiny_study_sweep_killed_midway_resumes_and_gathers_every_point_once(tmp_path):
    pytest.importorskip("protomem.study.pipeline")
    sweep_file = REPO / "examples" / "sweeps" / "tiny.yaml"
    spec = load_spec(sweep_file)
    points = expand_points(spec)
    assert len(points) == 4
    layout = SweepLayout(tmp_path / "tiny")
    command = [
        sys.executable,
        "-m",
        "protomem.cli",
        "sweep",
        str(sweep_file),
        "--out",
        str(layout.root),
        "--cpus",
        "2",
        "--no-progress",
        "--no-report",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # 1) start the sweep; once some point has evaluated (and checkpointed) twice but not finished, kill the
    #    whole sweep (driver, Ray and its workers: the process group), as a power cut or `kill -9` would.
    process = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    victim = None
    deadline = time.monotonic() + 900
    while victim is None and time.monotonic() < deadline and process.poll() is None:
        for point in points:
            run_dir = layout.run_dir(point.name)
            if len(evaluations(run_dir)) >= 2 and not is_complete(run_dir):
                victim = point.name
                break
        time.sleep(0.1)
    assert victim is not None, process.communicate()[0] if process.poll() is not None else "no checkpoint"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not is_complete(layout.run_dir(victim))
    evaluated_before = evaluations(layout.run_dir(victim))
    finished_before = {p.name for p in points if is_complete(layout.run_dir(p.name))}
    summaries_before = {n: (layout.run_dir(n) / "summary.json").read_bytes() for n in finished_before}

    # 2) re-run: finished points are skipped, the killed one resumes from its checkpoint
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(finished_before)} already finished" in done.stderr
    for name, before in summaries_before.items():
        assert (layout.run_dir(name) / "summary.json").read_bytes() == before  # not recomputed
    starts = [e for e in read_attempts(layout.attempts_path(victim)) if e["event"] == "start"]
    assert [s["resume"] for s in starts] == [False, True]
    # the killed point resumed: evaluations finished before the kill were kept, not recomputed (the one
    # in progress at the kill may be redone)
    evaluated_after = evaluations(layout.run_dir(victim))
    kept = [step for step, mtime in evaluated_before.items() if evaluated_after.get(step) == mtime]
    assert len(kept) >= len(evaluated_before) - 1 >= 1
    assert len(evaluated_after) == len(spec.base.overrides["evaluation.eval_steps"])

    con = duckdb.connect(str(layout.database), read_only=True)
    rows = con.execute("SELECT point, status, resumed FROM points").fetchall()
    dup = con.execute(
        "SELECT point, step, count(*) c FROM checkpoints GROUP BY point, step HAVING c > 1"
    ).fetchall()
    n_points = con.execute("SELECT count(DISTINCT point) FROM checkpoints").fetchone()[0]
    con.close()
    assert sorted(r[0] for r in rows) == sorted(p.name for p in points)  # every point exactly once
    assert all(r[1] == "complete" for r in rows)
    assert dict((r[0], r[2]) for r in rows)[victim] is True
    assert dup == [] and n_points == 4

    # 3) a third run has nothing to do
    third = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0 and "4 already finished" in third.stderr

    # 4) the report of the real sweep, which fits a laptop and a phone screen
    report = subprocess.run(
        [sys.executable, "-m", "protomem.cli", "sweep", "report", str(layout.root)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert report.returncode == 0, report.stderr
    if chromium_path() is not None:
        seen = render_report(layout.report, tmp_path / "sweep.png")
        assert seen["images"] >= 3 and "τ_mem" in seen["text"]


def recording_runner(config, out_dir, *, resume=False, overwrite=False, progress=True):
    """Stand-in for run_condition on a real study config: records the Ray resources the task was given."""
    import ray

    fake = FakeCondition(n_train=config.data.n_train, n_evals=3)
    fake_run_condition(fake, out_dir, resume=resume, overwrite=overwrite, progress=progress)
    seen = {
        "resources": ray.get_runtime_context().get_assigned_resources(),
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "device": config.diffusion.device,
    }
    (Path(out_dir) / "resources.json").write_text(json.dumps(seen))
    return Path(out_dir)


def test_a_cuda_sweep_asks_ray_for_gpus_without_a_gpu_present(tmp_path, monkeypatch):
    import ray

    monkeypatch.setenv("PYTHONPATH", f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    spec = spec_from_dict(
        {"base": {"preset": "quick"}, "device": "cuda", "num_gpus": 0.5, "grid": {"data.n_train": [16, 32]}},
        path=tmp_path / "gpu.yaml",
    )
    # a local Ray that believes it has one GPU: it schedules by the declared resource, no hardware needed
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        result = run_sweep(spec, tmp_path / "sweep", progress=False, condition_runner=recording_runner)
    finally:
        ray.shutdown()
    assert sorted(result.completed) == sorted(p.name for p in expand_points(spec))
    for name in result.completed:
        seen = json.loads((SweepLayout(tmp_path / "sweep").run_dir(name) / "resources.json").read_text())
        assert seen["resources"] == {"CPU": 1.0, "GPU": 0.5}
        assert seen["visible"] == "0" and seen["device"] == "cuda"
