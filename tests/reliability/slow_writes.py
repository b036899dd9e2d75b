"""``python slow_writes.py OVERRIDES``: ``python -m gym_core OVERRIDES`` whose atomic writes
are slow and announced, so a test can kill or signal gym in the middle of one.

Every file of an atomic write (gym_core.base.files.atomic_path: checkpoints, metrics.jsonl's
rewrite, final/, summary.json...) prints ``TEST: writing <path>`` on stdout and waits
``$GYM_TEST_WRITE_DELAY`` seconds before its fsync; the temporary then exists, whole or
not, where a kill leaves it. Nothing else changes."""

from __future__ import annotations

import os
import sys
import time

import gym_core.base.files as files

_delay = float(os.environ.get("GYM_TEST_WRITE_DELAY", "0"))
_fsync = files._fsync_file


def _slow_fsync(path):
    print(f"TEST: writing {path}", flush=True)
    time.sleep(_delay)
    _fsync(path)


files._fsync_file = _slow_fsync

if __name__ == "__main__":
    from gym_core.__main__ import entry

    sys.argv[0] = "gym_core"
    sys.exit(entry())
