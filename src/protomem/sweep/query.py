"""``protomem sweep query``: SQL over a sweep's database, printed as a rich table."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from protomem.errors import ProtomemError
from protomem.sweep.layout import SweepLayout


def run_query(layout: SweepLayout, sql: str) -> pd.DataFrame:
    """Run ``sql`` on SWEEP_DIR/sweep.duckdb (read-only); a bad query is a one-line error."""
    import duckdb

    if not layout.database.is_file():
        raise ProtomemError("no sweep.duckdb yet (run the sweep first)", path=layout.root)
    con = duckdb.connect(str(layout.database), read_only=True)
    try:
        return con.execute(sql).df()
    except duckdb.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ProtomemError(f"query failed: {first}") from None
    finally:
        con.close()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def rich_table(frame: pd.DataFrame, limit: int | None = 50, title: str | None = None):
    """A rich Table of the first ``limit`` rows (None = all), floats to 4 significant digits."""
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for column in frame.columns:
        numeric = pd.api.types.is_numeric_dtype(frame[column])
        table.add_column(str(column), justify="right" if numeric else "left", overflow="fold")
    shown = frame if limit is None else frame.head(limit)
    for row in shown.itertuples(index=False):
        table.add_row(*(_cell(v) for v in row))
    if limit is not None and len(frame) > limit:
        table.caption = f"first {limit} of {len(frame)} rows (--limit 0 shows all)"
    else:
        table.caption = f"{len(frame)} rows"
    return table
