"""Data-parallel training with torchrun (gloo on CPU): the same global batch over 2
processes gives the same trajectory as 1 process; rank 0 alone writes; resume works."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, plugin_site


def launch(args, cwd, pythonpath, nproc=None, env=None):
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", **(env or {})}
    head = [sys.executable, "-m", "gym_core"]
    if nproc:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}", "-m", "gym_core"]
    return subprocess.run([*head, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, digits_plugin_path,
                                                              tiny_overrides):
    common = [*tiny_overrides, "algorithm.rewards=[digit_share]", "algorithm.lr=1e-2",
              "trainer.max_steps=3", "trainer.save_every=1", "trainer.eval_size=16"]
    one = launch([*common, "trainer.batch_size=4", "run.name=one"], tmp_path, digits_plugin_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch([*common, "trainer.batch_size=2", "run.name=two"], tmp_path, digits_plugin_path,
                 nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]

    a, b = rows(tmp_path / "runs/one"), rows(tmp_path / "runs/two")
    assert [r["step"] for r in b] == [1, 2, 3]  # rank 0 alone logs: no duplicate rows
    # Tolerance: the same completions are sampled (per-example seeds), so rewards agree up
    # to float32 averaging (1e-6 relative); losses differ only by float reduction order
    # across 2 ranks (gloo all-reduce, smaller matmuls), well under 1e-4 relative. The
    # on-policy loss is 0 up to rounding (advantages sum to 0 in each group), and the
    # sampler-mismatch weights (1 +- 1e-5, from sampler log-probs computed at another batch
    # size) move that 0 by ~1e-7: hence the absolute floor.
    for ra, rb in zip(a, b):
        assert ra["reward_mean"] == pytest.approx(rb["reward_mean"], rel=1e-6)
        assert ra["completion_length"] == pytest.approx(rb["completion_length"], rel=1e-6)
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4, abs=1e-6)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-3)
    assert any(abs(r["loss"]) > 1e-6 for r in a)  # the trajectory is not trivially zero
    sa = json.loads((tmp_path / "runs/one/summary.json").read_text())
    sb = json.loads((tmp_path / "runs/two/summary.json").read_text())
    assert sa["eval"]["after"] == pytest.approx(sb["eval"]["after"])
    ckpts = sorted(p.name for p in (tmp_path / "runs/two/checkpoints").iterdir())
    assert ckpts == ["step-000002", "step-000003"]  # keep_last=2, no stray temp dirs

    again = launch([*common, "trainer.max_steps=4", "trainer.batch_size=2", "run.name=two"],
                   tmp_path, digits_plugin_path, nproc=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stdout and "from step 3" in again.stdout
    assert [r["step"] for r in rows(tmp_path / "runs/two")] == [1, 2, 3, 4]


def test_dpo_and_kto_data_parallel(tmp_path, tiny_overrides):
    """DPO's per-pair losses do not depend on how pairs are split over ranks: 2 processes
    match 1. KTO's reference point z0 is averaged over the ranks (its mismatched pairs
    are formed within each rank's batch, so its trajectory is not compared)."""
    common = [o for o in tiny_overrides if not o.startswith("algorithm.")]
    common += ["algorithm.lr=1e-2", "trainer.max_steps=2", "trainer.eval_size=16"]
    path = str(REPO)
    one = launch([*common, "algorithm=dpo", "trainer.batch_size=4", "run.name=d1"], tmp_path, path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch([*common, "algorithm=dpo", "trainer.batch_size=2", "run.name=d2"], tmp_path,
                 path, nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    for ra, rb in zip(rows(tmp_path / "runs/d1"), rows(tmp_path / "runs/d2")):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4)
        assert ra["rewards/margins"] == pytest.approx(rb["rewards/margins"], rel=1e-3, abs=1e-6)
    kto = launch([*common, "algorithm=kto", "data=arithmetic_labels", "trainer.batch_size=4",
                  "run.name=k2"], tmp_path, path, nproc=2)
    assert kto.returncode == 0, kto.stderr[-3000:]
    assert [r["step"] for r in rows(tmp_path / "runs/k2")] == [1, 2]
    assert all("kl" in r for r in rows(tmp_path / "runs/k2"))


@pytest.mark.parametrize("algorithm,extra", [("sft", []), ("sft", ["algorithm.packing=true"]),
                                             ("orpo", [])])
def test_sft_and_orpo_data_parallel(tmp_path, tiny_overrides, algorithm, extra):
    """SFT's loss is the token mean over the whole step and ORPO's a token mean plus a
    pair mean over it, however rows are spread over ranks: 2 processes with half the
    batch each follow the 1-process trajectory. The core compares the ranks' weights
    after every step, so finishing also proves they stayed identical."""
    common = [o for o in tiny_overrides if not o.startswith("algorithm.")]
    common += [f"algorithm={algorithm}", "algorithm.lr=1e-2", "trainer.max_steps=2",
               "trainer.eval_size=8", "trainer.eval_before=false", *extra]
    path = str(REPO)
    one = launch([*common, "trainer.batch_size=4", "run.name=one"], tmp_path, path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch([*common, "trainer.batch_size=2", "run.name=two"], tmp_path, path, nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = rows(tmp_path / "runs/one"), rows(tmp_path / "runs/two")
    assert [r["step"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-3)


def replica_path(tmp_path):
    """PYTHONPATH with tests/replica_plugin.py installed as a plugin."""
    site = plugin_site(tmp_path / "replica-site", "gym-test-replicas", "replicas",
                       "tests.replica_plugin")
    return f"{REPO}{os.pathsep}{site}"


def test_an_offline_method_keeps_the_ranks_weights_identical_after_every_step(
        tmp_path, tiny_overrides):
    """Each rank records its trainable weights after every step (tests/replica_plugin.py):
    DPO's loss goes through policy.logprobs, so DDP averages the gradients and the two
    ranks hold the same weights, bit for bit, at every step."""
    common = [o for o in tiny_overrides if not o.startswith("algorithm.")]
    (tmp_path / "replicas").mkdir()
    out = launch([*common, "algorithm=checked_dpo", "algorithm.lr=1e-2", "trainer.max_steps=2",
                  "trainer.batch_size=2", "trainer.eval_before=false", "run.name=ddp-dpo"],
                 tmp_path, replica_path(tmp_path), nproc=2,
                 env={"GYM_TEST_REPLICA_DIR": str(tmp_path / "replicas")})
    assert out.returncode == 0, out.stderr[-3000:]
    rank0 = (tmp_path / "replicas/rank0.txt").read_text().split()
    rank1 = (tmp_path / "replicas/rank1.txt").read_text().split()
    # 2 steps: equal after the first update and again after the second, which started
    # from the first's weights (a third step checks nothing new)
    assert len(rank0) == 2 and rank0 == rank1
    assert len(set(rank0)) == 2  # the weights did move from step to step


@pytest.mark.parametrize("algorithm,extra", [
    ("checked_rloo", ["algorithm.beta=0.05", "algorithm.normalize_advantages=true"]),
    ("checked_ppo", ["algorithm.num_ppo_epochs=2"]),
])
def test_rloo_and_ppo_keep_the_ranks_weights_identical_after_every_step(
        tmp_path, tiny_overrides, algorithm, extra):
    """The built-in RLOO and PPO under torchrun with 2 processes: each rank records its
    trainable weights after every step (PPO's include its value head, a separate module
    that goes through DDP with the policy), and they agree bit for bit. Both reduce
    step-wide statistics (normalised advantages, whitening) over the ranks."""
    site = replica_path(tmp_path)
    plugin_site(tmp_path / "replica-site", "gym-test-digits", "digits", "tests.digits_plugin")
    (tmp_path / "replicas").mkdir()
    out = launch([*tiny_overrides, f"algorithm={algorithm}", "algorithm.lr=1e-2",
                  "algorithm.num_generations=4", "algorithm.rewards=[digit_share]",
                  "algorithm.reward_weights=[1.0]", "trainer.max_steps=2",
                  "trainer.batch_size=2", "trainer.eval_before=false", f"run.name={algorithm}",
                  *extra],
                 tmp_path, site, nproc=2, env={"GYM_TEST_REPLICA_DIR": str(tmp_path / "replicas")})
    assert out.returncode == 0, out.stderr[-3000:]
    rank0 = (tmp_path / "replicas/rank0.txt").read_text().split()
    rank1 = (tmp_path / "replicas/rank1.txt").read_text().split()
    # 2 steps: equal after the first update and again after the second, which started
    # from the first's weights (a third step checks nothing new)
    assert len(rank0) == 2 and rank0 == rank1
    assert len(set(rank0)) == 2  # the weights did move from step to step


@pytest.mark.parametrize("algorithm,message", [
    ("raw_logprobs", "completion_logprobs was called with gradients on a distributed run"),
    ("bypass_forward", "the ranks' trainable weights differ"),
])
def test_a_loss_outside_policy_logprobs_is_refused_on_a_distributed_run(
        tmp_path, tiny_overrides, algorithm, message):
    """A log-prob pass that skips the DDP-wrapped scorer would leave each rank training
    on its own gradients, the replicas drifting apart without a word. gym refuses the
    raw log-prob function with gradients under DDP, and compares the ranks' weights
    after every step to catch any other road around DDP."""
    out = launch([*tiny_overrides, f"algorithm={algorithm}", "trainer.max_steps=2",
                  "trainer.eval_before=false", f"run.name={algorithm}"],
                 tmp_path, replica_path(tmp_path), nproc=2)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr[-3000:]
