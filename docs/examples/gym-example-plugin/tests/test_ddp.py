"""The example's REINFORCE under ``torchrun`` with 2 processes keeps the ranks identical:
each rank records the checksum of its trainable weights (``policy.trainable_parameters()``)
after every step, and the ranks agree bit for bit. Its log-probs come from
``policy.logprobs`` (through DDP, so the gradients are averaged) and its baseline is a mean
over both ranks (``prepare_step`` with ``sum_over_ranks``), so the advantages agree too.

Copy this test for your own algorithm: ``replicas.py`` wraps the class and registers it
as a test-only plugin (an entry point on ``PYTHONPATH``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_under_torchrun_the_ranks_hold_the_same_weights(tmp_path):
    site = tmp_path / "site"
    info = site / "replicas_test-0.1.dist-info"  # the test plugin, "installed" by metadata
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: replicas-test\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[gym_core]\nreplicas = replicas\n")
    replicas = tmp_path / "replicas"
    replicas.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REPLICA_DIR": str(replicas),
           "PYTHONPATH": os.pathsep.join([str(HERE), str(site),
                                          *filter(None, [os.environ.get("PYTHONPATH")])])}
    steps = 2
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "gym_core", "model=tiny", "algorithm=checked_reinforce", "algorithm.lr=1e-2",
         "algorithm.rewards=[digit_share]", "algorithm.reward_weights=[1.0]",
         "algorithm.max_completion_length=8", "trainer.batch_size=2",
         f"trainer.max_steps={steps}", "trainer.eval_before=false", "trainer.eval_size=4",
         "trainer.eval_max_new_tokens=4", "trainer.progress=false",
         "trainer.tensorboard=false", "run.name=ddp"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rank0 = (replicas / "rank0.txt").read_text().split()
    rank1 = (replicas / "rank1.txt").read_text().split()
    assert len(rank0) == steps and rank0 == rank1
    assert len(set(rank0)) == steps  # every step changed the weights
