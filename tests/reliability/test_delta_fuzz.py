"""Every delta reader, fuzzed (fuzz_delta_readers.py) in its own process with
faulthandler on: a segfault or an out-of-bounds read that crashes the interpreter fails
this test with the crash's stack, instead of taking pytest down with it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

HERE = Path(__file__).resolve().parent


def test_every_delta_reader_refuses_damaged_files_by_name(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "--rootdir", str(REPO), "-o", "addopts=", str(HERE / "fuzz_delta_readers.py"),
         "--basetemp", str(tmp_path / "fuzz")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (
        f"the fuzzed readers failed (status {proc.returncode}; a negative status is a "
        f"crash):\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}")
    assert " passed" in proc.stdout and " failed" not in proc.stdout
