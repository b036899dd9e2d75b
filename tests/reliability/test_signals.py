"""SIGINT and SIGTERM: the step in progress finishes, a checkpoint is written, one line
says where and how to resume, exit 130 / 143; resuming with that line's command gives
the run an uninterrupted one would have been; a second Ctrl-C exits at once."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gym_core.train.checkpoint import list_checkpoints
from tests.conftest import REPO
from tests.reliability.conftest import (
    TINY,
    assert_same_rows,
    assert_same_weights,
    final_weights,
    gym_lines,
    metrics,
    start,
    stderr,
    temporaries,
    wait_for,
)


def catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (Linux: SigCgt in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(ln for ln in status.splitlines() if ln.startswith("SigCgt:")).split()[1], 16)
    return bool(mask >> (int(sig) - 1) & 1)


def rows_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_a_second_ctrl_c_right_after_the_first_exits_at_once(tmp_path, gym_env):
    """README: a second Ctrl-C exits at once, however soon it follows the first (outside
    torchrun, which doubles a Ctrl-C, no grace period)."""
    args = [*TINY, "trainer.max_steps=50", "trainer.save_every=null", "run.name=quick"]
    run_dir = tmp_path / "runs" / "quick"
    proc = start(args, tmp_path, gym_env, delay=4.0)
    wait_for(lambda: rows_logged(run_dir) >= 1, proc, what="a step")
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: "stopping after the current step" in stderr(proc), proc, timeout=60,
             what="the first signal's line")
    proc.send_signal(signal.SIGINT)  # at once: no second to wait
    proc.wait(timeout=60)
    err = stderr(proc)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert "SIGINT again: exiting at once" in gym_lines(err)[-1]
    assert list_checkpoints(run_dir) == [] and temporaries(run_dir) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_and_says_how_to_resume(tmp_path, gym_env, straight, sig):
    """No checkpoint is due before step 6 (save_every=null): without the handler, the steps
    done would be lost. SIGTERM is a scheduler's pre-emption; SIGINT is Ctrl-C."""
    name = f"sig{int(sig)}"
    args = [*TINY, "trainer.max_steps=6", "trainer.save_every=null", f"run.name={name}"]
    run_dir = tmp_path / "runs" / name
    proc = start(args, tmp_path, gym_env)
    wait_for(lambda: rows_logged(run_dir) >= 2, proc, what="two steps")
    proc.send_signal(sig)
    proc.wait(timeout=120)
    err = stderr(proc)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    line = gym_lines(err)[-1]
    step = len(metrics(run_dir))
    assert 2 <= step < 6
    saved = list_checkpoints(run_dir)
    assert [s for s, _ in saved] == [step]  # the step in progress finished, then saved
    assert line.startswith(f"gym: interrupted by {sig.name} at step {step}; checkpoint saved "
                           f"in {saved[0][1]}; resume with: python -m gym_core "), line
    assert f"run.name={name}" in line
    assert temporaries(run_dir) == []

    # resume with the printed command, as a user would paste it
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[:3] == ["python", "-m", "gym_core"]
    done = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, env=gym_env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"from step {step}" in done.stdout
    if sig == signal.SIGTERM:  # the whole comparison once is enough
        assert_same_rows(metrics(run_dir), metrics(straight))
        assert_same_weights(final_weights(run_dir), final_weights(straight))


def test_a_second_ctrl_c_exits_at_once(tmp_path, gym_env):
    """The first Ctrl-C asks for a checkpoint; one during that (slow) checkpoint's write
    exits at once: the write is abandoned whole, the previous checkpoint stays newest."""
    args = [*TINY, "trainer.max_steps=6", "trainer.save_every=2", "run.name=twice"]
    run_dir = tmp_path / "runs" / "twice"
    proc = start(args, tmp_path, gym_env, delay=4.0)
    # the first checkpoint (step 2) completes, slowly; stop after step 3 (or 4)
    wait_for(lambda: [s for s, _ in list_checkpoints(run_dir)] == [2], proc,
             what="the step-2 checkpoint")
    wait_for(lambda: rows_logged(run_dir) >= 3, proc, what="step 3")
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: proc.out.has("TEST: writing", "checkpoints/.step-000003") or
             proc.out.has("TEST: writing", "checkpoints/.step-000004"), proc,
             what="the next checkpoint's write")
    asked = time.monotonic()
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: "SIGINT again" in stderr(proc), timeout=60, what="the exit line")
    # it stops at once, not after the 12 s the checkpoint's three files take
    assert time.monotonic() - asked < 3
    proc.wait(timeout=60)
    err = stderr(proc)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "SIGINT again: exiting at once" in gym_lines(err)[-1]
    assert [s for s, _ in list_checkpoints(run_dir)] == [2]
    assert temporaries(run_dir) == []


def test_ctrl_c_outside_a_step_is_one_line(tmp_path, gym_env):
    """While the job starts (before the first checkpoint exists) there is no step to
    finish: one line, exit 130, nothing half-written (the write in progress is undone)."""
    args = [*TINY, "trainer.max_steps=6", "run.name=early"]
    run_dir = tmp_path / "runs" / "early"
    proc = start(args, tmp_path, gym_env, delay=3.0)
    wait_for(lambda: proc.out.has("TEST: writing", "run.json"), proc, what="run.json")
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    err = stderr(proc)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = gym_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("gym: interrupted by SIGINT before the first checkpoint"), lines
    assert "start again with: python -m gym_core" in lines[0]
    assert temporaries(run_dir) == [] and not (run_dir / "run.json").exists()


def test_ctrl_c_while_python_starts_is_one_line(tmp_path):
    """Ctrl-C during the seconds torch takes to import: no 130-line traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gym_core", "model=tiny", "run.name=boot"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    # gym's handlers are in place once SIGTERM is caught (Python itself catches SIGINT)
    wait_for(lambda: catches(proc.pid, signal.SIGTERM), proc, what="gym's signal handlers")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert gym_lines(err) and gym_lines(err)[-1].startswith("gym: interrupted by SIGINT"), err


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def rank_of(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((e[5:].decode() for e in env if e.startswith(b"RANK=")), None)


def test_under_torchrun_the_ranks_stop_at_the_same_step(tmp_path, gym_env):
    """SIGTERM to rank 1 alone (as a node's pre-emption may): the ranks agree through
    the step's stop flag, rank 0 writes the checkpoint and prints the line; no rank is
    left waiting in a collective."""
    args = [*TINY, "trainer.max_steps=8", "trainer.save_every=null", "run.name=ddp"]
    run_dir = tmp_path / "runs" / "ddp"
    err = tmp_path / "stderr"
    with open(err, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "-m", "gym_core", *args], cwd=tmp_path, env=gym_env, stdout=subprocess.DEVNULL,
            stderr=fh)
        wait_for(lambda: rows_logged(run_dir) >= 2, proc, what="two steps")
        ranks = {rank_of(c): c for c in children(proc.pid)}
        os.kill(ranks["1"], signal.SIGTERM)
        proc.wait(timeout=180)
    text = err.read_text()
    step = len(metrics(run_dir))
    assert [s for s, _ in list_checkpoints(run_dir)] == [step], text[-3000:]
    lines = [ln for ln in gym_lines(text) if ln.startswith("gym: interrupted")]
    assert len(lines) == 1, text[-3000:]
    assert lines[0].startswith(f"gym: interrupted by SIGTERM at step {step}; checkpoint saved in")
    assert "resume with: torchrun --nproc_per_node=2 -m gym_core" in lines[0]
