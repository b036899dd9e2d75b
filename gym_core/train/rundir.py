"""The run directory before a job writes in it: one process at a time (an exclusive OS
lock on ``<run dir>/.gym.lock``), writable, and cleared of what killed writers left.

The lock is ``flock(2)`` on a file in the run directory, taken before anything is
written there and held for the life of the process: the kernel releases it when the
process ends, however it ends (``kill -9``, a crash, power loss), so a stale lock never
blocks a resume. The holder writes its process id, host and command line into the file,
for the message the next process gets. Under torchrun only rank 0 locks (the other ranks
work in rank 0's directory); a Hydra sweep locks its sweep folder and each job its own.

Reentrant within a process: ``python -m gym_core`` locks the run directory before Hydra
writes its ``.hydra/`` record, and :func:`gym_core.train.job.run_job` (which in-process callers
use directly) locks the same directory again; the second lock is the first one, counted.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from gym_core.base.errors import GymError
from gym_core.base.files import (
    check_writable,
    is_moved_aside,
    is_temporary,
    remove_stale_temporaries,
    size_of,
    unwritable,
)
from gym_core.base.lock import FileLock
from gym_core.base.lock import holder as lock_holder

LOCK_NAME = ".gym.lock"

_held: dict[Path, list] = {}  # resolved run dir -> [FileLock, count]
_guard = threading.Lock()


class RunInUse(GymError):
    """Another live process holds the run directory (``pid`` names it, when known)."""

    def __init__(self, message: str, run_dir: Path, pid: int | None) -> None:
        super().__init__(message)
        self.run_dir, self.pid = run_dir, pid


def holder(run_dir: str | Path) -> dict | None:
    """What the lock file of ``run_dir`` says about its holder (pid, host, command), or
    None; says nothing about whether that process still holds it."""
    return lock_holder(Path(run_dir) / LOCK_NAME)


def acquire(run_dir: str | Path) -> None:
    """Lock ``run_dir`` for this process (created if needed) or raise :class:`RunInUse`."""
    run_dir = Path(run_dir).resolve()
    with _guard:
        if run_dir in _held:
            _held[run_dir][1] += 1
            return
        if (run_dir / LOCK_NAME).is_dir():
            raise GymError(f"{run_dir / LOCK_NAME} is a folder, where gym keeps the run's "
                           "lock file: remove that folder (gym creates the file again)")
        if run_dir.exists() and not run_dir.is_dir():
            raise GymError(f"the run directory {run_dir} is a file: pick another run.name "
                           "(or move the file away)")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = FileLock(run_dir / LOCK_NAME)
        except OSError as exc:  # a read-only or full disk: nothing can be written there
            raise unwritable(run_dir, exc) from None
        try:
            locked = lock.try_lock({
                "pid": os.getpid(), "host": socket.gethostname(),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]})
        except GymError:
            lock.close()
            raise
        if not locked:
            lock.close()
            info = holder(run_dir) or {}
            pid = info.get("pid")
            who = f"process {pid}" if pid else "another process"
            if info.get("host") and info["host"] != socket.gethostname():
                who += f" on {info['host']}"
            raise RunInUse(
                f"run directory {run_dir} is in use by {who} "
                f"({info.get('command') or 'command unknown'}); wait for it to end, stop it, "
                "or pick another run.name", run_dir, pid)
        _held[run_dir] = [lock, 1]


def release(run_dir: str | Path) -> None:
    """Undo one :func:`acquire`; the last one unlocks."""
    run_dir = Path(run_dir).resolve()
    with _guard:
        entry = _held.get(run_dir)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _held[run_dir]
            entry[0].close()


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    acquire(run_dir)
    try:
        yield
    finally:
        release(run_dir)


def is_run_dir_of_another(folder: Path) -> bool:
    """True for a folder that is a run directory of its own (a sweep's job)."""
    return (folder / LOCK_NAME).exists()


def prepare_run_dir(run_dir: Path) -> None:
    """Before the job writes anything: the run directory and its folders must be
    writable (checked by writing, not by permission bits, which root ignores), and the
    temporaries a killed process left are removed (they can hold a whole checkpoint:
    on a full disk, every retry would fail again)."""
    check_writable(run_dir)
    folders = [run_dir, *(p for p in sorted(run_dir.iterdir()) if p.is_dir()
                          and not is_temporary(p.name) and not is_run_dir_of_another(p))]
    sizes = {p: size_of(p) for folder in folders for p in folder.iterdir()
             if is_temporary(p.name) or is_moved_aside(p.name)}
    removed = [p for folder in folders for p in remove_stale_temporaries(folder)]
    if removed:
        mb = sum(sizes.get(p, 0) for p in removed) / 2**20
        print(f"gym: removed {len(removed)} partial writes ({mb:.1f} MB) that an interrupted "
              f"run left in {run_dir}")
    for folder in folders[1:]:
        check_writable(folder)


def check_run_name(cfg) -> None:
    """``run.name`` is one folder name inside ``run.root``: not empty, not ``.`` or
    ``..``, no path separator. Checked before anything is created (an empty name made
    ``runs/`` itself a run; ``../../x`` wrote outside run.root)."""
    name = cfg.run.name
    text = "" if name is None else str(name)
    if not text.strip() or text in (".", "..") or "/" in text or "\\" in text \
            or "\0" in text:
        raise GymError(
            f"run.name={text!r} is not a folder name: a run's name is one path component "
            f"inside run.root ({cfg.run.root}), without '/', '\\' or '..'; e.g. "
            "run.name=first (to put runs elsewhere, set run.root)")


def check_run_state(run_dir: Path) -> None:
    """What a start needs of an existing run directory: ``checkpoints`` a folder, and a
    finished run still holding its checkpoints (without them the same command would
    train again from step 0 and overwrite ``final/``)."""
    from gym_core.train.checkpoint import checkpoints_dir, list_checkpoints

    run_dir = Path(run_dir)
    ckpts = checkpoints_dir(run_dir)
    if ckpts.exists() and not ckpts.is_dir():
        raise GymError(f"{ckpts} is a file, where gym keeps the run's checkpoints: move it "
                       "away (or pick another run.name)")
    finished = (run_dir / "final").exists() or (run_dir / "summary.json").exists()
    if finished and not list_checkpoints(run_dir):
        raise GymError(
            f"{run_dir} is a finished run whose checkpoints/ are gone, so it cannot "
            "continue, and training it again from step 0 would overwrite its final/: start "
            f"a new run with another run.name, or one from its weights with "
            f"model.init={run_dir}")

