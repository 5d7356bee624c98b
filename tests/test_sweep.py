"""Sweep machinery without Ray: sweep files, point names, onsets and fits, gathering, query, report, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from protomem.errors import ProtomemError
from protomem.sweep.gather import gather
from protomem.sweep.layout import SweepLayout, is_complete, read_attempts
from protomem.sweep.onsets import fit_power_law, onset_step
from protomem.sweep.runner import RAY_MISSING, prepare_sweep_dir, require_ray, run_point
from protomem.sweep.spec import expand_points, load_spec, point_name, spec_from_dict
from tests.test_sweep_support import FakeCondition, eval_steps, fake_run_condition, fractions, true_tau_mem

PROTOMEM = [sys.executable, "-m", "protomem.cli"]


# --- sweep files and points -------------------------------------------------------------------------


def test_grid_is_a_cartesian_product_plus_listed_points_without_duplicates():
    spec = spec_from_dict(
        {
            "grid": [{"data.n_train": [32, 64, 128], "seed": [0, 1]}, {"data.n_train": [32], "seed": [0]}],
            "points": [{"grammar.zipf_exponent": 1.0}, {"seed": 0, "data.n_train": 32}],
        },
        path="s.yaml",
    )
    points = expand_points(spec)
    params = [p.params for p in points]
    assert len(points) == 3 * 2 + 1  # the second grid and the last listed point repeat (32, 0)
    assert {"data.n_train": 128, "seed": 1} in params
    assert {"grammar.zipf_exponent": 1.0} in params
    assert len({p.name for p in points}) == len(points)
    assert spec.name == "s"


def test_grid_groups_vary_several_keys_together():
    spec = spec_from_dict(
        {
            "grid": {
                "data.n_train": [32, 64],
                "seeds": [{"grammar.seed": 0, "data.seed": 10}, {"grammar.seed": 1, "data.seed": 11}],
            }
        }
    )
    params = [p.params for p in expand_points(spec)]
    assert len(params) == 4
    assert {"data.n_train": 64, "grammar.seed": 1, "data.seed": 11} in params
    assert all(p["data.seed"] == p["grammar.seed"] + 10 for p in params)
    clash = spec_from_dict({"grid": {"data.seed": [1], "seeds": [{"data.seed": 2}]}})
    with pytest.raises(ProtomemError, match="sets 'data.seed' twice"):
        expand_points(clash)
    with pytest.raises(ProtomemError, match="not a dotted config key"):
        spec_from_dict({"grid": {"seeds": [{"bad key": 1}]}})


def test_point_names_depend_only_on_the_parameters():
    a = point_name({"data.n_train": 64, "seed": 1})
    assert a == point_name({"seed": 1, "data.n_train": 64})
    assert a.startswith("n_train=64,seed=1-")
    assert a != point_name({"data.n_train": 64, "seed": 2})
    # same last component under two sections: the full key is kept
    b = point_name({"grammar.seed": 0, "train.seed": 0})
    assert b.startswith("grammar_seed=0,train_seed=0-")
    # values that are not file-name safe are sanitised, and the hash keeps them apart
    c, d = point_name({"x.tag": "a/b"}), point_name({"x.tag": "a_b"})
    assert "/" not in c and c != d
    assert point_name({"grammar.zipf_levels": [0, 1]}).startswith("zipf_levels=0-1-")
    assert point_name({}) == "base"


def test_sweep_file_errors_name_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid:\n  data.n_train: [32, 64]\nbogus: 1\n")
    with pytest.raises(ProtomemError, match="bogus: unknown key") as info:
        load_spec(bad)
    assert str(bad) in str(info.value)
    bad.write_text("grid:\n  'not a key': [1]\n")
    with pytest.raises(ProtomemError, match="not a dotted config key"):
        load_spec(bad)
    bad.write_text("grid:\n  data.n_train: []\n")
    with pytest.raises(ProtomemError, match="has no values"):
        load_spec(bad)
    bad.write_text("grid: [1, 2\n")
    with pytest.raises(ProtomemError, match="not valid YAML") as info:
        load_spec(bad)
    assert "line" in str(info.value)
    with pytest.raises(ProtomemError, match="no such sweep file"):
        load_spec(tmp_path / "missing.yaml")


def test_example_sweep_files_are_valid():
    root = Path(__file__).resolve().parents[1] / "examples" / "sweeps"
    scaling = load_spec(root / "scaling.yaml")
    sizes = sorted({v for p in expand_points(scaling) for k, v in p.params.items() if k.endswith("n_train")})
    assert len(sizes) >= 5 and sizes[-1] / sizes[0] >= 16
    assert all(len([p for p in expand_points(scaling) if size in p.params.values()]) >= 2 for size in sizes)
    zipf = load_spec(root / "zipf.yaml")
    exponents = {v for p in expand_points(zipf) for k, v in p.params.items() if k.endswith("zipf_exponent")}
    assert min(exponents) == 0 and max(exponents) == 2
    tiny = load_spec(root / "tiny.yaml")
    assert len(expand_points(tiny)) == 4 and tiny.base.preset == "quick"


# --- onsets and fits ----------------------------------------------------------------------------------


def test_onset_step_interpolates_in_log_step():
    steps = np.array([1, 10, 100, 1000])
    values = np.array([0.0, 0.0, 0.2, 0.6])
    # crosses 0.4 halfway (in value) between steps 100 and 1000: log-midpoint = 10^2.5
    assert onset_step(steps, values, 0.4) == pytest.approx(10**2.5)
    assert onset_step(steps, values, 0.6) == pytest.approx(1000)
    assert onset_step(steps, values, 0.0) == 1  # already there at the first evaluation
    assert np.isnan(onset_step(steps, values, 0.7))
    # order of the rows does not matter, NaNs are ignored
    assert onset_step(steps[::-1], values[::-1], 0.4) == pytest.approx(10**2.5)
    assert onset_step(steps, np.array([np.nan, 0.0, 0.2, 0.6]), 0.4) == pytest.approx(10**2.5)


def test_power_law_fit_recovers_a_known_slope_with_an_interval():
    rng = np.random.default_rng(0)
    sizes = np.repeat([16, 32, 64, 128, 256], 2)
    taus = 3.0 * sizes**1.0 * np.exp(rng.normal(scale=0.1, size=sizes.size))
    fit = fit_power_law(sizes, taus)
    assert fit is not None and fit.method == "bootstrap-t over runs"
    assert fit.slope == pytest.approx(1.0, abs=0.1)
    assert fit.ci_low < fit.slope < fit.ci_high and fit.ci_low > 0.8 and fit.ci_high < 1.2
    flat = fit_power_law(sizes, np.full(sizes.size, 50.0) * np.exp(rng.normal(scale=0.1, size=sizes.size)))
    assert flat.ci_low < 0 < flat.ci_high
    # censored runs are left out and counted; one run per P -> bootstrap over runs
    taus_censored = taus.copy()
    taus_censored[-1] = np.nan
    fit = fit_power_law(sizes[::2], taus_censored[::2])
    assert fit.n_censored == 0 and fit.n_runs == 5 and fit.ci_low < fit.slope < fit.ci_high
    assert fit_power_law(sizes, taus_censored).n_censored == 1
    assert fit_power_law([16, 16], [10.0, 12.0]) is None
    two = fit_power_law([16, 32], [10.0, 20.0])
    assert two.slope == pytest.approx(1.0) and np.isnan(two.ci_low)
    two_sizes = fit_power_law([16, 16, 32, 32], [10.0, 11.0, 20.0, 23.0])  # no interval from 2 clusters
    assert np.isfinite(two_sizes.slope) and np.isnan(two_sizes.ci_low) and "3 or more" in two_sizes.method
    exact = fit_power_law([16, 32, 64], [10.0, 20.0, 40.0])  # no residual spread: percentile fallback
    assert exact.slope == pytest.approx(1.0) and exact.ci_low == pytest.approx(1.0)


# --- a sweep directory built without Ray -----------------------------------------------------------


def build_fake_sweep(tmp_path: Path, doc: dict, skip: set[str] = frozenset()) -> SweepLayout:
    """Prepare a sweep dir for ``doc`` (FakeCondition keys) and run its points in-process via run_point."""
    spec = spec_from_dict(doc, path=tmp_path / "fake.yaml")
    points = expand_points(spec)
    configs = {p.name: FakeCondition(**{k.split(".")[-1]: v for k, v in p.params.items()}) for p in points}
    layout = SweepLayout(tmp_path / "sweep")
    prepare_sweep_dir(spec, layout, points, {n: c.model_dump(mode="json") for n, c in configs.items()})
    for point in points:
        if point.name not in skip:
            run_point(
                fake_run_condition,
                configs[point.name],
                str(layout.run_dir(point.name)),
                str(layout.attempts_path(point.name)),
                1,
            )
    return layout


SCALING = {"grid": {"data.n_train": [16, 32, 64, 128, 256], "seed": [0, 1]}}


def test_run_point_logs_attempts_and_resumes_a_started_run(tmp_path):
    config = FakeCondition(n_train=16, fail_first=True)
    run_dir, log = tmp_path / "run", tmp_path / "attempts.jsonl"
    with pytest.raises(RuntimeError, match="injected failure"):
        run_point(fake_run_condition, config, str(run_dir), str(log), 1)
    assert not is_complete(run_dir)
    done_before = json.loads((run_dir / "state.json").read_text())["done"]
    info = run_point(fake_run_condition, config, str(run_dir), str(log), 2)
    assert info["resumed"] and is_complete(run_dir)
    events = read_attempts(log)
    assert [e["event"] for e in events] == ["start", "error", "start", "end"]
    assert [e["resume"] for e in events if e["event"] == "start"] == [False, True]
    # the resumed attempt continued after the evaluations already written
    assert 0 < done_before < eval_steps(config).size
    assert pq_rows(run_dir / "metrics.parquet") == eval_steps(config).size


def test_an_interrupted_point_is_incomplete_not_failed(tmp_path):
    from protomem.sweep.gather import point_status

    def interrupted(config, out_dir, **kwargs):
        fake_run_condition(config.model_copy(update={"n_evals": 3}), out_dir, **kwargs)
        (Path(out_dir) / "summary.json").unlink()  # as if stopped before the analysis finished
        raise KeyboardInterrupt

    run_dir, log = tmp_path / "run", tmp_path / "attempts.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_point(interrupted, FakeCondition(), str(run_dir), str(log), 1)
    events = read_attempts(log)
    assert [e["event"] for e in events] == ["start", "interrupted"]
    assert point_status(run_dir, events, None) == "incomplete"


def pq_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


def test_gather_writes_one_row_per_point_and_per_checkpoint(tmp_path):
    layout = build_fake_sweep(tmp_path, SCALING, skip={point_name({"data.n_train": 256, "seed": 1})})
    tables = gather(layout, mem_threshold=0.5)
    points, checkpoints = tables["points"], tables["checkpoints"]
    assert len(points) == 10 and points["point"].is_unique
    assert (points["status"] == "complete").sum() == 9 and (points["status"] == "pending").sum() == 1
    assert set(points.columns) >= {
        "n_train",
        "seed",
        "tau_mem",
        "tau_gen",
        "attempts",
        "rho",
        "verdict_p_value",
    }
    done = points[points["status"] == "complete"]
    for _, row in done.iterrows():
        config = FakeCondition(n_train=int(row["n_train"]), seed=int(row["seed"]))
        exact, _ = fractions(config, eval_steps(config))
        assert row["tau_mem"] == pytest.approx(onset_step(eval_steps(config), exact, 0.5))
        # the logistic is centred on the true τ_mem; log interpolation between evaluations lands near it
        assert row["tau_mem"] == pytest.approx(true_tau_mem(config), rel=0.25)
    assert len(checkpoints) == 9 * eval_steps(FakeCondition()).size
    assert checkpoints.groupby("point").size().eq(eval_steps(FakeCondition()).size).all()
    # the same tables in DuckDB and Parquet
    con = duckdb.connect(str(layout.database), read_only=True)
    n_db = con.execute("SELECT count(*) FROM points").fetchone()[0]
    n_examples = con.execute("SELECT count(*) FROM examples").fetchone()[0]
    con.close()
    assert n_db == 10 and n_examples == sum(FakeCondition(n_train=int(n)).n_train for n in done["n_train"])
    assert len(pd.read_parquet(layout.table_path("checkpoints"))) == len(checkpoints)
    # gathering again gives the same tables (each point once)
    again = gather(layout, mem_threshold=0.5)
    assert len(again["points"]) == 10 and len(again["checkpoints"]) == len(checkpoints)


def test_rerun_with_a_changed_config_is_refused_and_keeps_results(tmp_path):
    layout = build_fake_sweep(tmp_path, {"grid": {"data.n_train": [16]}})
    spec = spec_from_dict({"grid": {"data.n_train": [16]}}, path=tmp_path / "fake.yaml")
    points = expand_points(spec)
    changed = {points[0].name: FakeCondition(n_train=16, steps=999).model_dump(mode="json")}
    with pytest.raises(ProtomemError, match="different config.*steps: 2000 -> 999"):
        prepare_sweep_dir(spec, layout, points, changed)
    assert is_complete(layout.run_dir(points[0].name))


def test_bad_run_options_fail_before_any_work(tmp_path):
    from protomem.sweep.runner import run_sweep

    spec = spec_from_dict({"grid": {"data.n_train": [16]}})
    for kwargs, message in (
        ({"address": "10.0.0.1:6379", "num_cpus": 2}, "--cpus applies to a local Ray only"),
        ({"num_cpus": 0}, "--cpus must be at least 1"),
        ({"retries": -1}, "--retries must be at least 0"),
    ):
        with pytest.raises(ProtomemError, match=message):
            run_sweep(spec, tmp_path / "out", progress=False, configs={}, **kwargs)
    assert not (tmp_path / "out").exists()


def test_ray_missing_gives_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ProtomemError, match=r"pip install 'protomem\[sweep\]'"):
        require_ray()
    assert "protomem[sweep]" in RAY_MISSING


# --- query, report and the CLI ------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*PROTOMEM, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_query_prints_a_table_and_bad_sql_is_one_line(tmp_path):
    layout = build_fake_sweep(tmp_path, {"grid": {"data.n_train": [16, 64]}})
    gather(layout)
    done = run_cli("sweep", "query", str(layout.root), "SELECT n_train, status FROM points ORDER BY n_train")
    assert done.returncode == 0, done.stderr
    assert (
        "complete" in done.stdout and "16" in done.stdout and "64" in done.stdout and "2 rows" in done.stdout
    )
    bad = run_cli("sweep", "query", str(layout.root), "SELECT nope FROM points")
    assert bad.returncode == 2 and bad.stderr.startswith("error: query failed")
    assert len(bad.stderr.strip().splitlines()) == 1
    missing = run_cli("sweep", "report", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "no such sweep directory" in missing.stderr


def test_sweep_file_argument_means_run(tmp_path):
    help_text = run_cli("sweep", "--help").stdout
    assert "protomem sweep SWEEP.yaml" in help_text and "query" in help_text and "report" in help_text
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid:\n  data.n_train: [16]\nbogus: 1\n")
    done = run_cli("sweep", str(bad))
    assert done.returncode == 2 and "bogus: unknown key" in done.stderr
    typo = run_cli("sweep", "reprot", str(tmp_path))
    assert typo.returncode != 0 and "No such command" in typo.stderr
    tiny = Path(__file__).resolve().parents[1] / "examples" / "sweeps" / "tiny.yaml"
    plan = run_cli("sweep", str(tiny), "--dry-run", "--out", str(tmp_path / "tiny"))
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.count(" new ") + plan.stdout.count(" new\n") >= 1 and "4 points" in plan.stdout
    assert not (tmp_path / "tiny").exists()  # nothing written
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("base: {preset: quick}\ngrid:\n  data.nope: [1, 2]\n")
    done = run_cli("sweep", str(unknown), "--dry-run")
    assert done.returncode == 2 and "data.nope" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_report_from_scaling_and_zipf_sweeps(tmp_path):
    from tests.browser import chromium_path, render_report

    doc = {
        "grid": [
            {"data.n_train": [16, 32, 64, 128, 256], "seed": [0, 1]},
            {"grammar.zipf_exponent": [0.0, 1.0, 2.0], "grammar.zipf_levels": [[0, 1], [2, 3], None]},
        ]
    }
    layout = build_fake_sweep(tmp_path, doc)
    gather(layout)
    from protomem.sweep.report import build_report

    path = build_report(layout.root, mem_threshold=0.5, n_resamples=300)
    html = path.read_text()
    assert "τ_mem ∝ P" in html and "threshold" in html and "0.5" in html
    assert "top half" in html and "bottom half" in html
    assert html.count("<img") == 5  # τ vs P, trajectories, phase diagram, τ_mem vs Zipf, correlation vs Zipf
    # the fitted slope in the text is the one of the fake trajectories (τ_mem ∝ P)
    slope = float(html.split("τ_mem ∝ P<sup>b</sup> with slope ")[1].split(" ")[0])
    assert slope == pytest.approx(1.0, abs=0.15)
    # a stricter threshold changes τ without re-running
    stricter = build_report(
        layout.root,
        tmp_path / "strict.html",
        mem_threshold=0.9,
        n_resamples=300,
        figures_dir=tmp_path / "png",
    )
    assert stricter.read_text() != html
    assert sorted(p.stem for p in (tmp_path / "png").glob("*.png")) == sorted(
        ["onsets_vs_P", "trajectories", "phase", "tau_mem_vs_zipf", "rho_vs_zipf"]
    )
    if chromium_path() is not None:
        seen = render_report(path, tmp_path / "report.png")
        assert seen["images"] == 5 and seen["images_loaded"] == 5


# --- devices ------------------------------------------------------------------------------------------


def test_sweep_devices_are_validated_and_reach_every_point(tmp_path):
    from protomem.sweep.conditions import point_configs

    for doc, message in (
        ({"device": "cuda:1"}, "name it cuda"),
        ({"device": "gpu"}, "device must be auto, cpu, cuda or mps"),
        ({"num_gpus": -1}, "num_gpus"),
        ({"grid": {"diffusion.device": ["cuda:0"]}}, "point device=cuda_0.*name it cuda"),
    ):
        with pytest.raises(ProtomemError, match=message):
            spec = spec_from_dict(doc, path=tmp_path / "s.yaml")
            point_configs(spec, expand_points(spec))
    spec = spec_from_dict({"device": "cuda", "grid": {"data.n_train": [16, 32]}}, path=tmp_path / "s.yaml")
    configs = point_configs(spec, expand_points(spec))  # no GPU needed to plan a GPU sweep
    assert {c.diffusion.device for c in configs.values()} == {"cuda"}
    assert {c.diffusion.threads for c in configs.values()} == {1}
    mixed = spec_from_dict({"grid": {"diffusion.device": ["cpu", "cuda"]}}, path=tmp_path / "m.yaml")
    assert sorted(c.diffusion.device for c in point_configs(mixed, expand_points(mixed)).values()) == [
        "cpu",
        "cuda",
    ]


@pytest.mark.parametrize(
    ("device", "num_gpus", "cluster_gpus", "gpus"),
    [
        ("cuda", None, 0, 1.0),  # asked for even where the cluster has none: Ray then waits for a GPU node
        ("cuda", 0.5, 4, 0.5),
        ("cuda", 2, 4, 2.0),
        ("cpu", 1, 4, 0.0),  # num_gpus concerns CUDA points only
        ("mps", None, 0, 0.0),
        ("auto", None, 2, 1.0),  # auto runs on a GPU where the cluster has one
        ("auto", 0.25, 2, 0.25),
        ("auto", None, 0, 0.0),
    ],
)
def test_a_cuda_point_asks_ray_for_its_gpus(device, num_gpus, cluster_gpus, gpus):
    from protomem.sweep.spec import ray_resources

    assert ray_resources(device, num_gpus, cluster_gpus) == {"num_cpus": 1, "num_gpus": gpus}


def test_a_point_may_resume_on_another_device(tmp_path):
    layout = build_fake_sweep(tmp_path, {"grid": {"data.n_train": [16]}})
    spec = spec_from_dict({"grid": {"data.n_train": [16]}}, path=tmp_path / "fake.yaml")
    points = expand_points(spec)
    name = points[0].name
    # the manifest of a sweep run before devices existed: its configs have no diffusion.device
    manifest = json.loads(layout.manifest.read_text())
    old = {**manifest["points"][0]["config"], "diffusion": {"width": 8}}
    manifest["points"][0]["config"] = old
    layout.manifest.write_text(json.dumps(manifest))
    prepare_sweep_dir(spec, layout, points, {name: {**old, "diffusion": {"width": 8, "device": "cuda"}}})
    with pytest.raises(ProtomemError, match=r"diffusion.width: 8 -> 7"):
        prepare_sweep_dir(spec, layout, points, {name: {**old, "diffusion": {"width": 7, "device": "cpu"}}})
