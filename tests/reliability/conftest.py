"""Shared by the reliability tests: real gym processes on the tiny model, started, killed
and signalled as a user's worst day would, and the checks on what they leave on disk."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gym_core.base.files import is_moved_aside, is_temporary
from gym_core.train.checkpoint import WEIGHTS, list_checkpoints
from tests.conftest import REPO, plugin_site

HERE = Path(__file__).resolve().parent
#: a tiny GRPO run with a reward that moves the weights (tests/digits_plugin.py)
TINY = ["model=tiny", "trainer.eval_size=4", "trainer.batch_size=2",
        "algorithm.num_generations=4", "algorithm.max_completion_length=8",
        "trainer.eval_max_new_tokens=4", "trainer.progress=false", "trainer.tensorboard=false",
        "algorithm.rewards=[digit_share]", "algorithm.lr=1e-2", "trainer.eval_before=false"]


@pytest.fixture(scope="session")
def gym_env(tmp_path_factory):
    """The environment of every gym process here: the test reward plugin installed, one
    thread (so runs are bit-for-bit repeatable), unbuffered output."""
    site = plugin_site(tmp_path_factory.mktemp("site"), "gym-test-digits", "digits",
                       "tests.digits_plugin")
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{site}", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


def gym(args, cwd, env, *, wrapper: bool = False, timeout: int = 600, extra_env=None):
    """Run gym to the end; ``wrapper``: through slow_writes.py (GYM_TEST_WRITE_DELAY)."""
    head = [sys.executable, str(HERE / "slow_writes.py")] if wrapper else [
        sys.executable, "-m", "gym_core"]
    return subprocess.run([*head, *args], cwd=cwd, env={**env, **(extra_env or {})},
                          capture_output=True, text=True, timeout=timeout)


def start(args, cwd, env, *, delay: float = 0.0):
    """Start gym through slow_writes.py (each file of an atomic write waits ``delay``
    seconds before its fsync, announced on stdout); stdout is read line by line as it
    comes (``proc.out``), stderr goes to a file (``stderr(proc)``)."""
    err = tempfile.NamedTemporaryFile("w+", suffix=".stderr", delete=False)  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, str(HERE / "slow_writes.py"), *args], cwd=cwd,
                            env={**env, "GYM_TEST_WRITE_DELAY": str(delay)},
                            stdout=subprocess.PIPE, stderr=err, text=True)
    proc.err_path = err.name
    proc.out = Output(proc)
    return proc


def stderr(proc) -> str:
    if not hasattr(proc, "err_path"):
        return proc.stderr.read() if proc.stderr else ""
    return Path(proc.err_path).read_text()


class Output:
    """The lines a process prints on stdout, collected as they come."""

    def __init__(self, proc):
        self.lines: list[str] = []
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc):
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def has(self, *needles: str) -> bool:
        return any(all(n in ln for n in needles) for ln in list(self.lines))


def wait_for(predicate, proc=None, timeout: float = 300, what: str = "") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"gym ended (status {proc.returncode}) before {what}: "
                                 f"{stderr(proc)[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def gym_lines(stderr: str) -> list[str]:
    """gym's own lines on stderr (libraries' deprecation notices left out)."""
    return [ln for ln in stderr.splitlines() if ln.startswith("gym:")]


def assert_one_line_error(proc, *needles, status: int = 2) -> str:
    """Exit ``status``, no traceback, and exactly one gym line, an error naming ``needles``."""
    assert proc.returncode == status, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = gym_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("gym: error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def tree(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (the lock file aside, which holds the last locker's
    pid) by its sha256, and every folder: to show nothing was written over."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.name == ".gym.lock":
            continue
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def temporaries(folder: Path) -> list[Path]:
    return [p for p in Path(folder).rglob("*") if is_temporary(p.name) or is_moved_aside(p.name)]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(list_checkpoints(run_dir)[-1][1] / WEIGHTS))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max())
    assert any(t.abs().sum() > 0 for k, t in a.items() if "lora_B" in k)  # it learnt


#: the per-step numbers that must match between two runs of the same steps
SAME = ("loss", "reward_mean", "grad_norm", "lr", "completion_length", "weight_norm_ratio")


def assert_same_rows(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in SAME} == {k: rb[k] for k in SAME}, ra["step"]


@pytest.fixture(scope="session")
def straight(tmp_path_factory, gym_env):
    """An uninterrupted 6-step run (checkpoint every 2 steps): what every interrupted,
    killed and resumed run below must end up equal to."""
    cwd = tmp_path_factory.mktemp("straight")
    proc = gym([*TINY, "trainer.max_steps=6", "trainer.save_every=2", "run.name=straight"],
               cwd, gym_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "runs" / "straight"
