"""The C++ kernel build (gym_core/base/native.py) on a bad day: a build killed with
``kill -9`` half-way (which used to leave torch's lock file behind, so that every later
start waited forever) and a build another live process holds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO

KERNEL = r"""
#include <torch/library.h>
at::Tensor same(const at::Tensor& x) { return x; }
TORCH_LIBRARY(gym_build_test, m) { m.def("same", &same); }
"""

LOAD = ("import sys, torch; from gym_core.base.native import build_root, load_ops; "
        "print('root', build_root(), flush=True); "
        "load_ops('gym_build_test', sys.argv[1]); "
        "print('ok', float(torch.ops.gym_build_test.same(torch.full((1,), 2.0))), flush=True)")


def env_for(cache: Path, **extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "TORCH_EXTENSIONS_DIR": str(cache),
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def test_a_build_killed_mid_compile_does_not_hang_the_next_start(tmp_path):
    source = tmp_path / "kernel.cpp"
    source.write_text(KERNEL)
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", LOAD, str(source)], env=env_for(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    root = Path(proc.stdout.readline().split(" ", 1)[1].strip())
    # torch's own lock file appears when the compiler starts: kill the build right there
    deadline = time.monotonic() + 120
    torch_lock = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(root.glob("gym_build_test_*/lock"))
        if found:
            torch_lock = found[0]
            break
        time.sleep(0.02)
    assert torch_lock is not None, proc.stderr.read() if proc.poll() is not None else "no lock"
    os.killpg(proc.pid, signal.SIGKILL)  # gym and its compiler, as a closed terminal would
    proc.wait(30)
    assert torch_lock.exists()  # what used to hang every later start
    again = subprocess.run([sys.executable, "-c", LOAD, str(source)], env=env_for(cache),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "ok 2.0" in again.stdout
    # the compile says what the wait is; a start that finds the kernel built says nothing
    assert "gym: compiling gym's gym_build_test kernel for this environment" in again.stderr
    cached = subprocess.run([sys.executable, "-c", LOAD, str(source)], env=env_for(cache),
                            capture_output=True, text=True, timeout=300)
    assert cached.returncode == 0 and "ok 2.0" in cached.stdout, cached.stderr[-3000:]
    assert "compiling" not in cached.stderr
    # the folder is this environment's and this gym/torch's: named after them
    assert root.parent == cache and root.name.startswith("gym-")
    assert "-torch-" in root.name and f"-py{sys.version_info.major}." in root.name


def test_a_build_another_process_holds_is_waited_for_then_refused_in_one_line(tmp_path):
    source = tmp_path / "kernel.cpp"
    source.write_text(KERNEL)
    cache = tmp_path / "cache"
    env = env_for(cache, GYM_BUILD_TIMEOUT="1")
    root, isa = subprocess.run([sys.executable, "-c", "from gym_core.base.native import "
                                "build_root, isa_flags; print(build_root()); print(isa_flags()[0])"],
                               env=env, capture_output=True, text=True, timeout=120
                               ).stdout.split()
    lock = Path(root) / f"gym_build_test_{isa}.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, json, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT);"
        " fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, json.dumps({'pid': os.getpid()})"
        ".encode()); print('locked', flush=True); time.sleep(120)"), str(lock)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = subprocess.run([sys.executable, "-c",
                               "from gym_core.base.errors import exit_on_user_error\n"
                               "from gym_core.base.native import load_ops\n"
                               f"with exit_on_user_error(): load_ops('gym_build_test', {str(source)!r})"],
                              env=env, capture_output=True, text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("gym: error:")]
    assert len(errors) == 1, proc.stderr
    assert f"process {holder.pid}" in errors[0] and "GYM_BUILD_TIMEOUT" in errors[0]
    assert f"waiting for process {holder.pid}" in proc.stderr


def test_two_environments_never_share_a_build_folder(monkeypatch, tmp_path):
    """Two virtual environments sharing one cache rebuilt each other's kernels every 15-30 s;
    each now has its own folder (named after its sys.prefix), in the same cache."""
    from gym_core.base import native

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    roots = set()
    for prefix in (tmp_path / "venv-a", tmp_path / "venv-b"):
        monkeypatch.setattr(sys, "prefix", str(prefix))
        roots.add(native.build_root())
    assert len(roots) == 2 and {r.parent for r in roots} == {tmp_path}
