"""The machinery of the fuzz tests (tests/test_fuzz.py): mutations of valid input files and the check of
one fuzz case.

A case is a command line whose input files were written from mutated bytes. ``run_case`` runs it
in-process (``tests.cli_runner.invoke``) and checks what the issue promises for every input a user can
give: no traceback, exit code 0 or 2 (2 whenever the mutation makes the input invalid for sure), on exit 2
exactly one line on stderr naming an input file, no output created and nothing else changed; on exit 0
the output exists; inputs are never changed.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from tests.cli_runner import Result, invoke, snapshot

# ----------------------------------------------------------------------------------------------- values


class Raw:
    """Text spliced verbatim into a JSON or YAML document (for what ``json.dumps`` cannot write)."""

    def __init__(self, text: str) -> None:
        self.text = text


NASTY_TEXT = [
    "9" * 5000,  # an integer too long for int()
    "1e999",
    "-0",
    "[" * 3000 + "]" * 3000,  # nested deeper than the recursion limit allows some readers
    "NaN",
    "Infinity",
    '"\\ud800"',  # a lone surrogate
]
nasty_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", "x" * 100_000, "../../etc/passwd", "/dev/zero", "\u202e", "\x00"]),
    st.sampled_from([Raw(t) for t in NASTY_TEXT]),
)
nasty_values = st.one_of(
    nasty_scalars,
    st.lists(nasty_scalars, max_size=4),
    st.dictionaries(st.text(max_size=6), nasty_scalars, max_size=3),
    st.just([[[[[]]]]]),
)


def dumps(doc: Any) -> str:
    """JSON text of ``doc``, NaN/Infinity allowed, :class:`Raw` values spliced in verbatim."""
    raws: dict[str, str] = {}

    def encode(value: Any) -> Any:
        if isinstance(value, Raw):
            key = f"@@raw{len(raws)}@@"
            raws[key] = value.text
            return key
        if isinstance(value, dict):
            return {str(k): encode(v) for k, v in value.items()}
        if isinstance(value, list):
            return [encode(v) for v in value]
        return value

    text = json.dumps(encode(doc), allow_nan=True)
    for key, raw in raws.items():
        text = text.replace(json.dumps(key), raw)
    return text


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a JSON-like document (the root included)."""
    out = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc[:8]):  # the first few items of long lists are enough
            out += _paths(value, (*prefix, i))
    return out


def _set(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    import copy

    doc = copy.deepcopy(doc)
    node = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return doc


def _delete(doc: Any, path: tuple) -> Any:
    import copy

    doc = copy.deepcopy(doc)
    node = doc
    for part in path[:-1]:
        node = node[part]
    del node[path[-1]]
    return doc


@st.composite
def mutated_document(draw: st.DrawFn, doc: Any) -> tuple[Any, bool]:
    """(a structurally mutated copy of ``doc``, whether it is certainly invalid): one value replaced by
    a nasty one, a key deleted or an unknown key added."""
    paths = _paths(doc)
    path = draw(st.sampled_from(paths))
    kind = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add"]))
    if kind == "delete" and path:
        return _delete(doc, path), False
    if kind == "add":
        parent = path if isinstance(_get(doc, path), dict) else ()
        if isinstance(_get(doc, parent), dict):
            return _set(doc, (*parent, "zz_unknown_key"), draw(nasty_scalars)), False
    value = draw(nasty_values)
    root_refused = not path and not isinstance(value, (dict, type(None)))  # (an empty YAML config is {})
    return _set(doc, path, value), root_refused


def _get(doc: Any, path: tuple) -> Any:
    for part in path:
        doc = doc[part]
    return doc


@st.composite
def mutated_bytes(draw: st.DrawFn, data: bytes, text: bool) -> tuple[bytes, bool]:
    """(``data`` damaged at the byte level, whether it is certainly invalid).

    For text formats a byte that is never UTF-8 (0xff, 0xc0, ...) inserted anywhere is certainly invalid;
    the other damages (truncation, junk, flipped or dropped bytes) may leave the file valid.
    """
    kind = draw(st.sampled_from(["non_utf8", "truncate", "junk", "flip", "drop", "empty"]))
    where = draw(st.integers(min_value=0, max_value=max(len(data) - 1, 0)))
    if kind == "non_utf8":
        bad = draw(st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\x80", b"\xfe\xff"]))
        return data[:where] + bad + data[where:], text
    if kind == "truncate":
        return data[:where], False
    if kind == "junk":
        junk = draw(st.binary(min_size=1, max_size=16))
        return data[:where] + junk + data[where:], False
    if kind == "flip":
        flipped = data[where] ^ draw(st.integers(min_value=1, max_value=255)) if data else 0
        return data[:where] + bytes([flipped]) + data[where + 1 :], False
    if kind == "drop":
        stop = draw(st.integers(min_value=where, max_value=len(data)))
        return data[:where] + data[stop:], False
    return b"", False


# ------------------------------------------------------------------------------------------------ cases


@dataclass
class Tally:
    """What the fuzz cases of one family did (reported by the slow run)."""

    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)

    def add(self, outcome: str) -> None:
        self.cases += 1
        self.outcomes[outcome] += 1


def run_case(
    root: Path,
    args: list[object],
    inputs: list[Path],
    output: Path | None,
    must_fail: bool,
    tally: Tally | None = None,
    may_change: tuple[Path, ...] = (),
) -> Result:
    """Run one case under ``root`` (which holds its inputs) and check the promises (module docstring).

    ``output`` is the fresh output location (must not exist before); ``may_change`` lists paths a
    successful command rewrites by design (e.g. a report inside the run folder it rebuilds).
    """
    assert output is None or not output.exists()
    before = snapshot(root)
    result = invoke(*args)
    after = snapshot(root)
    context = f"\n$ protomem {' '.join(map(str, args))}\nexit {result.code}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, context
    assert result.code in (0, 2), context
    if must_fail:
        assert result.code == 2, context
    out_key = None if output is None else str(output.relative_to(root))
    allowed = {str(p.relative_to(root)) for p in may_change}
    if result.code == 2:
        assert result.is_one_line_error(), context
        assert any(str(p) in result.lines[0] for p in inputs), context
        assert after == before, f"files changed by a refused command: {_diff(before, after)}{context}"
    else:
        assert output is None or output.exists(), context
        changed = {
            key
            for key in set(before) | set(after)
            if before.get(key) != after.get(key)
            and not (out_key and (key == out_key or key.startswith(out_key + "/")))
            and key not in allowed
            and not _is_parent_dir_of(key, out_key, allowed)
        }
        assert not changed, f"files changed besides the output: {sorted(changed)}{context}"
    if tally is not None:
        tally.add("refused" if result.code == 2 else "accepted")
    return result


def _is_parent_dir_of(key: str, out_key: str | None, allowed: set[str]) -> bool:
    """Directories change (size, entries) when an allowed file inside them is written."""
    targets = [t for t in [out_key, *allowed] if t]
    return any(t.startswith(key + "/") for t in targets)


def _diff(before: dict, after: dict) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))[:10]


def fresh_copy(source: Path, target: Path) -> Path:
    """A private copy of a fixture folder for one case."""
    if source.is_dir():
        shutil.copytree(source, target, symlinks=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    return target


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
