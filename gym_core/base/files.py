"""Atomic writes: every file or folder gym writes appears whole or not at all.

Content goes to a temporary sibling (same folder, so the rename stays on one file
system), is flushed to disk, and is renamed over the target with ``os.replace``: a crash,
a kill or a full disk leaves the old version or nothing, never a half-written file where
a reader (resume, a loader, another process) would look. Temporary siblings are named
``.<name>.tmp-<pid>-<random>``; :func:`remove_stale_temporaries` clears those that a
killed process left behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gym_core.base.errors import GymError, disk_full, no_space

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"  # an earlier folder set aside for the instant of the swap


def _sibling(path: Path, mark: str) -> Path:
    return path.with_name(f".{path.name}{mark}{os.getpid()}-{secrets.token_hex(4)}")


def _fsync_dir(folder: Path) -> None:
    # the rename itself is durable only once the folder's entry is on disk (POSIX)
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | Path, *, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to (a file, or with
    ``folder=True`` an empty folder), created with the usual permissions; on success it
    replaces ``path`` (an existing folder is set aside, the new one renamed in, the old
    one removed), on error it is removed and ``path`` is left as it was. A full disk
    or a folder gym may not write in becomes a one-line :class:`GymError`."""
    path = Path(path)
    tmp = _sibling(path, TMP_MARK)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if folder:
            tmp.mkdir()
        else:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except OSError as exc:
        raise unwritable(path.parent, exc) from None
    try:
        yield tmp
        for f in (tmp.rglob("*") if folder else [tmp]):
            if f.is_file():
                _fsync_file(f)
        if folder and path.exists():
            # a folder cannot be renamed over another: move the old one aside first (a
            # kill between the two renames leaves it there, and remove_stale_temporaries
            # puts it back), then drop it
            old = _sibling(path, OLD_MARK)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        _remove(tmp)
        if disk_full(exc):  # after the cleanup, so the free space reported is real
            raise no_space(path.parent) from None
        raise


def write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as indented JSON, atomically."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def is_temporary(name: str) -> bool:
    """A temporary sibling's name: ``.<name>.tmp-<pid>-<random>`` (and gym 0.1's
    ``.tmp-step-<N>-<pid>`` checkpoint folders and ``<name>.tmp`` files)."""
    return (name.startswith(".") and TMP_MARK in name) or name.endswith(".tmp")


def is_moved_aside(name: str) -> bool:
    """A folder moved aside while its replacement was renamed in: ``.<name>.old-...``."""
    return name.startswith(".") and OLD_MARK in name


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary siblings (files or folders) that killed writers left in
    ``folder``, and return them; a folder that was being replaced when its writer died is
    put back where its successor did not arrive. Call it only where no other live process
    writes (a run directory under the run lock)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        if is_moved_aside(p.name):
            target = folder / p.name[1:].rpartition(OLD_MARK)[0]
            if not target.exists():  # killed between moving it aside and the new one's rename
                os.replace(p, target)
                continue
        if is_temporary(p.name) or is_moved_aside(p.name):
            _remove(p)
            removed.append(p)
    return removed


def size_of(path: Path) -> int:
    """Bytes of a file, or of every file below a folder."""
    if path.is_dir() and not path.is_symlink():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    with contextlib.suppress(OSError):
        return path.stat().st_size
    return 0


def check_writable(folder: str | Path) -> None:
    """Raise a one-line :class:`GymError` unless a file can be created (and removed) in
    ``folder``: the real test, where ``os.access`` would answer yes for root on a
    read-only mount."""
    folder = Path(folder)
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=f".write-check{TMP_MARK}{os.getpid()}-")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise unwritable(folder, exc) from None


def unwritable(folder: str | Path, exc: OSError):
    """The one-line error for a folder gym cannot write in (full, read-only, no
    permission); other OS errors come back unchanged."""
    if disk_full(exc):
        return no_space(folder)
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return GymError(f"cannot write in {folder} ({exc.strerror}): gym writes the run's "
                        "checkpoints and results there; make it writable or pick another "
                        "run.root / run.name")
    return exc


def check_can_create(target: str | Path, option: str) -> None:
    """Raise a one-line :class:`GymError` (naming ``option``, e.g. ``out=``) unless
    ``target`` can be created: its nearest existing parent is a folder gym can write in
    (checked by writing a probe, which root's permission bits would not tell)."""
    target = Path(target)
    probe = target.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise GymError(f"{option}{target} is inside {probe}, which is a file; pick another "
                       f"{option}")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=f".write-check{TMP_MARK}{os.getpid()}-")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        if disk_full(exc):
            raise no_space(probe) from None
        raise GymError(f"cannot write {option}{target} ({exc.strerror} in {probe}): pick "
                       f"another {option} or make that folder writable") from None

