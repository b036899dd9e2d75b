"""One process per run directory: a second one gets a one-line error naming the holder's
process id, before it writes anything; the lock dies with its holder (kill -9)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from gym_core.base.errors import GymError
from gym_core.train.rundir import RunInUse, acquire, release
from tests.conftest import compose
from tests.reliability.conftest import (
    TINY,
    assert_one_line_error,
    gym,
    metrics,
    start,
    stderr,
    tree,
    wait_for,
)

HOLD = textwrap.dedent("""
    import sys, time
    from gym_core.train.rundir import acquire
    acquire(sys.argv[1])
    print("held", flush=True)
    time.sleep(600)
""")


@pytest.fixture
def holder(tmp_path):
    """Another process holding runs/taken's lock (and nothing else)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "runs" / "taken")],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("sweep", [[], ["-m", "algorithm.lr=1e-5,2e-5"]])
def test_a_second_process_is_refused_in_one_line(tmp_path, gym_env, holder, sweep):
    """A run, or a sweep whose folder is the same (each of its jobs locks its own too)."""
    proc = gym(["model=tiny", "run.name=taken", *sweep], tmp_path, gym_env, timeout=120)
    line = assert_one_line_error(proc, "is in use by process", str(holder.pid), "run.name")
    assert "runs/taken" in line
    assert sorted(p.name for p in (tmp_path / "runs" / "taken").iterdir()) == [".gym.lock"]


def test_in_process_callers_get_the_same_error(tmp_path, holder):
    """run_job (notebooks, a UI launching runs) raises RunInUse, a GymError with the pid."""
    from gym_core.train.job import run_job

    with pytest.raises(RunInUse) as info:
        run_job(compose(["model=tiny"]), run_dir=tmp_path / "runs" / "taken")
    assert info.value.pid == holder.pid and isinstance(info.value, GymError)
    assert str(holder.pid) in str(info.value) and "\n" not in str(info.value)


def test_the_lock_dies_with_its_holder(tmp_path, holder):
    folder = tmp_path / "runs" / "taken"
    with pytest.raises(RunInUse):
        acquire(folder)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    acquire(folder)  # no stale lock to clear by hand
    release(folder)


def test_two_gym_processes_on_one_run(tmp_path, gym_env):
    """While a run trains, the same command (with another learning rate) stops at once,
    naming the trainer's pid; the run goes on and ends as if alone, its recorded config
    untouched by the second command."""
    args = [*TINY, "trainer.max_steps=4", "trainer.save_every=2", "run.name=shared"]
    run_dir = tmp_path / "runs" / "shared"
    first = start(args, tmp_path, gym_env, delay=1.0)
    wait_for(lambda: (run_dir / "metrics.jsonl").is_file(), first, what="the first step")
    recorded = tree(run_dir / ".hydra")
    second = gym([*args, "algorithm.lr=0.5"], tmp_path, gym_env, timeout=120)
    assert_one_line_error(second, "is in use by process", str(first.pid))
    assert tree(run_dir / ".hydra") == recorded
    first.wait(timeout=600)
    assert first.returncode == 0, stderr(first)[-3000:]
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]  # each step logged once
