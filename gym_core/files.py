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
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    one removed), on error it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, TMP_MARK)
    if folder:
        tmp.mkdir()
    else:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        for f in (tmp.rglob("*") if folder else [tmp]):
            if f.is_file():
                _fsync_file(f)
        if folder and path.exists():
            old = _sibling(path, OLD_MARK)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as indented JSON, atomically."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary siblings (files or folders) that killed writers left in
    ``folder``, and return them; a folder a writer had set aside for a swap is put back
    when the new one never arrived. Call it only where no other live process writes (a
    run directory under the run lock)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        if not p.name.startswith("."):
            continue
        if OLD_MARK in p.name:
            original = folder / p.name[1:].split(OLD_MARK)[0]
            if not original.exists():
                os.replace(p, original)  # the swap was cut between its two renames
                continue
        elif TMP_MARK not in p.name:
            continue
        _remove(p)
        removed.append(p)
    return removed
