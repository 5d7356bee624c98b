"""Where a sweep keeps its files, and how it tells a finished point from an unfinished one.

A sweep directory::

    SWEEP_DIR/
      sweep.yaml              the sweep file as last run
      manifest.json           every point: name, parameters, resolved study config
      runs/<point>/           the point's study run directory (protomem.study.pipeline.run_condition)
      attempts/<point>.jsonl  one line per attempt event: start (pid, host, resume), end, error
      sweep.duckdb            tables points, checkpoints, examples (also as *.parquet beside it)
      report.html             protomem sweep report

A point is *finished* when ``runs/<point>/summary.json`` says ``"status": "complete"`` (the study writes
it last). Finished points are never run again.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protomem.errors import ProtomemError
from protomem.io import write_json_atomic

TABLES = ("points", "checkpoints", "examples")


@dataclass(frozen=True)
class SweepLayout:
    """Paths inside one sweep directory."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def sweep_file(self) -> Path:
        return self.root / "sweep.yaml"

    @property
    def database(self) -> Path:
        return self.root / "sweep.duckdb"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    def run_dir(self, name: str) -> Path:
        return self.root / "runs" / name

    def attempts_path(self, name: str) -> Path:
        return self.root / "attempts" / f"{name}.jsonl"

    def table_path(self, table: str) -> Path:
        return self.root / f"{table}.parquet"


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's summary.json, or None when it is missing or unreadable (a run killed mid-write)."""
    path = Path(run_dir) / "summary.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def is_complete(run_dir: Path) -> bool:
    """True when the study run in ``run_dir`` finished (its summary says ``"status": "complete"``)."""
    summary = read_summary(run_dir)
    return summary is not None and summary.get("status") == "complete"


def has_started(run_dir: Path) -> bool:
    """True when ``run_dir`` holds anything (a run to resume rather than start)."""
    run_dir = Path(run_dir)
    return run_dir.is_dir() and any(run_dir.iterdir())


def append_attempt(path: Path, event: str, **fields: Any) -> None:
    """Append one attempt event as a JSON line (flushed and synced, so a kill right after keeps it)."""
    record = {"event": event, "time": time.time(), "pid": os.getpid(), "host": socket.gethostname(), **fields}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_attempts(path: Path) -> list[dict[str, Any]]:
    """Every attempt event of a point, oldest first (a torn last line from a kill is skipped)."""
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def read_manifest(layout: SweepLayout) -> dict[str, Any] | None:
    if not layout.manifest.is_file():
        return None
    try:
        doc = json.loads(layout.manifest.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ProtomemError(f"corrupt manifest ({exc.msg})", path=layout.manifest) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("points"), list):
        raise ProtomemError("corrupt manifest (no 'points' list)", path=layout.manifest)
    return doc


def write_manifest(layout: SweepLayout, doc: dict[str, Any]) -> None:
    write_json_atomic(layout.manifest, doc)


def require_sweep_dir(path: str | os.PathLike) -> SweepLayout:
    """The layout of an existing sweep directory (one with a manifest), or a one-line error."""
    layout = SweepLayout(Path(path))
    if not layout.root.is_dir():
        raise ProtomemError("no such sweep directory", path=layout.root)
    if not layout.manifest.is_file():
        raise ProtomemError("not a sweep directory (no manifest.json; run `protomem sweep` first)", path=path)
    return layout
