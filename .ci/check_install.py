"""Check a plain ``pip install .`` (no extras): every command's ``--help``, ``--version``, a tiny run.

Run by ``make check-install`` with the Python of a fresh venv that holds protomem and nothing else, so a
module that only an extra brings (click through Ray, say) cannot hide behind the dev install. It walks the
command tree of the typer app (nested groups too), runs the installed ``protomem`` console script for
each ``--help``, then ``protomem grammar sample`` on a tiny grammar, and, when Ray is absent, checks that
a sweep says how to install it in one line (exit code 2).

Exit code 0 when everything passed; otherwise every failure is printed and the exit code is 1.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path

import typer.main

from protomem.cli import app

PROTOMEM = str(Path(sys.executable).with_name("protomem"))
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def command_paths(command, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and group below ``command`` (itself first), as argument tuples."""
    paths = [prefix]
    for name in sorted(getattr(command, "commands", {}) or {}):
        paths.extend(command_paths(command.commands[name], (*prefix, name)))
    return paths


def run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROTOMEM, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def main() -> int:
    failures: list[str] = []

    def expect(ok: bool, what: str, done: subprocess.CompletedProcess) -> None:
        status = "ok  " if ok else "FAIL"
        print(f"{status} protomem {' '.join(done.args[1:])}")
        if not ok:
            failures.append(f"{what}: exit {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-2000:]}")

    paths = command_paths(typer.main.get_command(app))
    for path in paths:
        done = run([*path, "--help"])
        expect(done.returncode == 0 and "Usage" in done.stdout and not done.stderr, "help", done)
    done = run(["--version"])
    expect(done.stdout.strip() == f"protomem {version('protomem')}", "--version", done)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "data"
        done = run(
            [
                "grammar", "sample", "--vocab", "4", "--classes", "4", "--rules", "2", "--depth", "2",
                "--count", "20", "--seed", "0", "--out", str(out),
            ]
        )  # fmt: skip
        made = (out / "grammar.json").is_file() and (out / "strings.parquet").is_file()
        made = made and bool(json.loads((out / "grammar.json").read_text()))
        expect(done.returncode == 0 and made, "sample", done)
        if find_spec("ray") is None:
            done = run(["sweep", str(EXAMPLES / "sweeps" / "tiny.yaml"), "--out", str(Path(tmp) / "sweep")])
            hint = done.stderr.strip()
            one_line = len(hint.splitlines()) == 1
            ok = done.returncode == 2 and "pip install 'protomem[sweep]'" in hint and one_line
            expect(ok, "sweep without Ray", done)
    for failure in failures:
        print(f"\n--- {failure}", file=sys.stderr)
    print(f"{len(paths)} commands, {len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
