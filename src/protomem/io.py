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
import tokenize
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protomem import limits
from protomem.errors import ProtomemError
from protomem.outputs import apply_umask_modes, check_dir_target, check_replaceable, dir_mode, file_mode
from protomem.textio import parse_json, regular_file, text_lines

STRING_FORMATS = ("parquet", "jsonl", "txt")

# What ``np.load`` raises on a damaged .npy / .npz (besides MemoryError): numpy parses a header's text with
# tokenize and ast, so a damaged header can raise their errors too.
ARRAY_FILE_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    ValueError,
    EOFError,
    KeyError,
    zipfile.BadZipFile,
    SyntaxError,
    tokenize.TokenError,
)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The file gets the permissions of the user's umask. ``path`` must be missing or a regular file (checked
    before and again right before the rename): a device, FIFO, socket or directory is never replaced.
    """
    target = Path(path)
    check_replaceable(target)
    make_dirs(target.parent)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise ProtomemError(f"cannot write here ({exc.strerror})", path=target) from None
    try:
        os.fchmod(fd, file_mode())
    finally:
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        tmp.chmod(file_mode())  # in case the writer replaced the file (e.g. duckdb)
        check_replaceable(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


@contextlib.contextmanager
def new_output_dir(
    path: str | os.PathLike, overwrite: bool = False, inputs: Iterable[object | None] = ()
) -> Iterator[Path]:
    """Build a whole output directory in a temporary sibling and move it into place at the end.

    Refuses an existing non-empty ``path`` unless ``overwrite``, and any path
    :func:`protomem.outputs.check_dir_target` refuses (e.g. one holding an input). If the block raises
    (or the process is killed), ``path`` is left as it was: nothing half-written appears under the final
    name. The directory gets the permissions of the user's umask.
    """
    target = check_dir_target(path, overwrite=overwrite, inputs=inputs)
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ProtomemError(
            "output directory exists and is not empty (pass --overwrite to replace it)", path=target
        )
    make_dirs(target.parent)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    except OSError as exc:
        raise ProtomemError(f"cannot write here ({exc.strerror})", path=target) from None
    try:
        staging.chmod(dir_mode())
        yield staging
        apply_umask_modes(staging)
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


def start_fresh_run_dir(
    path: str | os.PathLike, overwrite: bool, inputs: Iterable[object | None] = ()
) -> None:
    """Create an empty run directory for a resumable run (written in place, so not staged).

    A non-empty ``path`` is refused unless ``overwrite``, which deletes it first (never a directory
    :func:`protomem.outputs.check_dir_target` refuses, e.g. one holding an input).
    """
    path = check_dir_target(path, overwrite=overwrite, inputs=inputs)
    if is_non_empty_dir(path):
        if not overwrite:
            raise ProtomemError(
                "run directory exists and is not empty (pass --resume to continue it or --overwrite)",
                path=path,
            )
        shutil.rmtree(path)
    make_dirs(path)


def make_dirs(path: str | os.PathLike) -> Path:
    """``mkdir -p`` with a one-line error when the location is not writable."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ProtomemError("exists and is not a directory", path=path) from None
    except OSError as exc:
        raise ProtomemError(f"cannot create directory ({exc.strerror})", path=path) from None
    return path


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


INT64_MAX = (1 << 63) - 1


def _check_int(value: object, path: object, where: str) -> int:
    """A token or class id: an integer in [0, 2^63) (negatives pass here; callers say why they are bad)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ProtomemError(f"expected an integer, got {value!r}"[:200], path=path, where=where)
    value = int(value)
    if not -INT64_MAX <= value <= INT64_MAX:
        raise ProtomemError(f"integer {value:.3g} out of range (at most 2^63 - 1)", path=path, where=where)
    return value


def jsonl_objects(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """Yield (1-based line number, parsed value) for every non-blank line of a JSON-lines file.

    A line that is not UTF-8 or not valid JSON is a :class:`ProtomemError` naming the file and the line.
    """
    for number, line in text_lines(path):
        if line.strip():
            yield number, parse_json(line, path=path, where=f"line {number}")


def jsonl_records(path: str | os.PathLike, field: str, kind: type) -> Iterator[tuple[int, dict]]:
    """Like :func:`jsonl_objects`, but every record must be an object whose ``field`` is a ``kind``."""
    noun = {list: "list", str: "string"}.get(kind, kind.__name__)
    for number, record in jsonl_objects(path):
        if not isinstance(record, dict) or not isinstance(record.get(field), kind):
            raise ProtomemError(
                f"expected an object with a {field!r} {noun}", path=path, where=f"line {number}"
            )
        yield number, record


@dataclass
class _Records:
    """What a strings file held, before the checks common to every format."""

    rows: list[list[int]]
    numbers: list[int]  # 1-based line (or row) of each record
    unit: str = "line"
    classes: list[int | None] | None = None
    logprobs: list[float | None] | None = None


class _TokenBudget:
    """Counts tokens as records are read; refuses a string or a file over the limits."""

    def __init__(self, path: Path) -> None:
        self.path, self.total = path, 0
        self.per_string, self.per_file = limits.STRING_TOKENS.value(), limits.TOTAL_TOKENS.value()

    def add(self, count: int, where: str) -> None:
        self.total += count
        if count > self.per_string:
            limits.STRING_TOKENS.check(count, "string length", path=self.path, where=where)
        if self.total > self.per_file:
            limits.TOTAL_TOKENS.check(self.total, "tokens in the file", path=self.path, where=where)


def _read_text_records(path: Path) -> _Records:
    records = _Records(rows=[], numbers=[])
    budget = _TokenBudget(path)
    for number, line in text_lines(path, "strings file"):
        words = line.split()
        if not words:
            continue
        where = f"line {number}"
        budget.add(len(words), where)
        try:
            row = [int(word) for word in words]
        except ValueError:
            raise ProtomemError(
                "tokens must be integers separated by spaces", path=path, where=where
            ) from None
        records.rows.append([_check_int(t, path, where) for t in row])
        records.numbers.append(number)
    return records


def _read_jsonl_records(path: Path) -> _Records:
    records = _Records(rows=[], numbers=[], classes=[], logprobs=[])
    has_class = has_logprob = False
    budget = _TokenBudget(path)
    for number, record in jsonl_records(path, "tokens", list):
        where = f"line {number}"
        budget.add(len(record["tokens"]), where)
        records.rows.append([_check_int(t, path, where) for t in record["tokens"]])
        records.numbers.append(number)
        c = record.get("class")
        has_class |= "class" in record
        records.classes.append(None if c is None else _check_int(c, path, f"{where} field 'class'"))
        lp = record.get("logprob")
        has_logprob |= "logprob" in record
        if lp is not None and (isinstance(lp, bool) or not isinstance(lp, (int, float))):
            raise ProtomemError("'logprob' must be a number", path=path, where=where)
        records.logprobs.append(None if lp is None else float(lp))
    records.classes = records.classes if has_class else None
    records.logprobs = records.logprobs if has_logprob else None
    return records


def _parquet_kind(field_type: object) -> str:
    """'int', 'uint', 'float', 'null' or 'other' for an Arrow type."""
    import pyarrow as pa

    if pa.types.is_signed_integer(field_type):
        return "int"
    if pa.types.is_unsigned_integer(field_type):
        return "uint"
    if pa.types.is_floating(field_type):
        return "float"
    if pa.types.is_null(field_type):
        return "null"
    return "other"


def _integral_values(values: list, path: Path, column: str, numbers: list[int], unit: str) -> list:
    """Check that a column's numbers are whole and within int64; None stays None. Returns ints."""
    out = []
    for value, number in zip(values, numbers, strict=True):
        if value is None:
            out.append(None)
            continue
        if isinstance(value, float) and not (np.isfinite(value) and value == int(value)):
            raise ProtomemError(
                f"{column} must be whole numbers, got {value!r}", path=path, where=f"{unit} {number}"
            )
        out.append(_check_int(int(value), path, f"{unit} {number} field {column!r}"))
    return out


def _read_parquet_records(path: Path) -> _Records:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
        metadata = parquet.metadata
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise ProtomemError(f"not a readable Parquet file ({exc})", path=path) from None
    if "tokens" not in schema.names:
        raise ProtomemError("missing column 'tokens'", path=path)
    token_type = schema.field("tokens").type
    if not (
        pa.types.is_list(token_type)
        or pa.types.is_large_list(token_type)
        or pa.types.is_fixed_size_list(token_type)
    ) or _parquet_kind(token_type.value_type) not in ("int", "uint", "float"):
        raise ProtomemError(f"column 'tokens' must hold lists of integers, found {token_type}", path=path)
    for name, allowed in (("class", ("int", "uint", "float", "null")), ("logprob", ("int", "float", "null"))):
        if name in schema.names and _parquet_kind(schema.field(name).type) not in allowed:
            raise ProtomemError(
                f"column {name!r} must hold numbers, found {schema.field(name).type}", path=path
            )
    stored = sum(  # token values as stored (read from the footer, before any is decoded)
        metadata.row_group(g).column(c).num_values
        for g in range(metadata.num_row_groups)
        for c in range(metadata.num_columns)
        if metadata.row_group(g).column(c).path_in_schema.split(".")[0] == "tokens"
    )
    limits.TOTAL_TOKENS.check(stored, "tokens in the file", path=path)
    columns = [name for name in ("tokens", "class", "logprob") if name in schema.names]
    try:
        table = pq.read_table(path, columns=columns)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise ProtomemError(f"not a readable Parquet file ({exc})", path=path) from None
    numbers = list(range(1, table.num_rows + 1))
    budget = _TokenBudget(path)
    rows = []
    for number, row in zip(numbers, table.column("tokens").to_pylist(), strict=True):
        where = f"row {number}"
        if row is None:
            raise ProtomemError("tokens is null", path=path, where=where)
        budget.add(len(row), where)
        if any(t is None for t in row):
            raise ProtomemError("a token is null", path=path, where=where)
        rows.append(_integral_values(row, path, "tokens", [number] * len(row), "row"))
    records = _Records(rows=rows, numbers=numbers, unit="row")
    if "class" in table.column_names:
        records.classes = _integral_values(table.column("class").to_pylist(), path, "class", numbers, "row")
    if "logprob" in table.column_names:
        records.logprobs = [None if v is None else float(v) for v in table.column("logprob").to_pylist()]
    return records


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
        ProtomemError: naming the file and the first offending line (1-based; Parquet: row) — also for
            bytes that are not UTF-8, tokens that are not whole numbers in [0, 2^63), and strings or files
            over :data:`protomem.limits.STRING_TOKENS` / :data:`protomem.limits.TOTAL_TOKENS`.
    """
    path = regular_file(path, "strings file")
    fmt = string_format_of(path)
    reader = {"parquet": _read_parquet_records, "jsonl": _read_jsonl_records, "txt": _read_text_records}
    records = reader[fmt](path)
    if not records.rows:
        raise ProtomemError("no strings in file", path=path)
    expected = length if length is not None else len(records.rows[0])
    for row, number in zip(records.rows, records.numbers, strict=True):
        if len(row) != expected:
            raise ProtomemError(
                f"string has {len(row)} tokens, expected {expected}",
                path=path,
                where=f"{records.unit} {number}",
            )
    if expected == 0:
        raise ProtomemError("strings are empty", path=path)
    tokens = np.asarray(records.rows, dtype=np.int64).reshape(len(records.rows), expected)
    high = vocab_size if vocab_size is not None else INT64_MAX
    bad_rows = np.flatnonzero(((tokens < 0) | (tokens >= high)).any(axis=1))
    if bad_rows.size:
        first = int(bad_rows[0])
        value = tokens[first][(tokens[first] < 0) | (tokens[first] >= high)][0]
        message = "negative token" if vocab_size is None else f"token {value} out of range [0, {vocab_size})"
        raise ProtomemError(message, path=path, where=f"{records.unit} {records.numbers[first]}")
    class_array = None
    if records.classes is not None:
        class_array = np.array([-1 if c is None else c for c in records.classes], dtype=np.int64)
    logprob_array = None
    if records.logprobs is not None:
        logprob_array = np.array([np.nan if lp is None else lp for lp in records.logprobs], dtype=np.float64)
    return StringTable(tokens=tokens, classes=class_array, logprobs=logprob_array)


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
