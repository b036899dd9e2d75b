"""An exclusive OS lock on a file: ``flock(2)`` through an open descriptor, which the kernel
releases when the descriptor is closed or the process ends, however it ends (``kill -9``,
a crash, power loss), so a lock is never left stale. The holder writes a record (its
process id, and whatever else the message to the next process needs) into the file.

Used by the run lock (:mod:`gym_core.train.rundir`, whose holder the UI shows:
:func:`held_by`) and the kernel build lock (:mod:`gym_core.base.native`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from pathlib import Path

from gym_core.base.errors import GymError


class FileLock:
    """The lock file at ``path``, opened (created if needed; an ``OSError`` for a folder
    that cannot be written, which the caller words), not yet locked."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def try_lock(self, record: dict) -> bool:
        """Take the lock without waiting and write ``record`` (JSON) into the file; False
        while another descriptor holds it. Any other failure is a :class:`GymError`."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise GymError(f"cannot lock {self.path}: {exc.strerror}") from None
            return False
        # the record is for the next process's message only, so a plain write
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, (json.dumps(record) + "\n").encode(), 0)
        return True

    def close(self) -> None:
        """Release the lock (closing the only descriptor releases the flock)."""
        os.close(self.fd)


def holder(path: str | Path) -> dict | None:
    """The record the holder of the lock file at ``path`` wrote, or None; says nothing
    about whether that process still holds it."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def held_by(path: str | Path) -> int | None:
    """The process id holding the flock on the file at ``path``, else None. Read from
    /proc/locks (Linux), so the lock is never touched: taking it even briefly could make
    a starting holder fail."""
    try:
        st = Path(path).stat()
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    for line in table.splitlines():
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:56789 0 EOF" ("->" marks waiters)
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue
        dev_inode = parts[5].split(":")
        if len(dev_inode) == 3 and dev_inode[2].isdigit() and int(dev_inode[2]) == st.st_ino:
            major, minor = (int(x, 16) for x in dev_inode[:2])
            if os.makedev(major, minor) == st.st_dev and parts[4].isdigit():
                return int(parts[4])
    return None
