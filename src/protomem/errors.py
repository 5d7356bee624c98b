"""One exception type for every error a user can fix: bad input files, bad configs, bad flags.

The CLI turns a :class:`ProtomemError` into a one-line message and exit code 2 (no traceback).
Anything else that escapes is a bug in protomem and keeps its traceback.
"""

from __future__ import annotations


class ProtomemError(Exception):
    """An error caused by the user's input, with a message that says what and where.

    Args:
        message: what is wrong, in one line.
        path: the offending file, if any.
        where: the offending line or field inside it (e.g. ``"line 12"`` or ``"levels[1].rules"``).
    """

    def __init__(self, message: str, path: object | None = None, where: str | None = None) -> None:
        self.message = message
        self.path = None if path is None else str(path)
        self.where = where
        super().__init__(self.one_line())

    def one_line(self) -> str:
        location = ""
        if self.path is not None:
            location = self.path + (f" ({self.where})" if self.where else "") + ": "
        elif self.where:
            location = f"{self.where}: "
        return location + self.message
