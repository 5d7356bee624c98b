"""File plumbing shared by every layer: atomic writes, run directories, token-string files.

The token-string interchange format (read by ``grammar check``, ``train --data``, ``audit``; written by
``grammar sample`` and ``sample``) is one record per string::

    {"tokens": [ints], "class": int | null, "logprob": float | null}

stored as Parquet (columns of the same names), JSON lines, or plain text (one string per line, tokens
separated by spaces; text has only ``tokens``). Every reader validates and names the offending line.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protomem.errors import ProtomemError

STRING_FORMATS = ("parquet", "jsonl", "txt")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


@contextlib.contextmanager
def new_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a whole output directory in a temporary sibling and move it into place at the end.

    Refuses an existing non-empty ``path`` unless ``overwrite``. If the block raises (or the process is
    killed), ``path`` is left as it was: nothing half-written appears under the final name.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ProtomemError("exists and is not a directory", path=target)
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ProtomemError(
            "output directory exists and is not empty (pass --overwrite to replace it)", path=target
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def is_non_empty_dir(path: str | os.PathLike) -> bool:
    """True for an existing directory with anything in it; a non-directory at ``path`` is an error."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ProtomemError("exists and is not a directory", path=path)
    return path.is_dir() and any(path.iterdir())


def start_fresh_run_dir(path: str | os.PathLike, overwrite: bool) -> None:
    """Create an empty run directory for a resumable run (written in place, so not staged).

    A non-empty ``path`` is refused unless ``overwrite``, which deletes it first.
    """
    path = Path(path)
    if is_non_empty_dir(path):
        if not overwrite:
            raise ProtomemError(
                "run directory exists and is not empty (pass --resume to continue it or --overwrite)",
                path=path,
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


@dataclass
class StringTable:
    """Token strings with optional per-string class and log-probability.

    Attributes:
        tokens: (N, length) int64.
        classes: (N,) int64 with -1 for "unknown", or None when the file had no class field.
        logprobs: (N,) float64 with NaN for "unknown", or None when the file had no logprob field.
    """

    tokens: np.ndarray
    classes: np.ndarray | None = None
    logprobs: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def string_format_of(path: str | os.PathLike) -> str:
    """'parquet', 'jsonl' or 'txt' from the file name's extension."""
    suffix = Path(path).suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".txt", ".text", ".tokens", ""):
        return "txt"
    raise ProtomemError(f"unknown string-file extension {suffix!r} (use .parquet, .jsonl or .txt)", path=path)


def _check_int(value: object, path: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ProtomemError(f"expected an integer, got {value!r}", path=path, where=where)
    return int(value)


def utf8_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(1-based line number, line with its line ending) of a file, decoded line by line, so a byte that is
    not UTF-8 is a :class:`ProtomemError` naming the file and its line."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ProtomemError(
                    f"not UTF-8 text ({exc.reason} at byte {exc.start} of the line)",
                    path=path,
                    where=f"line {number}",
                ) from None


def jsonl_objects(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """Yield (1-based line number, parsed value) for every non-blank line of a JSON-lines file.

    A line that is not UTF-8 or not valid JSON is a :class:`ProtomemError` naming the file and the line.
    """
    for number, line in utf8_lines(path):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ProtomemError(f"malformed JSON ({exc.msg})", path=path, where=f"line {number}") from None
        except RecursionError:
            raise ProtomemError(
                "malformed JSON (nested too deeply)", path=path, where=f"line {number}"
            ) from None
        yield number, value


def jsonl_records(path: str | os.PathLike, field: str, kind: type) -> Iterator[tuple[int, dict]]:
    """Like :func:`jsonl_objects`, but every record must be an object whose ``field`` is a ``kind``."""
    noun = {list: "list", str: "string"}.get(kind, kind.__name__)
    for number, record in jsonl_objects(path):
        if not isinstance(record, dict) or not isinstance(record.get(field), kind):
            raise ProtomemError(
                f"expected an object with a {field!r} {noun}", path=path, where=f"line {number}"
            )
        yield number, record


def read_strings(
    path: str | os.PathLike,
    vocab_size: int | None = None,
    length: int | None = None,
) -> StringTable:
    """Read a token-string file (Parquet, jsonl or text), validating every record.

    Args:
        vocab_size: if given, every token must lie in [0, vocab_size).
        length: if given, every string must have exactly this many tokens; otherwise all strings
            must share the first string's length.

    Raises:
        ProtomemError: naming the file and the first offending line (1-based; Parquet: row).
    """
    path = Path(path)
    if not path.is_file():
        raise ProtomemError("no such file", path=path)
    fmt = string_format_of(path)
    rows: list[list[int]] = []
    classes: list[int | None] = []
    logprobs: list[float | None] = []
    has_class = has_logprob = False
    unit = "line"
    if fmt == "parquet":
        import pyarrow.parquet as pq

        unit = "row"
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise ProtomemError(f"not a readable Parquet file ({exc})", path=path) from None
        if "tokens" not in table.column_names:
            raise ProtomemError("missing column 'tokens'", path=path)
        has_class = "class" in table.column_names
        has_logprob = "logprob" in table.column_names
        rows = table.column("tokens").to_pylist()
        classes = table.column("class").to_pylist() if has_class else []
        logprobs = table.column("logprob").to_pylist() if has_logprob else []
        for i, row in enumerate(rows, start=1):
            if row is None:
                raise ProtomemError("tokens is null", path=path, where=f"row {i}")
    elif fmt == "jsonl":
        for i, record in jsonl_records(path, "tokens", list):
            tokens = record["tokens"]
            rows.append([_check_int(t, path, f"line {i}") for t in tokens])
            if "class" in record:
                has_class = True
                c = record["class"]
                classes.append(None if c is None else _check_int(c, path, f"line {i} field 'class'"))
            else:
                classes.append(None)
            if "logprob" in record:
                has_logprob = True
                lp = record["logprob"]
                if lp is not None and not isinstance(lp, (int, float)):
                    raise ProtomemError("'logprob' must be a number", path=path, where=f"line {i}")
                logprobs.append(lp)
            else:
                logprobs.append(None)
    else:
        with open(path, encoding="utf-8") as handle:
            for i, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append([int(t) for t in line.split()])
                except ValueError:
                    raise ProtomemError(
                        "tokens must be integers separated by spaces", path=path, where=f"line {i}"
                    ) from None
    if not rows:
        raise ProtomemError("no strings in file", path=path)
    expected = length if length is not None else len(rows[0])
    line_numbers = _record_line_numbers(path, fmt, len(rows))
    for row, line_no in zip(rows, line_numbers, strict=True):
        if len(row) != expected:
            raise ProtomemError(
                f"string has {len(row)} tokens, expected {expected}", path=path, where=f"{unit} {line_no}"
            )
    tokens = np.asarray(rows, dtype=np.int64).reshape(len(rows), expected)
    if vocab_size is not None:
        bad = np.flatnonzero(((tokens < 0) | (tokens >= vocab_size)).any(axis=1))
        if bad.size:
            first = int(bad[0])
            value = tokens[first][(tokens[first] < 0) | (tokens[first] >= vocab_size)][0]
            raise ProtomemError(
                f"token {value} out of range [0, {vocab_size})",
                path=path,
                where=f"{unit} {line_numbers[first]}",
            )
    elif (tokens < 0).any():
        first = int(np.flatnonzero((tokens < 0).any(axis=1))[0])
        raise ProtomemError("negative token", path=path, where=f"{unit} {line_numbers[first]}")
    class_array = None
    if has_class:
        class_array = np.array([-1 if c is None else c for c in classes], dtype=np.int64)
    logprob_array = None
    if has_logprob:
        logprob_array = np.array([np.nan if lp is None else lp for lp in logprobs], dtype=np.float64)
    return StringTable(tokens=tokens, classes=class_array, logprobs=logprob_array)


def _record_line_numbers(path: Path, fmt: str, count: int) -> list[int]:
    """1-based line (or row) number of each record, skipping blank lines in text formats."""
    if fmt == "parquet":
        return list(range(1, count + 1))
    numbers = []
    with open(path, encoding="utf-8") as handle:
        for i, line in enumerate(handle, start=1):
            if line.strip():
                numbers.append(i)
    return numbers


def write_strings(
    path: str | os.PathLike,
    tokens: np.ndarray,
    classes: np.ndarray | None = None,
    logprobs: np.ndarray | None = None,
    extra_columns: dict[str, np.ndarray] | None = None,
) -> None:
    """Write token strings atomically in the format given by the extension (.parquet, .jsonl, .txt).

    ``classes`` entries < 0 and ``logprobs`` entries that are NaN are written as null.
    ``extra_columns`` (Parquet and jsonl only) adds per-string columns.
    """
    fmt = string_format_of(path)
    tokens = np.asarray(tokens, dtype=np.int64)
    columns: dict[str, list] = {"tokens": tokens.tolist()}
    if classes is not None:
        columns["class"] = [None if c < 0 else int(c) for c in np.asarray(classes)]
    if logprobs is not None:
        columns["logprob"] = [None if not np.isfinite(lp) else float(lp) for lp in np.asarray(logprobs)]
    for name, values in (extra_columns or {}).items():
        columns[name] = np.asarray(values).tolist()
    with atomic_path(path) as tmp:
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema_fields = [pa.field("tokens", pa.list_(pa.int64()))]
            if "class" in columns:
                schema_fields.append(pa.field("class", pa.int64()))
            if "logprob" in columns:
                schema_fields.append(pa.field("logprob", pa.float64()))
            arrays = {name: columns[name] for name in ("tokens", "class", "logprob") if name in columns}
            table = pa.table(arrays, schema=pa.schema(schema_fields))
            for name, values in (extra_columns or {}).items():
                table = table.append_column(name, pa.array(np.asarray(values)))
            pq.write_table(table, tmp)
        elif fmt == "jsonl":
            names = list(columns)
            with open(tmp, "w", encoding="utf-8") as handle:
                for i in range(tokens.shape[0]):
                    handle.write(json.dumps({name: columns[name][i] for name in names}) + "\n")
        else:
            with open(tmp, "w", encoding="utf-8") as handle:
                for row in columns["tokens"]:
                    handle.write(" ".join(map(str, row)) + "\n")
