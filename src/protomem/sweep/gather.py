"""Gather the results of every point into one DuckDB database plus Parquet files.

Tables (``sweep.duckdb``, and ``points.parquet`` / ``checkpoints.parquet`` / ``examples.parquet``):

- ``points``: one row per point of the sweep: ``point`` (its directory name), ``status`` (complete,
  incomplete, failed, pending), ``attempts``, ``resumed``, ``last_error``, ``last_node`` (the Ray node id
  of its last attempt), ``run_dir``, one column per swept key (named
  by the key's last component, see :func:`protomem.sweep.spec.short_keys`; list values as JSON text),
  the axes the report needs read from the resolved config (``n_train``, ``zipf_exponent``,
  ``zipf_levels``, ``steps``, ``seed``), ``tau_mem`` / ``tau_gen`` (see :mod:`protomem.sweep.onsets`)
  with the thresholds used, and the scalar fields of the run's summary.json (nested keys joined by '_').
- ``checkpoints``: one row per point and evaluation step: the point's identifying columns plus every
  column of its metrics.parquet.
- ``examples``: one row per point and training string: identifying columns plus per_example.parquet.

The tables are rebuilt from the run directories on every call, so each point appears exactly once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from protomem.errors import ProtomemError
from protomem.io import atomic_path
from protomem.sweep.layout import (
    TABLES,
    SweepLayout,
    has_started,
    read_attempts,
    read_manifest,
    read_summary,
)
from protomem.sweep.onsets import (
    DEFAULT_GEN_THRESHOLD,
    DEFAULT_MEM_THRESHOLD,
    GEN_COLUMN,
    MEM_COLUMN,
    onset_step,
)
from protomem.sweep.spec import short_keys

# Report axes, looked up in each point's resolved study config: the first leaf (depth-first) whose key
# is one of the names. One place to adapt if the study renames a field.
AXES: dict[str, tuple[str, ...]] = {
    "n_train": ("n_train", "train_size", "P", "n_train_strings", "num_train"),
    "zipf_exponent": ("zipf_exponent",),
    "zipf_levels": ("zipf_levels",),
    "steps": ("steps",),
    "seed": ("seed",),
    "depth": ("depth",),
    "width": ("width",),
}


def find_leaf(config: Any, names: tuple[str, ...]) -> tuple[bool, Any]:
    """(found, value) of the first key in ``names`` anywhere in a nested dict (top level first)."""
    if not isinstance(config, dict):
        return False, None
    for name in names:
        if name in config and not isinstance(config[name], dict):
            return True, config[name]
    for value in config.values():
        found, leaf = find_leaf(value, names)
        if found:
            return True, leaf
    return False, None


def get_dotted(config: Any, key: str) -> Any:
    """``config["a"]["b"]`` for key ``"a.b"``; None when a part is missing."""
    for part in key.split("."):
        if not isinstance(config, dict) or part not in config:
            return None
        config = config[part]
    return config


def _column_value(value: Any) -> Any:
    """Scalars stay; lists, dicts and the like become canonical JSON text (one SQL type per column)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, sort_keys=True)


def flatten_scalars(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Scalar leaves of a nested dict with keys joined by '_' (lists and strings over 2000 chars skipped)."""
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_scalars(value, f"{name}_"))
        elif (
            value is None
            or isinstance(value, (bool, int, float))
            or (isinstance(value, str) and len(value) <= 2000)
        ):
            flat[name] = value
    return flat


def point_status(run_dir: Path, events: list[dict[str, Any]], summary: dict[str, Any] | None) -> str:
    if summary is not None and summary.get("status") == "complete":
        return "complete"
    if events and events[-1].get("event") == "error":
        return "failed"
    return "incomplete" if has_started(run_dir) else "pending"


def _identity(point: dict[str, Any], short: dict[str, str]) -> dict[str, Any]:
    row: dict[str, Any] = {"point": point["name"]}
    for key, column in short.items():
        # a point that does not set a swept key runs with the base config's value
        if key in point["params"]:
            value = point["params"][key]
        else:
            value = get_dotted(point.get("config", {}), key)
            if value is None:
                value = find_leaf(point.get("config", {}), (key.rsplit(".", 1)[-1],))[1]
        row[column] = _column_value(value)
    for axis, names in AXES.items():
        if axis in row:
            continue
        found, value = find_leaf(point.get("config", {}), names)
        row[axis] = _column_value(value) if found else None
    return row


def _read_parquet(path: Path) -> pa.Table | None:
    if not path.is_file():
        return None
    try:
        return pq.read_table(path)
    except Exception:  # a table being rewritten by a running point; the next gather picks it up
        return None


def _with_identity(table: pa.Table, identity: dict[str, Any]) -> pa.Table:
    """Prepend the identifying columns (constant per point) to a per-point table."""
    for i, (name, value) in enumerate(identity.items()):
        if name in table.column_names:
            table = table.drop_columns([name])
        table = table.add_column(i, name, pa.array([value] * table.num_rows))
    return table


def _concat(tables: list[pa.Table]) -> pa.Table | None:
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="permissive")


def gather(
    layout: SweepLayout, mem_threshold: float | None = None, gen_threshold: float | None = None
) -> dict[str, pd.DataFrame]:
    """Rebuild points / checkpoints / examples from the run directories; write DuckDB and Parquet.

    Returns the tables as DataFrames (examples may be empty when the runs wrote no per_example table).
    """
    mem_threshold = DEFAULT_MEM_THRESHOLD if mem_threshold is None else mem_threshold
    gen_threshold = DEFAULT_GEN_THRESHOLD if gen_threshold is None else gen_threshold
    manifest = read_manifest(layout)
    if manifest is None:
        raise ProtomemError("not a sweep directory (no manifest.json)", path=layout.root)
    short = short_keys(list(manifest.get("swept_keys", [])))
    point_rows: list[dict[str, Any]] = []
    checkpoint_tables: list[pa.Table] = []
    example_tables: list[pa.Table] = []
    for point in manifest["points"]:
        run_dir = layout.run_dir(point["name"])
        events = read_attempts(layout.attempts_path(point["name"]))
        summary = read_summary(run_dir)
        identity = _identity(point, short)
        status = point_status(run_dir, events, summary)
        starts = [e for e in events if e.get("event") == "start"]
        errors = [e for e in events if e.get("event") == "error"]
        # an attempt that failed before its worker could log a start (it could not see the sweep
        # directory, or died) still counts: the driver logged its error
        attempted = {e.get("attempt") for e in starts + errors}
        nodes = [e.get("node") for e in starts if e.get("node")]
        row = {
            **identity,
            "status": status,
            "attempts": len(attempted - {None}) or len(starts),
            "resumed": any(bool(e.get("resume")) for e in starts),
            "last_error": errors[-1].get("error") if errors and status != "complete" else None,
            "last_node": nodes[-1] if nodes else None,
            "run_dir": str(Path("runs") / point["name"]),
            "params": json.dumps(point["params"], sort_keys=True),
            "tau_mem": math.nan,
            "tau_gen": math.nan,
            "mem_threshold": mem_threshold,
            "gen_threshold": gen_threshold,
        }
        metrics = _read_parquet(run_dir / "metrics.parquet")
        if metrics is not None and metrics.num_rows:
            if status == "complete" and "step" in metrics.column_names:
                steps = np.asarray(metrics.column("step").to_numpy(), dtype=np.float64)
                if MEM_COLUMN in metrics.column_names:
                    row["tau_mem"] = onset_step(steps, metrics.column(MEM_COLUMN).to_numpy(), mem_threshold)
                if GEN_COLUMN in metrics.column_names:
                    row["tau_gen"] = onset_step(steps, metrics.column(GEN_COLUMN).to_numpy(), gen_threshold)
            checkpoint_tables.append(_with_identity(metrics, {**identity, "status": status}))
        if status == "complete":
            for key, value in flatten_scalars(summary or {}).items():
                row[key if key not in row else f"summary_{key}"] = value
            examples = _read_parquet(run_dir / "per_example.parquet")
            if examples is not None and examples.num_rows:
                example_tables.append(_with_identity(examples, identity))
        point_rows.append(row)
    frames = {
        "points": pd.DataFrame(point_rows),
    }
    arrow = {"checkpoints": _concat(checkpoint_tables), "examples": _concat(example_tables)}
    frames.update({name: _arrow_to_frame(table) for name, table in arrow.items()})
    write_tables(layout, frames, arrow)
    return frames


def _arrow_to_frame(table: pa.Table | None) -> pd.DataFrame:
    return pd.DataFrame({"point": pd.Series(dtype=str)}) if table is None else table.to_pandas()


def write_tables(
    layout: SweepLayout, frames: dict[str, pd.DataFrame], arrow: dict[str, pa.Table | None]
) -> None:
    """Write each table as Parquet and all of them into sweep.duckdb, every file atomically."""
    import duckdb

    tables: dict[str, pa.Table] = {}
    for name in TABLES:
        table = arrow.get(name)
        if table is None:
            table = pa.Table.from_pandas(frames[name], preserve_index=False)
        tables[name] = table
        with atomic_path(layout.table_path(name)) as tmp:
            pq.write_table(table, tmp)
    with atomic_path(layout.database) as tmp:
        tmp.unlink()  # duckdb creates the file itself
        con = duckdb.connect(str(tmp))
        try:
            for name, table in tables.items():
                con.register("staged", table)
                con.execute(f'CREATE TABLE "{name}" AS SELECT * FROM staged')
                con.unregister("staged")
        finally:
            con.close()
        wal = Path(str(tmp) + ".wal")
        if wal.exists():
            wal.unlink()
