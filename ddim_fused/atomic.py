"""Crash-safe file output: exclusive temporary files renamed over their targets.

Every file the project writes (shards, manifests, PNGs, weights) goes through
`atomic_write`: the bytes go to a new temporary file in the target's folder, created with
O_EXCL (so a file or symlink planted at a guessable name is never followed or reused),
fsynced, renamed over the target and the folder fsynced. A crash, a full disk or Ctrl-C
leaves the old file or the new one, never a mix, and the temporary file is removed
whenever Python gets to run its cleanup. A folder of files (a png shard) goes through
`atomic_write_dir` the same way: built in a new temporary folder, then renamed.

Temporary names (files and folders) are `.<target name>.<8 hex digits>.tmp`; `temp_target`
recognises exactly that pattern, so cleanup code can remove its own leftovers and nothing else.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.[0-9a-f]{8}" + re.escape(TEMP_SUFFIX))
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
# Errors that say the disk or the device failed rather than that the path is unusable.
_RUNTIME_ERRNOS = {errno.ENOSPC, errno.EIO, getattr(errno, "EDQUOT", errno.ENOSPC)}

Writer = Callable[[BinaryIO], None]


class OutputPathError(ValueError):
    """An output path that cannot be used: empty, a file where a folder is needed, not writable."""


def temp_target(name: str) -> str | None:
    """The target file name if `name` is one of atomic_write's temporary names, else None."""
    match = _TEMP_NAME.fullmatch(name)
    return match["target"] if match else None


def atomic_write(path, write: Writer) -> None:
    """Write a file through `write(binary_file)`, replacing `path` only once it is complete.

    Args:
        path: the file to create or replace; its folder must exist.
        write: called once with a binary file object open on the temporary file.

    Raises:
        whatever `write` or the file system raises; `path` is then unchanged and no
        temporary file is left behind.
    """
    atomic_write_all([(path, write)])


def atomic_write_all(items: Iterable[tuple[object, Writer]]) -> None:
    """Write several files so that none is replaced before all of them are written.

    Every temporary file is written and fsynced first; only then are they renamed over
    their targets, one after the other (each rename is atomic; a crash between two renames,
    a window of microseconds, is the only way to end with some replaced and some not).

    Args:
        items: (path, write) pairs as for atomic_write.
    """
    items = [(Path(path), write) for path, write in items]
    temps: list[Path] = []
    try:
        for path, write in items:
            fd, tmp = _create_temp(path)
            temps.append(tmp)
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        for (path, _), tmp in zip(items, temps):
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps:
            _unlink_quietly(tmp)
        raise
    for folder in dict.fromkeys(_folder(path) for path, _ in items):
        fsync_dir(folder)


def atomic_write_dir(path, fill: Callable[[Path], None]) -> None:
    """Build a folder through `fill(temporary_folder)`, then rename it to `path` once complete.

    The temporary folder is new (created exclusively, named as temporary files are); fill
    writes plain files into it, and each is fsynced, then the folder. Whatever is at path
    (an earlier folder, a file, a symlink: never followed) is renamed aside first and
    removed once the new folder is in place, so a crash leaves the old content, nothing, or
    the new folder at path, plus leftovers under temporary names (see temp_target).

    Args:
        path: the folder to create or replace; its parent must exist.
        fill: called once with the temporary folder (a Path).

    Raises:
        whatever fill or the file system raises; path is then unchanged and the
        temporary folder is removed.
    """
    path = Path(path)
    tmp = _create_temp_dir(path)
    aside = None
    try:
        fill(tmp)
        for child in sorted(tmp.iterdir()):
            fd = os.open(child, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(tmp)
        if os.path.lexists(path):
            aside = _create_temp_dir(path)
            os.rename(path, aside / "old")
        try:
            os.rename(tmp, path)
        except BaseException:
            if aside is not None:
                os.rename(aside / "old", path)
            raise
    except BaseException:
        remove_temp_tree(tmp)
        if aside is not None:
            remove_temp_tree(aside)
        raise
    fsync_dir(_folder(path))
    if aside is not None:
        remove_temp_tree(aside)


def remove_temp_tree(path) -> None:
    """Remove a temporary folder of atomic_write_dir with what it holds (symlinks inside are
    removed, never followed); a no-op when it is gone."""
    path = Path(path)
    if not path.is_symlink() and path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        _unlink_quietly(path)


def fsync_dir(folder) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except (PermissionError, IsADirectoryError):
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_output_dir(path, what: str = "output folder") -> Path:
    """Create `path` (with parents) if needed and make sure files can be written in it.

    Args:
        path: str or Path; an empty string is refused (it would mean the current folder).
        what: how error messages name the folder, e.g. "--out".

    Returns:
        the folder as a Path.

    Raises:
        OutputPathError: empty path, an existing file, a folder that cannot be created or
            written.
        OSError: the disk failed (full, I/O error) while creating it.
    """
    if path is None or not str(path).strip():
        raise OutputPathError(f"{what} must name a folder, got an empty path")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"{what} {str(folder)!r} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in _RUNTIME_ERRNOS:
            raise
        raise OutputPathError(f"cannot create {what} {str(folder)!r}: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {str(folder)!r} is not writable")
    return folder


def _create_temp(path: Path) -> tuple[int, Path]:
    folder = _folder(path)
    # Mode 0o666 lets the umask decide the permissions, as for a plain open(path, "wb").
    for _ in range(64):
        tmp = folder / f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            return os.open(tmp, _CREATE_FLAGS, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name for {path.name} in {folder}")


def _create_temp_dir(path: Path) -> Path:
    folder = _folder(path)
    for _ in range(64):
        tmp = folder / f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            os.mkdir(tmp)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name for {path.name} in {folder}")


def _folder(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
