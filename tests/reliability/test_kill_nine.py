"""kill -9 at random moments and inside every kind of write, then resume: nothing lost,
no partial write left behind, the same weights and metrics as an uninterrupted run.
Also the files a kill can leave: a torn metrics line, old and new temporaries, a folder
moved aside while being replaced, a TensorBoard log with steps that are redone."""

from __future__ import annotations

import json
import random
import shutil
import signal
import time

from gym_core.base.files import remove_stale_temporaries
from tests.reliability.conftest import (
    TINY,
    assert_same_rows,
    assert_same_weights,
    final_weights,
    gym,
    metrics,
    start,
    temporaries,
    wait_for,
)


def test_kill_nine_anywhere_loses_nothing(tmp_path, gym_env, straight):
    """Four kills of one run (seeded, so a failure replays): at a random moment of a
    step, inside a checkpoint's write, inside metrics.jsonl's rewrite on resume, inside
    final/'s write; then the run is resumed to its end."""
    rng = random.Random(20250101)
    args = [*TINY, "trainer.max_steps=6", "trainer.save_every=2", "run.name=killed"]
    run_dir = tmp_path / "runs" / "killed"
    # (what to wait for on stdout, extra seconds before the kill)
    kills = [
        (("TEST: writing", "run.json"), rng.uniform(2.0, 5.0)),  # somewhere in steps 1-3
        (("TEST: writing", "checkpoints/.step-"), 0.0),  # a checkpoint half-written
        (("TEST: writing", ".metrics.jsonl.tmp-"), 0.0),  # the resume's metrics rewrite
        (("TEST: writing", ".final.tmp-"), 0.0),  # the trained adapter half-written
    ]
    for needles, extra in kills:
        if needles[1] == ".metrics.jsonl.tmp-" and not past_checkpoint(run_dir):
            # no row past the newest checkpoint, so no rewrite: add one, as a kill after a
            # step's row and before its checkpoint leaves
            last = metrics(run_dir)[-1]
            with (run_dir / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps({**last, "step": last["step"] + 1}) + "\n")
        proc = start(args, tmp_path, gym_env, delay=0.5)
        wait_for(lambda p=proc, n=needles: p.out.has(*n), proc, what=" and ".join(needles))
        time.sleep(extra)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
    assert temporaries(run_dir), "the kills inside writes should have left temporaries"

    done = gym(args, tmp_path, gym_env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "partial writes" in done.stdout  # it said what it removed
    assert temporaries(run_dir) == []
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # every step once
    assert_same_rows(rows, metrics(straight))
    assert_same_weights(final_weights(run_dir), final_weights(straight))
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6


def past_checkpoint(run_dir) -> bool:
    newest = max((int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step-*")), default=0)
    return any(r["step"] > newest for r in metrics(run_dir))


def test_a_torn_last_metrics_line_is_dropped_and_the_run_resumes(tmp_path, gym_env):
    """Power loss while a row was appended: the run resumes, drops the torn line with a
    warning, and logs the step again."""
    args = [*TINY, "trainer.max_steps=3", "trainer.save_every=2", "run.name=torn"]
    first = gym([*args[:-2], "trainer.max_steps=2", "trainer.save_every=2", "run.name=torn"],
                tmp_path, gym_env)
    assert first.returncode == 0, first.stderr[-3000:]
    path = tmp_path / "runs" / "torn" / "metrics.jsonl"
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"step": 3, "loss": 0.12')  # cut mid-row, no newline
    second = gym(args, tmp_path, gym_env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Traceback" not in second.stderr
    assert any("dropped its torn last line" in ln for ln in second.stderr.splitlines())
    assert [r["step"] for r in metrics(tmp_path / "runs" / "torn")] == [1, 2, 3]
    assert path.read_bytes().startswith(whole)  # rows 1-2 kept byte for byte


def test_stale_temporaries_are_removed_and_a_folder_moved_aside_comes_back(tmp_path):
    ckpts = tmp_path / "checkpoints"
    (ckpts / ".tmp-step-000010-4242").mkdir(parents=True)  # gym 0.1's partial checkpoint
    (ckpts / ".tmp-step-000010-4242" / "trainer_state.pt").write_bytes(b"\0" * 4096)
    (ckpts / ".step-000020.tmp-4243-ab12cd").mkdir()  # today's
    (tmp_path / ".summary.json.tmp-4244-x1").write_text("{")
    (tmp_path / "summary.json.tmp").write_text("{")  # gym 0.1's file temporaries
    # killed between moving final/ aside and renaming the new one in: final/ comes back
    (tmp_path / ".final.old-4245-ee").mkdir()
    (tmp_path / ".final.old-4245-ee" / "adapter_model.safetensors").write_bytes(b"weights")
    # a replaced checkpoint whose successor did arrive: the old copy goes
    (ckpts / "step-000030").mkdir()
    (ckpts / ".step-000030.old-4246-ff").mkdir()
    removed = remove_stale_temporaries(ckpts) + remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted([
        ".tmp-step-000010-4242", ".step-000020.tmp-4243-ab12cd", ".step-000030.old-4246-ff",
        ".summary.json.tmp-4244-x1", "summary.json.tmp"])
    assert (tmp_path / "final" / "adapter_model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "final"]
    assert [p.name for p in ckpts.iterdir()] == ["step-000030"]


def test_tensorboard_shows_a_redone_step_once(tmp_path, gym_env):
    """Steps logged after the checkpoint a run resumes from are purged from TensorBoard
    (and metrics.jsonl), so a redone step is not shown twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base = [a for a in TINY if a != "trainer.tensorboard=false"]
    first = gym([*base, "trainer.max_steps=3", "trainer.save_every=2", "run.name=tb"],
                tmp_path, gym_env)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tb"
    # as if killed after step 3's row and before its checkpoint: resume from step 2
    shutil.rmtree(run_dir / "checkpoints" / "step-000003")
    second = gym([*base, "trainer.max_steps=4", "trainer.save_every=2", "run.name=tb"],
                 tmp_path, gym_env)
    assert second.returncode == 0, second.stderr[-3000:]
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == [1, 2, 3, 4], steps
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]
