"""Run ``protomem`` command lines in this process, as a user would see them, and snapshot folders.

``invoke`` goes through the real entry point (``protomem.cli.main``) with stdout and stderr captured, so
what it returns is what a terminal shows: the exit code, the output, and — if an exception escaped — its
traceback on stderr (exit code 1), exactly as Python would print it. ``snapshot`` records every file
under a folder (type, mode, size, sha256) so a test can prove that nothing was created or changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        """Non-blank lines of stderr."""
        return [line for line in self.stderr.splitlines() if line.strip()]

    def is_one_line_error(self, *mentions: object) -> bool:
        """Exit code 2, a single 'error: ...' line on stderr mentioning each of ``mentions``."""
        return (
            self.code == 2
            and len(self.lines) == 1
            and self.lines[0].startswith("error: ")
            and all(str(m) in self.lines[0] for m in mentions)
        )


def invoke(*args: object) -> Result:
    """``protomem ARGS...`` in-process; exceptions that escape the entry point become a traceback."""
    from protomem.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["protomem", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # what a user would see: Python's traceback and exit code 1
                traceback.print_exc(file=err)
                code = 1
    finally:
        sys.argv = argv
    return Result(code, out.getvalue(), err.getvalue())


def snapshot(root: Path) -> dict[str, tuple]:
    """relative path -> (file type, mode, size, sha256 or link target) of everything under ``root``."""
    entries: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            info = path.lstat()
            kind = stat.S_IFMT(info.st_mode)
            if stat.S_ISREG(info.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(info.st_mode):
                content = os.readlink(path)
            else:
                content = None
            entries[str(path.relative_to(root))] = (kind, stat.S_IMODE(info.st_mode), info.st_size, content)
    return entries
