"""User-facing errors: a sentence that says what was wrong, where, and the fix."""

from __future__ import annotations

import contextlib
import errno
import shutil
import sys
from pathlib import Path


class GymError(Exception):
    """Bad input from the user (config, data file, model path, checkpoint, plugin).

    Printed without a traceback; the process exits with status 2. Every error gym raises
    for something a user can fix derives from it (:class:`gym_core.plugin.manager.PluginError`,
    :class:`gym_core.plugin.registry.RegistryError`, ...).
    """


class Interrupted(BaseException):  # noqa: N818 (KeyboardInterrupt's kin, not an error)
    """The job stopped on SIGINT / SIGTERM (:mod:`gym_core.train.interrupt`). ``message`` is the
    one line that says what was saved and how to resume; the process exits with
    ``128 + signum`` (130, 143). A BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` on the way up mistakes it for a failure."""

    def __init__(self, signum: int, message: str, *, show: bool = True) -> None:
        super().__init__(message)
        self.signum, self.message, self.show = signum, message, show

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def disk_full(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from or during) reports a full
    disk or quota: an ``OSError`` ENOSPC / EDQUOT, or a library's error carrying that
    OS error as text (safetensors) or as its context (torch.save to a file object)."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
    return False


def _chain(exc: BaseException | None):
    """``exc`` and the exceptions it was raised from or while handling."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def no_space(folder: str | Path):
    """The one-line error for a full disk under ``folder``."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"{shutil.disk_usage(probe).free / 2**20:.0f} MB"
    except OSError:
        free = "unknown"
    return GymError(f"no space left on {folder}: free {free}; free some space (or move "
                    "run.root) and run the same command again to resume")


def warn(message: str) -> None:
    """A one-line warning on stderr, in gym's form."""
    print(f"gym: warning: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def exit_on_user_error():
    """Turn what the user can act on into one line on stderr and an exit status: a
    :class:`GymError` (2), a full disk wherever it surfaced (2), an interruption (130 /
    143)."""
    try:
        yield
    except GymError as exc:
        print(f"gym: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except Interrupted as exc:
        if exc.show:
            print(f"gym: {exc.message}", file=sys.stderr, flush=True)
        raise SystemExit(exc.exit_code) from None
    except Exception as exc:
        if not disk_full(exc):
            raise
        where = next((e.filename for e in _chain(exc)
                      if isinstance(e, OSError) and e.filename), None)
        folder = Path(where).parent if where else Path.cwd()
        print(f"gym: error: {no_space(folder)}", file=sys.stderr)
        raise SystemExit(2) from None

