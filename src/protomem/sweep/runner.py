"""Run every point of a sweep as a Ray task, retrying failed or killed points, never redoing finished ones.

The driver validates all points, writes the manifest (with a fresh session id), skips finished points,
and submits one Ray task per remaining point (``num_cpus=1``, plus ``num_gpus`` for a CUDA point; the
task pins torch to one thread, so N cores run N points without oversubscription). A task that raises or
whose worker dies (killed, out of memory) is resubmitted up to ``retries`` times; the new attempt calls
``run_condition(..., resume=True)`` on the same run directory and continues from the point's last
checkpoint. Without ``address`` a private local Ray is started with all cores (or ``num_cpus``) and shut
down at the end, also on errors and Ctrl-C.

On a cluster every node must see the sweep directory at the same absolute path. A worker first checks
that it sees this session's manifest and otherwise fails the attempt without writing anything; the
driver counts a point finished only when the point's results are in the sweep directory it sees, and
records every failed attempt's error itself (a worker that died or cannot see the directory cannot).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from protomem.errors import ProtomemError
from protomem.outputs import check_output_dir
from protomem.sweep.conditions import point_device
from protomem.sweep.layout import (
    SweepLayout,
    append_attempt,
    has_started,
    is_complete,
    read_attempts,
    read_manifest,
    write_manifest,
)
from protomem.sweep.spec import SweepPoint, SweepSpec, expand_points, ray_resources

RAY_MISSING = "Ray is not installed; sweeps need it: pip install 'protomem[sweep]'"
JOIN_TIMEOUT_S = 30.0  # joining a cluster given by --address fails after this long
AUTH_HINT = (
    "the cluster uses token authentication: set RAY_AUTH_MODE=token and its token "
    "(RAY_AUTH_TOKEN=..., or the file ~/.ray/auth_token; `ray get-auth-token` on the head prints it)"
)


class NodeCannotSeeSweep(ProtomemError):
    """A worker's node does not see the sweep directory (no shared filesystem at the same path)."""


# (config, out_dir, *, resume, progress) -> run directory; default protomem.study.pipeline.run_condition.
ConditionRunner = Callable[..., Any]


@dataclass
class SweepResult:
    """What one ``run_sweep`` call did.

    Attributes:
        skipped: points already finished before this call (not run again).
        completed: points finished by this call.
        failed: point -> one-line error of its last attempt (points that exhausted their retries).
        attempts: point -> attempts made by this call.
        seconds: wall time of the call.
    """

    layout: SweepLayout
    points: list[SweepPoint]
    skipped: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def require_ray() -> Any:
    """The ray module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ProtomemError(RAY_MISSING) from None
    return ray


def check_sees_sweep(manifest: Path, session: str) -> None:
    """Raise :class:`NodeCannotSeeSweep` unless this process sees the manifest of this sweep session."""
    try:
        doc = json.loads(Path(manifest).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        doc = None
    if not isinstance(doc, dict) or doc.get("session") != session:
        raise NodeCannotSeeSweep(
            f"node {socket.gethostname()} (Ray node {_node_id() or '?'}) does not see the sweep directory "
            f"{Path(manifest).parent} (every node must see it at the same path: a shared filesystem)"
        )


def _node_id() -> str | None:
    """The Ray node id of this worker (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # an older Ray without the runtime context, or not in a task
        return None


def run_point(
    runner: ConditionRunner | None,
    config: Any,
    run_dir: str,
    attempts_path: str,
    attempt: int,
    manifest_path: str | None = None,
    session: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) one point; executed inside a Ray worker with one CPU.

    First checks that this node sees the sweep (``manifest_path`` holding ``session``), and fails
    without writing anything if not. A run directory holding ``config.yaml`` (written by the study once
    the setup is done) is resumed; a non-empty one without it was killed during setup and is started
    afresh (nothing finished is in it). Logs the attempt's start (pid, host, Ray node, whether it
    resumes) and its end or error to ``attempts_path``.
    Returns {"seconds": wall time of this attempt, "resumed": bool, "node": Ray node id}.
    """
    if manifest_path is not None and session is not None:
        check_sees_sweep(Path(manifest_path), session)
    import torch

    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):  # allowed once per process; Ray reuses worker processes
        torch.set_num_interop_threads(1)
    if runner is None:
        from protomem.study.pipeline import run_condition as runner
    path = Path(run_dir)
    resume = (path / "config.yaml").is_file()
    restart = not resume and has_started(path)
    log = Path(attempts_path)
    node = _node_id()
    append_attempt(log, "start", attempt=attempt, resume=resume, restart_after_setup=restart, node=node)
    start = time.perf_counter()
    try:
        runner(config, path, resume=resume, overwrite=restart, progress=False)
    except (KeyboardInterrupt, SystemExit):  # the sweep was stopped (Ctrl-C, Ray shutting down)
        append_attempt(log, "interrupted", attempt=attempt)
        raise
    except BaseException as exc:
        append_attempt(
            log,
            "error",
            attempt=attempt,
            error=f"{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc()[-4000:],
        )
        raise
    seconds = time.perf_counter() - start
    if not is_complete(path):
        message = "run_condition returned but summary.json does not say status: complete"
        append_attempt(log, "error", attempt=attempt, error=message)
        raise RuntimeError(message)
    append_attempt(log, "end", attempt=attempt, seconds=seconds)
    return {"seconds": seconds, "resumed": resume, "node": node}


# Config keys a point may change between runs: a point started on one device can finish on another.
RESUME_FREE_KEYS = frozenset({"diffusion.device"})


def _config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        if f"{prefix}{key}" in RESUME_FREE_KEYS:
            continue
        a, b = old.get(key, "<missing>"), new.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(_config_diff(a, b, f"{prefix}{key}."))
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


def check_existing_configs(
    layout: SweepLayout, points: list[SweepPoint], config_dicts: dict[str, dict[str, Any]]
) -> dict[str, Any] | None:
    """Refuse points whose run directory was started with another config; return the old manifest."""
    previous = read_manifest(layout)
    old_points = {p["name"]: p for p in previous["points"]} if previous else {}
    for point in points:
        old = old_points.get(point.name)
        if old is None or not has_started(layout.run_dir(point.name)):
            continue
        diffs = _config_diff(old.get("config", {}), config_dicts[point.name])
        if diffs:
            raise ProtomemError(
                f"point {point.name} was run with a different config ({'; '.join(diffs[:3])}); "
                "its results are kept: use another --out directory for the changed sweep",
                path=layout.root,
            )
    return previous


def prepare_sweep_dir(
    spec: SweepSpec,
    layout: SweepLayout,
    points: list[SweepPoint],
    config_dicts: dict[str, dict[str, Any]],
    spec_text: str | None = None,
    session: str | None = None,
) -> None:
    """Check that existing run directories belong to these configs, then write manifest and sweep.yaml.

    ``session`` (a fresh id per run of the sweep) goes into the manifest: workers check they see it.

    Raises:
        ProtomemError: a point already in the directory was run with a different config (the sweep file
            or the study defaults changed); its results are kept, so choose another --out.
    """
    previous = check_existing_configs(layout, points, config_dicts)
    names = {p.name for p in points}
    retired = [p for p in (previous or {}).get("points", []) if p["name"] not in names]
    retired += [p for p in (previous or {}).get("retired_points", []) if p["name"] not in names]
    layout.root.mkdir(parents=True, exist_ok=True)
    write_manifest(
        layout,
        {
            "name": spec.name,
            "description": spec.description,
            "base": spec.base.model_dump(mode="json"),
            "swept_keys": sorted({key for p in points for key in p.params}),
            "points": [{"name": p.name, "params": p.params, "config": config_dicts[p.name]} for p in points],
            "retired_points": retired,
            "session": session,
        },
    )
    from protomem.io import write_text_atomic

    if spec_text is None:
        spec_text = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    if not (layout.sweep_file.is_file() and layout.sweep_file.read_text(encoding="utf-8") == spec_text):
        write_text_atomic(layout.sweep_file, spec_text)  # (never rewrites the input it was read from)


def _init_ray(ray: Any, address: str | None, num_cpus: int | None) -> bool:
    """Start a private local Ray (or join ``address``). Returns True if this call started it."""
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "log_to_driver": False,
        "configure_logging": True,
    }
    if address:
        join_cluster(ray, address, options)
    else:
        cpus = num_cpus if num_cpus is not None else os.cpu_count() or 1
        # "local" always starts a new instance, even if another user's `ray start` runs on this machine.
        # The tasks return a few numbers, so a small object store spares /dev/shm.
        ray.init(address="local", num_cpus=cpus, object_store_memory=128 * 1024**2, **options)
    return True


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of 'host:port' or 'ray://host:port'; None for 'auto' and the like."""
    rest = address.split("://", 1)[-1].rstrip("/")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def join_cluster(ray: Any, address: str, options: dict[str, Any], timeout: float = JOIN_TIMEOUT_S) -> None:
    """``ray.init(address=...)`` that fails within ``timeout`` seconds with one line naming the address.

    Ray itself retries a wrong address for many minutes and prints its reasons (a missing auth token
    among them) as a stream of warnings; here nothing answering at the address fails in seconds, and a
    join that does not complete in ``timeout`` s fails with the reason Ray logged, if it named one.
    """
    target = _host_port(address)
    if target is not None:
        try:
            socket.create_connection(target, timeout=min(5.0, timeout)).close()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ProtomemError(
                f"could not join the Ray cluster at {address}: nothing answers there ({reason})"
            ) from None
    outcome: dict[str, BaseException | None] = {}

    def connect() -> None:
        try:
            ray.init(address=address, **options)
            outcome["error"] = None
        except BaseException as exc:  # reported by the caller's thread
            outcome["error"] = exc

    with _stderr_captured() as captured:
        thread = threading.Thread(target=connect, name="ray-join", daemon=True)
        thread.start()
        thread.join(timeout)
    logged = captured["text"]
    if "error" in outcome and outcome["error"] is None:
        return
    error = outcome.get("error")
    text = f"{logged}\n{error!r}"
    if "InvalidAuthToken" in text or "Unauthenticated" in text or "auth token" in text.lower():
        detail = AUTH_HINT
    elif error is not None:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = lines[-1] if lines else type(error).__name__
    else:
        detail = f"no answer within {timeout:.0f} s (is it the head's GCS address, e.g. HEAD:6379?)"
        if os.environ.get("RAY_AUTH_MODE") != "token":
            detail += f"; if {AUTH_HINT}"
    raise ProtomemError(f"could not join the Ray cluster at {address}: {detail}")


@contextlib.contextmanager
def _stderr_captured():
    """Send file descriptor 2 (where Ray's C++ core logs) to a temporary file for the block; yields a
    dict whose "text" holds what was written once the block ends. Python-level stderr is left alone."""
    captured = {"text": ""}
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all
        yield captured
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured["text"] = sink.read()[-20000:].decode("utf-8", "replace")


def _error_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if cause is not None:
        exc = cause
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _is_user_error(exc: BaseException) -> bool:
    """An error no retry can fix (a bad input); a node that cannot see the sweep is retried, since the
    next attempt may run on another node."""
    cause = getattr(exc, "cause", None)
    error = cause if cause is not None else exc
    return isinstance(error, ProtomemError) and not isinstance(error, NodeCannotSeeSweep)


def _record_failure(layout: SweepLayout, name: str, attempt: int, line: str) -> None:
    """Log the failed attempt's error unless its worker already did (a worker that died, or one that
    cannot see the sweep directory, could not)."""
    events = read_attempts(layout.attempts_path(name))
    if not any(e.get("event") == "error" and e.get("attempt") == attempt for e in events):
        append_attempt(layout.attempts_path(name), "error", attempt=attempt, error=line, recorded_by="driver")


def execute_points(
    layout: SweepLayout,
    todo: list[SweepPoint],
    configs: dict[str, Any],
    *,
    retries: int,
    address: str | None = None,
    num_cpus: int | None = None,
    progress: bool = True,
    condition_runner: ConditionRunner | None = None,
    num_gpus: float | None = None,
    result: SweepResult,
    session: str | None = None,
) -> None:
    """Run ``todo`` on Ray, retrying each point up to ``retries`` times; fills ``result``.

    Each task asks Ray for one CPU, and ``num_gpus`` GPUs (default 1) when its point runs on CUDA
    (:func:`protomem.sweep.spec.ray_resources`).
    ``session``: the id in this run's manifest, which every worker checks it sees before starting.
    """
    ray = require_ray()
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True, soft_wrap=True)
    started_here = _init_ray(ray, address, num_cpus)
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(run_point)
        cluster = ray.cluster_resources()
        cpus = int(cluster.get("CPU", 1))
        resources = {
            point.name: ray_resources(point_device(configs[point.name]), num_gpus, cluster.get("GPU", 0.0))
            for point in todo
        }
        pending: dict[Any, tuple[SweepPoint, int]] = {}

        def submit(point: SweepPoint, attempt: int) -> None:
            ref = remote.options(**resources[point.name]).remote(
                condition_runner,
                configs[point.name],
                str(layout.run_dir(point.name)),
                str(layout.attempts_path(point.name)),
                attempt,
                str(layout.manifest),
                session,
            )
            pending[ref] = (point, attempt)
            result.attempts[point.name] = attempt

        for point in todo:
            submit(point, 1)
        with Progress(
            TextColumn("[bold]sweep[/bold] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not progress,
            transient=False,
        ) as bar:
            task = bar.add_task(f"{len(todo)} points on {cpus} CPUs", total=len(todo))
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    point, attempt = pending.pop(ref)
                    try:
                        info = ray.get(ref)
                        if not is_complete(layout.run_dir(point.name)):
                            raise NodeCannotSeeSweep(
                                f"the attempt on Ray node {info.get('node') or '?'} ended, but its results "
                                f"are not in {layout.run_dir(point.name)} (does that node see the sweep "
                                "directory at the same path?)"
                            )
                    except Exception as exc:  # task raised, or its worker died (killed, out of memory)
                        line = _error_line(exc)
                        _record_failure(layout, point.name, attempt, line)
                        if attempt <= retries and not _is_user_error(exc):
                            bar.console.print(f"retrying {point.name} (attempt {attempt + 1}) after {line}")
                            submit(point, attempt + 1)
                        else:
                            bar.console.print(f"[red]failed[/red] {point.name}: {line}", highlight=False)
                            result.failed[point.name] = line
                            bar.advance(task)
                        continue
                    resumed = " (resumed)" if info.get("resumed") else ""
                    bar.console.print(f"finished {point.name} in {info['seconds']:.0f} s{resumed}")
                    result.completed.append(point.name)
                    bar.advance(task)
    finally:
        if started_here:
            ray.shutdown()


def run_sweep(
    spec: SweepSpec,
    out_dir: str | os.PathLike,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    retries: int | None = None,
    progress: bool = True,
    condition_runner: ConditionRunner | None = None,
    configs: dict[str, Any] | None = None,
    spec_text: str | None = None,
    mem_threshold: float | None = None,
    gen_threshold: float | None = None,
) -> SweepResult:
    """Run a sweep into ``out_dir`` (resumable: finished points are skipped), then gather the results.

    Args:
        address: an existing Ray cluster to join (``ray://host:10001`` or ``host:6379``); None starts a
            private local Ray with ``num_cpus`` CPUs (default: all cores).
        retries: extra attempts for a failed or killed point (default: the sweep file's ``retries``).
        condition_runner: a function with ``run_condition``'s signature, for tests; None = the study's.
        configs: point name -> ConditionConfig, for tests; None = resolved through the study API.
        mem_threshold, gen_threshold: thresholds of τ_mem / τ_gen stored in the points table.

    Returns:
        A :class:`SweepResult`; the tables are in ``out_dir/sweep.duckdb`` and ``out_dir/*.parquet``.
    """
    from protomem.sweep.conditions import config_to_dict, point_configs
    from protomem.sweep.gather import gather

    start = time.perf_counter()
    if num_cpus is not None and num_cpus < 1:
        raise ProtomemError(f"--cpus must be at least 1, got {num_cpus}")
    if address and num_cpus is not None:
        raise ProtomemError("--cpus applies to a local Ray only; a cluster given by --address has its own")
    retries = spec.retries if retries is None else retries
    if retries < 0:
        raise ProtomemError(f"--retries must be at least 0, got {retries}")
    points = expand_points(spec)
    if configs is None:
        configs = point_configs(spec, points)
    config_dicts = {name: config_to_dict(config) for name, config in configs.items()}
    # Absolute, so that a worker started elsewhere (another node, another working directory) writes
    # where the driver reads; nothing is resolved through symlinks, which may differ between nodes.
    layout = SweepLayout(Path(os.path.abspath(out_dir)))
    check_output_dir(layout.root)
    session = uuid.uuid4().hex
    prepare_sweep_dir(spec, layout, points, config_dicts, spec_text=spec_text, session=session)
    result = SweepResult(layout=layout, points=points)
    todo = []
    for point in points:
        if is_complete(layout.run_dir(point.name)):
            result.skipped.append(point.name)
        else:
            todo.append(point)
    try:
        if todo:
            execute_points(
                layout,
                todo,
                configs,
                retries=retries,
                address=address,
                num_cpus=num_cpus,
                progress=progress,
                condition_runner=condition_runner,
                num_gpus=spec.num_gpus,
                result=result,
                session=session,
            )
    finally:
        # Also after Ctrl-C: whatever finished is in the database.
        gather(layout, mem_threshold=mem_threshold, gen_threshold=gen_threshold)
        result.seconds = time.perf_counter() - start
    return result
