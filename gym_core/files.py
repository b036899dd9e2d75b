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
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}{TMP_MARK}{os.getpid()}-"


def _fsync_dir(folder: Path) -> None:
    # the rename itself is durable only once the folder's entry is on disk (POSIX)
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to (a file, or with
    ``folder=True`` an empty folder); on success it replaces ``path`` (an existing folder
    is removed first), on error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_tmp_prefix(path)))
    else:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path))
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if folder:
            for f in tmp.rglob("*"):
                if f.is_file():
                    _fsync_file(f)
            if path.exists():
                shutil.rmtree(path)
        else:
            _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if folder:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as indented JSON, atomically."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary siblings (files or folders) that killed writers left in
    ``folder``, and return them. Call it only where no other live process writes (a run
    directory under the run lock)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        if p.name.startswith(".") and TMP_MARK in p.name:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            removed.append(p)
    return removed
