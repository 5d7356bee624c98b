"""Sweeps that lose nothing on a cluster (issue 13): absolute output paths, workers that check they see
the sweep, a driver that trusts only results it can read, errors recorded for every failed attempt,
the Ray node of every attempt, a wrong --address that fails fast.

The fast tests use a local Ray and stand-in runners; the slow one starts a real two-node cluster on this
machine (``ray start --head`` and ``ray start --address``), one node unable to see part of the disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import pytest

from protomem.sweep.layout import SweepLayout, read_attempts
from protomem.sweep.runner import NodeCannotSeeSweep, check_sees_sweep, run_point, run_sweep
from protomem.sweep.spec import expand_points, spec_from_dict
from tests.cli_runner import invoke
from tests.test_fuzz import TINY_CONDITION
from tests.test_sweep_support import FakeCondition, fake_run_condition

ray = pytest.importorskip("ray")
REPO = Path(__file__).resolve().parents[1]


def dies(config, out_dir, *, resume=False, overwrite=False, progress=True):
    """A runner whose worker process dies outright (killed, out of memory): it can log nothing."""
    os._exit(3)


@pytest.fixture(scope="module")
def local_ray():
    """One private local Ray for the fast tests (run_sweep reuses a running Ray and leaves it up)."""
    os.environ["PYTHONPATH"] = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=100 * 1024**2,
    )
    yield
    ray.shutdown()


def sweep_of(tmp_path: Path, n_points: int = 2, retries: int = 0):
    spec = spec_from_dict(
        {"grid": {"data.n_train": [16, 32, 48][:n_points]}, "retries": retries}, path=tmp_path / "fake.yaml"
    )
    points = expand_points(spec)
    return spec, points


def points_table(layout: SweepLayout) -> dict[str, dict]:
    con = duckdb.connect(str(layout.database), read_only=True)
    try:
        frame = con.execute("SELECT * FROM points").fetch_df()
    finally:
        con.close()
    return {row["point"]: row for row in frame.to_dict("records")}


def test_a_relative_out_is_made_absolute_and_attempts_record_the_node(local_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec, points = sweep_of(tmp_path)
    configs = {p.name: FakeCondition(n_train=p.params["data.n_train"]) for p in points}
    result = run_sweep(
        spec, Path("sweeps") / "rel", progress=False, condition_runner=fake_run_condition, configs=configs
    )
    assert result.layout.root == tmp_path / "sweeps" / "rel" and result.layout.root.is_absolute()
    assert sorted(result.completed) == sorted(p.name for p in points) and result.failed == {}
    nodes = {n["NodeID"] for n in ray.nodes()}
    for point in points:
        starts = [e for e in read_attempts(result.layout.attempts_path(point.name)) if e["event"] == "start"]
        assert len(starts) == 1 and starts[0]["node"] in nodes
    table = points_table(result.layout)
    assert {row["status"] for row in table.values()} == {"complete"}
    assert all(row["last_node"] in nodes for row in table.values())


class _Ref:
    def __init__(self, run) -> None:
        self.value, self.error = None, None
        try:
            self.value = run()
        except Exception as exc:  # handed to the driver by get(), as Ray does
            self.error = exc


class MirrorRay:
    """A stand-in for Ray whose one node has its own copy of the sweep directory (say, rsync'ed there
    instead of shared): the manifest is there, so the worker starts, but it writes its results where
    the driver never looks."""

    def __init__(self, root: Path, mirror: Path) -> None:
        self.root, self.mirror = str(root), str(mirror)

    def is_initialized(self) -> bool:
        return True

    def cluster_resources(self) -> dict:
        return {"CPU": 1}

    def remote(self, **_options):
        def wrap(function):
            outer = self

            class Remote:
                @staticmethod
                def options(**_resources):  # Ray's per-task resources (GPUs for CUDA points)
                    return Remote

                @staticmethod
                def remote(*args):
                    moved = [a.replace(outer.root, outer.mirror) if isinstance(a, str) else a for a in args]
                    Path(outer.mirror).mkdir(parents=True, exist_ok=True)
                    shutil.copy(Path(outer.root) / "manifest.json", Path(outer.mirror) / "manifest.json")
                    return _Ref(lambda: function(*moved))

            return Remote

        return wrap

    def wait(self, refs, num_returns=1, timeout=None):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        if ref.error is not None:
            raise ref.error
        return ref.value


def test_a_point_is_finished_only_when_its_results_are_there(tmp_path, monkeypatch):
    from protomem.sweep import runner

    spec, points = sweep_of(tmp_path, n_points=1, retries=1)
    configs = {p.name: FakeCondition(n_train=p.params["data.n_train"]) for p in points}
    monkeypatch.setattr(runner, "require_ray", lambda: MirrorRay(tmp_path / "sweep", tmp_path / "node-copy"))
    result = run_sweep(
        spec, tmp_path / "sweep", progress=False, condition_runner=fake_run_condition, configs=configs
    )
    name = points[0].name
    assert result.completed == [] and name in result.failed and result.attempts[name] == 2
    assert "results are not in" in result.failed[name]
    row = points_table(result.layout)[name]
    assert row["status"] == "failed" and "results are not in" in row["last_error"] and row["attempts"] == 2


def test_a_worker_that_dies_with_no_retries_left_has_its_error_recorded(local_ray, tmp_path):
    spec, points = sweep_of(tmp_path, n_points=1, retries=0)
    configs = {p.name: FakeCondition(n_train=p.params["data.n_train"]) for p in points}
    result = run_sweep(spec, tmp_path / "sweep", progress=False, condition_runner=dies, configs=configs)
    name = points[0].name
    assert list(result.failed) == [name]
    row = points_table(result.layout)[name]
    assert row["status"] == "failed" and row["last_error"], row  # was 'incomplete' with no error
    errors = [e for e in read_attempts(result.layout.attempts_path(name)) if e["event"] == "error"]
    assert len(errors) == 1 and errors[0]["recorded_by"] == "driver" and errors[0]["attempt"] == 1


def test_a_worker_that_cannot_see_the_sweep_writes_nothing(tmp_path):
    manifest = tmp_path / "sweep" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({"session": "this-run"}))
    check_sees_sweep(manifest, "this-run")
    for path, session in ((manifest, "another-run"), (tmp_path / "elsewhere" / "manifest.json", "this-run")):
        with pytest.raises(NodeCannotSeeSweep, match="does not see the sweep directory"):
            check_sees_sweep(path, session)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(NodeCannotSeeSweep):
        run_point(
            fake_run_condition,
            FakeCondition(),
            str(tmp_path / "sweep" / "runs" / "p"),
            str(tmp_path / "sweep" / "attempts" / "p.jsonl"),
            1,
            str(manifest),
            "another-run",
        )
    assert sorted(tmp_path.rglob("*")) == before


def test_sweep_help_keeps_its_defaults():
    result = invoke("sweep", "run", "--help")
    text = " ".join(result.stdout.split())
    assert result.code == 0
    for default in ("default: (2)", "default: (runs/sweeps/<sweep name>)", "default: (all cores)"):
        assert default in text.replace("│ ", "").replace(" │", ""), text


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sweep_at(address: str, tmp_path: Path, timeout: float) -> subprocess.CompletedProcess:
    """``protomem sweep`` of a one-point sweep joining ``address`` (in a child process)."""
    sweep = tmp_path / "s.yaml"
    sweep.write_text(json.dumps({"grid": {"data.n_train": [16]}}))
    command = ["sweep", str(sweep), "--address", address, "--out", str(tmp_path / "out"), "--no-progress"]
    return subprocess.run(
        [sys.executable, "-m", "protomem.cli", *command], capture_output=True, text=True, timeout=timeout
    )


def test_a_wrong_address_fails_fast_naming_it(tmp_path):
    address = f"127.0.0.1:{_closed_port()}"
    done = sweep_at(address, tmp_path, timeout=120)  # before: Ray retried for about 14 minutes
    assert done.returncode == 2 and address in done.stderr.splitlines()[-1], done.stderr


@pytest.mark.slow
def test_an_address_that_is_not_ray_fails_within_the_join_timeout(tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()  # accepts connections and never answers, like a wrong port of another service
    address = f"127.0.0.1:{server.getsockname()[1]}"
    try:
        done = sweep_at(address, tmp_path, timeout=300)
    finally:
        server.close()
    last = done.stderr.splitlines()[-1]
    assert done.returncode == 2 and address in last and "RAY_AUTH_MODE=token" in last, done.stderr


# --- a real two-node cluster on this machine --------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class Cluster:
    """A head node and a worker node started with ``ray start --block`` (each in its own process group,
    torn down by signalling exactly those groups). The worker node may run in a private mount namespace
    in which ``hidden`` is an empty tmpfs: it cannot see what the head and the driver see there."""

    def __init__(self, root: Path, hidden: Path | None) -> None:
        self.root, self.hidden, self.processes = root, hidden, []
        root.mkdir(parents=True)
        # Ray's socket paths must stay under 107 bytes: its session folder goes under a short name
        self.ray_dir = Path(tempfile.mkdtemp(prefix="pm-ray-", dir="/tmp"))
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
            "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        }
        self.ports = _free_ports(16)
        self.address = f"{socket.gethostbyname(socket.gethostname())}:{self.ports[0]}"

    def start(self) -> None:
        ports, hidden = self.ports, self.hidden
        ray_cli = str(Path(sys.executable).with_name("ray"))
        head = [
            "--head",
            f"--port={ports[0]}",
            f"--ray-client-server-port={ports[1]}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={self.ray_dir}",
            *self._node_ports(ports[2:8]),
        ]
        self._start([ray_cli, "start", *head], "head")
        self._wait_for_nodes(1)
        prefix: list[str] = []
        if hidden is not None:
            script = 'mount -t tmpfs tmpfs "$0" && exec "$@"'
            prefix = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(hidden)]
        self._start(
            [*prefix, ray_cli, "start", f"--address={self.address}", *self._node_ports(ports[8:14])], "worker"
        )
        self._wait_for_nodes(2)

    @staticmethod
    def _node_ports(ports: list[int]) -> list[str]:
        return [
            "--num-cpus=1",
            "--object-store-memory=80000000",
            f"--node-manager-port={ports[0]}",
            f"--object-manager-port={ports[1]}",
            f"--dashboard-agent-listen-port={ports[2]}",
            f"--dashboard-agent-grpc-port={ports[3]}",
            f"--runtime-env-agent-port={ports[4]}",
            f"--metrics-export-port={ports[5]}",
        ]

    def _start(self, command: list[str], name: str) -> None:
        cwd = self.root / name  # each node starts elsewhere than the driver: relative paths would differ
        cwd.mkdir()
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        self.processes.append(
            subprocess.Popen(
                [*command, "--block"],
                cwd=cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    def _wait_for_nodes(self, count: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        host, port = self.address.rsplit(":", 1)
        while True:  # the head's GCS port first: Ray's own connect retries for minutes
            try:
                socket.create_connection((host, int(port)), timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.processes[0].poll() is not None:
                    raise RuntimeError(f"the head did not start; see {self.root}/head.log") from None
                time.sleep(1)
        probe = (
            f"import ray; ray.init(address={self.address!r}, log_to_driver=False); "
            "print(sum(n['Alive'] for n in ray.nodes()))"
        )
        while time.monotonic() < deadline:
            try:
                done = subprocess.run(
                    [sys.executable, "-c", probe], env=self.env, capture_output=True, text=True, timeout=120
                )
            except subprocess.TimeoutExpired:
                continue
            if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
            time.sleep(2)
        raise RuntimeError(f"the cluster did not reach {count} node(s); see {self.root}/*.log")

    def stop(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=20)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(self.ray_dir, ignore_errors=True)


TINY_SWEEP = {
    "name": "cluster",
    "base": {"preset": "quick", "condition": 0, "overrides": {**TINY_CONDITION, "diffusion.steps": 60}},
    "grid": {"data.n_train": [16, 24], "diffusion.seed": [0, 1]},
    "retries": 0,
}
TINY_SWEEP["base"]["overrides"].pop("data.n_train")
TINY_SWEEP["base"]["overrides"]["evaluation.eval_steps"] = [20, 60]


def _statuses(sweep_dir: Path) -> dict[str, tuple]:
    con = duckdb.connect(str(sweep_dir / "sweep.duckdb"), read_only=True)
    try:
        rows = con.execute("SELECT point, status, last_error, last_node FROM points").fetchall()
    finally:
        con.close()
    return {row[0]: row[1:] for row in rows}


@pytest.mark.slow
def test_a_two_node_cluster_finishes_every_point_and_a_blind_node_fails_loudly(tmp_path):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("hiding a folder from one node needs root and unshare (a private mount namespace)")
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    driver = tmp_path / "driver"
    driver.mkdir()
    (driver / "sweep.yaml").write_text(json.dumps(TINY_SWEEP))
    cluster = Cluster(tmp_path / "cluster", hidden=hidden)
    try:
        cluster.start()
        command = [
            sys.executable,
            "-m",
            "protomem.cli",
            "sweep",
            "sweep.yaml",
            "--address",
            cluster.address,
            "--no-progress",
            "--no-report",
        ]

        def sweep(out: str, env: dict[str, str] = cluster.env) -> subprocess.CompletedProcess:
            return subprocess.run(
                [*command, "--out", out], cwd=driver, env=env, capture_output=True, text=True, timeout=3600
            )

        # 1) both nodes see the output folder: a relative --out (resolved by the driver) loses nothing
        done = sweep("runs/rel")
        assert done.returncode == 0, done.stdout + done.stderr
        statuses = _statuses(driver / "runs" / "rel")
        assert len(statuses) == 4 and {s[0] for s in statuses.values()} == {"complete"}, statuses
        assert len({s[2] for s in statuses.values()}) == 2  # the points ran on both nodes
        assert not list((cluster.root / "worker").rglob("manifest.json"))  # nothing under a node's cwd

        # 2) the worker node cannot see the output folder: its points fail loudly, the others finish
        done = sweep(str(hidden / "sweep"))
        assert done.returncode == 1, done.stdout + done.stderr
        assert "does not see the sweep directory" in done.stderr and "not complete" in done.stderr
        statuses = _statuses(hidden / "sweep")
        failed = {p: s for p, s in statuses.items() if s[0] != "complete"}
        assert failed and all(s[0] == "failed" and "does not see" in s[1] for s in failed.values()), statuses

        # 3) joining without the cluster's token names the fix
        env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
        done = sweep("runs/auth", env)
        assert done.returncode == 2 and "RAY_AUTH_MODE=token" in done.stderr.splitlines()[-1], done.stderr
    finally:
        cluster.stop()
    leftovers = subprocess.run(["pgrep", "-f", str(cluster.ray_dir)], capture_output=True, text=True).stdout
    assert leftovers.strip() == "", leftovers
