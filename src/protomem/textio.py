"""Reading user text files (JSON, YAML, plain lines) so that every defect is a one-line error.

Whatever the bytes are — not UTF-8, truncated, nested 100,000 levels deep, a 5,000-digit number, a YAML
alias bomb, a YAML date or set where a config expects numbers, a directory or a FIFO instead of a file —
the readers below raise :class:`~protomem.errors.ProtomemError` naming the file and, where known, the
line; nothing else escapes. Documents read whole are size-checked first (:data:`protomem.limits.TEXT_BYTES`).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from protomem import limits
from protomem.errors import ProtomemError


def regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` if it is an existing regular file (not a directory, FIFO, device or socket, which could
    block a reader or never end); otherwise a one-line error."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ProtomemError(f"no such {what}", path=path) from None
    except OSError as exc:
        raise ProtomemError(f"cannot read {what} ({exc.strerror})", path=path) from None
    if not stat.S_ISREG(info.st_mode):
        raise ProtomemError(f"not a regular file (expected a {what})", path=path)
    return path


def read_bytes(path: str | os.PathLike, what: str = "file") -> bytes:
    """The bytes of a regular file no larger than TEXT_BYTES; anything else is a one-line error."""
    path = regular_file(path, what)
    limits.TEXT_BYTES.check(path.stat().st_size, f"{what} size", path=path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ProtomemError(f"cannot read {what} ({exc.strerror})", path=path) from None


def decode_utf8(data: bytes, path: object, first_line: int = 1) -> str:
    """``data`` as text; a byte that is not UTF-8 is an error naming its line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + data.count(b"\n", 0, exc.start)
        raise ProtomemError(
            f"not UTF-8 text (byte 0x{data[exc.start]:02x}: {exc.reason})", path=path, where=f"line {line}"
        ) from None


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A whole UTF-8 text file (see :func:`read_bytes` for the checks)."""
    return decode_utf8(read_bytes(path, what), path)


def parse_json(text: str, path: object = None, where: str | None = None) -> Any:
    """json.loads with every failure (syntax, nesting depth, over-long numbers) as a ProtomemError."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        at = where or f"line {exc.lineno}"
        raise ProtomemError(f"malformed JSON ({exc.msg})", path=path, where=at) from None
    except RecursionError:
        raise ProtomemError("malformed JSON (nested too deeply)", path=path, where=where) from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ProtomemError(f"malformed JSON ({exc})", path=path, where=where) from None


def load_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read and parse a JSON document."""
    return parse_json(read_text(path, what), path)


def load_yaml(path: str | os.PathLike, what: str = "YAML file") -> Any:
    """Read and parse a YAML document into plain JSON-like values (dict with str keys, list, str, int,
    float, bool, None).

    Refused, naming the line or the key: YAML syntax errors, nesting beyond Python's recursion limit,
    over-long numbers, aliases that expand past YAML_NODES values or refer to themselves, and values
    JSON cannot hold (dates, binary, sets, non-string keys) — quote them to mean text.
    """
    import yaml

    text = read_text(path, what)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ProtomemError(f"not valid YAML ({problem})", path=path, where=where) from None
    except RecursionError:
        raise ProtomemError("not valid YAML (nested too deeply)", path=path) from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ProtomemError(f"not valid YAML ({exc})", path=path) from None
    try:
        size = _plain_size(doc, "", {}, set(), path)
    except RecursionError:
        raise ProtomemError("not valid YAML (nested too deeply)", path=path) from None
    limits.YAML_NODES.check(size, "YAML document with its aliases expanded", path=path)
    return doc


_SCALARS = (str, int, float, bool, type(None))


def _plain_size(value: Any, where: str, sizes: dict[int, int], active: set[int], path: object) -> int:
    """Number of values in ``value`` with shared (aliased) parts counted every time they occur;
    raises on a type JSON cannot hold or on a self-referencing alias."""
    if isinstance(value, _SCALARS):
        return 1
    key = id(value)
    if key in sizes:
        return sizes[key]
    if key in active:
        raise ProtomemError("a YAML alias refers to itself", path=path, where=where or "top level")
    active.add(key)
    if isinstance(value, dict):
        total = 1
        for name, item in value.items():
            if not isinstance(name, str):
                raise ProtomemError(
                    f"key {name!r} is not text (quote it)", path=path, where=where or "top level"
                )
            total += _plain_size(item, f"{where}.{name}" if where else name, sizes, active, path)
    elif isinstance(value, list):
        total = 1 + sum(
            _plain_size(item, f"{where}[{i}]", sizes, active, path) for i, item in enumerate(value)
        )
    else:
        kind = type(value).__name__
        raise ProtomemError(
            f"a YAML {kind} value is not supported here (quote it to mean text)",
            path=path,
            where=where or "top level",
        )
    active.discard(key)
    sizes[key] = total
    return total


def text_lines(path: str | os.PathLike, what: str = "file") -> Iterator[tuple[int, str]]:
    """(1-based line number, line) for every line of a UTF-8 file, decoded one line at a time so a
    byte that is not UTF-8 is an error naming its line. Line endings are kept."""
    path = regular_file(path, what)
    try:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                yield number, decode_utf8(raw, path, number)
    except OSError as exc:
        raise ProtomemError(f"cannot read {what} ({exc.strerror})", path=path) from None


def require_inside(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path`` if it resolves, following every link, to a place inside ``root`` (resolved the same
    way); otherwise a one-line error. Loaders of a run folder open only what this allows, so a
    tampered record cannot point them at /etc/passwd, ``../..`` or another run."""
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(path))
    if real != real_root and real_root not in real.parents:
        raise ProtomemError(f"resolves to {real}, outside the run folder {root}; not read", path=path)
    return Path(path)
