"""Where protomem may write: the rules every output path passes before anything is written.

- An output that exists is refused unless ``--overwrite`` (a resumable run directory also with ``--resume``).
- An output that is an input — the same file (also through a link), a path inside an input folder, or
  a folder that ``--overwrite`` would delete while it holds an input — is always refused.
- An output inside a run's checkpoints (a ``checkpoints`` folder with ``latest.json`` or ``step_*``
  folders) is always refused: a checkpoint is only ever written by training.
- An output that is not a regular file (a device such as /dev/full, a FIFO, a socket, a directory where
  a file is expected) is always refused; the atomic writer checks this again right before its rename, so
  a device node is never replaced by a regular file.
- ``--overwrite`` never deletes the filesystem root, the home folder or a folder holding the current one.

Written files get the permissions the user's umask gives a new file (0644 under umask 022), directories
likewise (0755), not the 0600 / 0700 of temporary files.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from protomem.errors import ProtomemError

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
}


def current_umask() -> int:
    """The process's umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of a new regular file under the user's umask (0o644 for umask 022)."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Mode of a new directory under the user's umask (0o755 for umask 022)."""
    return 0o777 & ~current_umask()


def apply_umask_modes(root: Path) -> None:
    """Give ``root`` and everything under it the umask's modes (some writers, e.g. safetensors, create
    their files 0600 whatever the umask)."""
    files, dirs = file_mode(), dir_mode()
    root.chmod(dirs if root.is_dir() else files)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            (Path(dirpath) / name).chmod(dirs)
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                path.chmod(files)


def kind_of(path: Path) -> str | None:
    """'a directory', 'a FIFO', ... for an existing non-regular path (following links); None for a
    regular file, a missing path or a dangling link."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def check_replaceable(path: Path) -> None:
    """Refuse to replace ``path`` by a regular file unless it is missing or a regular file already."""
    kind = kind_of(path)
    if kind is not None:
        raise ProtomemError(f"is {kind}, not a regular file; protomem writes only regular files", path=path)


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def checkpoints_holding(path: Path) -> Path | None:
    """The run's ``checkpoints`` folder that ``path`` lies in (or is), if any."""
    for folder in [_real(path), *_real(path).parents]:
        is_run_checkpoints = (folder / "latest.json").exists() or any(folder.glob("step_*"))
        if folder.name == "checkpoints" and folder.is_dir() and is_run_checkpoints:
            return folder
    return None


def _check_inputs(path: Path, inputs: Iterable[object | None], replacing: bool) -> None:
    real = _real(path)
    for item in inputs:
        if item is None:
            continue
        source = Path(item)
        if not source.exists():
            continue
        same = path.exists() and os.path.samefile(path, source)
        if same or _is_within(real, _real(source)):
            raise ProtomemError(f"is the input {source} or inside it; write outputs elsewhere", path=path)
        if replacing and path.is_dir() and _is_within(_real(source), real):
            raise ProtomemError(f"holds the input {source}; write outputs elsewhere", path=path)


def _check_not_in_checkpoints(path: Path) -> None:
    held = checkpoints_holding(path)
    if held is not None:
        raise ProtomemError(f"lies inside the run checkpoints {held}; write outputs elsewhere", path=path)


def check_output_file(
    path: str | os.PathLike, *, overwrite: bool, inputs: Iterable[object | None] = ()
) -> Path:
    """Refuse an output file that may not be written (see the module docstring); returns the path."""
    path = Path(path)
    check_replaceable(path)
    _check_not_in_checkpoints(path)
    _check_inputs(path, inputs, replacing=False)
    if path.exists() and not overwrite:
        raise ProtomemError("exists (pass --overwrite to replace it)", path=path)
    return path


def check_output_dir(
    path: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[object | None] = ()
) -> Path:
    """Refuse an output directory a command may not write or replace (module docstring); returns it.

    Whether an existing non-empty directory may be reused (``--resume``) or replaced (``--overwrite``)
    is the caller's rule; this refuses what no flag allows.
    """
    path = Path(path)
    _check_not_in_checkpoints(path)
    return check_dir_target(path, overwrite=overwrite, inputs=inputs)


def check_dir_target(
    path: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[object | None] = ()
) -> Path:
    """The checks of :func:`check_output_dir` that also hold for protomem's own folders (checkpoints
    included): a directory or nothing at ``path``, no input inside what ``overwrite`` would delete, and
    never the root, the home folder or a folder holding the current one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ProtomemError(f"exists and is {kind_of(path) or 'a file'}, not a directory", path=path)
    _check_inputs(path, inputs, replacing=overwrite)
    if overwrite and path.is_dir():
        check_deletable(path)
    return path


def check_deletable(path: Path) -> None:
    """Refuse to delete the filesystem root, the home folder or a folder holding the current one."""
    real = _real(path)
    home = _real(Path.home())
    if real == Path(real.anchor) or real == home or _is_within(_real(Path.cwd()), real):
        raise ProtomemError(
            "will not replace this folder (it is the root, the home folder or holds the current folder)",
            path=path,
        )
