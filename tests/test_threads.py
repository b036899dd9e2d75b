"""gym's thread count: the CPUs it is given, divided among the gym processes sharing them."""

from __future__ import annotations

import os
import subprocess
import sys

from gym_core.base import threads
from gym_core.base.threads import ThreadPlan, cgroup_cpus, cpu_budget, prepare_environment


def test_cgroup_quota_v2_and_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpus(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpus(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cgroup_cpus(v1) == 0.5
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    assert cgroup_cpus(v1) is None


def test_budget_follows_affinity_and_torchrun_ranks(monkeypatch):
    monkeypatch.setattr(threads, "affinity", lambda: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "cgroup_cpus", lambda: None)
    assert cpu_budget({}) == 4
    assert cpu_budget({"LOCAL_WORLD_SIZE": "2"}) == 2
    assert cpu_budget({"LOCAL_WORLD_SIZE": "8"}) == 1
    monkeypatch.setattr(threads, "cgroup_cpus", lambda: 1.5)
    assert cpu_budget({}) == 2  # a quota of 1.5 CPUs: two threads


def test_cpus_are_divided_among_live_gym_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(threads, "affinity", lambda: {0, 1})
    monkeypatch.setattr(threads, "cgroup_cpus", lambda: None)
    plan = ThreadPlan(None, environ={}, folder=tmp_path)
    try:
        assert (tmp_path / str(os.getpid())).read_text() == "0,1"
        assert plan.threads() == 2
        # another gym process on the same CPUs: one thread each
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            (tmp_path / str(other.pid)).write_text("1")
            assert plan.threads() == 1
            (tmp_path / "999999999").write_text("0,1")  # a process that died: ignored
            (tmp_path / "elsewhere").write_text("0,1")
            assert plan.threads() == 1
            assert not (tmp_path / "999999999").exists()
        finally:
            other.kill()
            other.wait()
        assert plan.threads() == 2  # it ended: both CPUs again
        # a process on other CPUs does not count
        (tmp_path / str(os.getppid())).write_text("5,6")
        assert plan.threads() == 2
    finally:
        plan.close()
    assert not (tmp_path / str(os.getpid())).exists()


def test_a_fixed_number_wins(tmp_path):
    assert ThreadPlan(3, environ={}, folder=tmp_path).threads() == 3
    plan = ThreadPlan(None, environ={"OMP_NUM_THREADS": "1"}, folder=tmp_path)
    assert (plan.threads(), plan.source) == (1, "OMP_NUM_THREADS")  # joblib's workers
    assert not any(tmp_path.iterdir())  # fixed: not registered
    # trainer.threads=0 is refused by the config check (TrainerConfig declares >= 1;
    # tests/reliability/test_config_ranges.py)


def test_a_kept_count_does_not_follow_the_neighbours(tmp_path, monkeypatch):
    """A run computes with one count from start to end (results differ in the last bits
    between counts): the count at its start, or the one its run.json recorded."""
    monkeypatch.setattr(threads, "affinity", lambda: {0, 1})
    monkeypatch.setattr(threads, "cgroup_cpus", lambda: None)
    plan = ThreadPlan(None, environ={}, folder=tmp_path)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        plan.keep()
        assert (plan.threads(), plan.source) == (2, "auto, kept for the run")
        (tmp_path / str(other.pid)).write_text("0,1")  # a neighbour starts
        assert plan.threads() == 2
        assert (tmp_path / str(os.getpid())).exists()  # still counted by the neighbours
        resumed = ThreadPlan(None, environ={}, folder=tmp_path)
        assert resumed.threads() == 1  # what it would pick now
        resumed.keep(recorded=2)
        assert (resumed.threads(), resumed.source) == (2, "run.json")
        fixed = ThreadPlan(1, environ={}, folder=tmp_path)
        fixed.keep(recorded=2)  # trainer.threads wins over the record
        assert fixed.threads() == 1
        resumed.close()
    finally:
        other.kill()
        other.wait()
        plan.close()


def test_openmp_spinning_is_bounded_unless_the_user_chose():
    env = {}
    prepare_environment(env)
    assert env == {"GOMP_SPINCOUNT": threads.SPIN_COUNT}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    prepare_environment(env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_a_run_sets_torchs_threads_from_trainer_threads(tmp_path, tiny_overrides):
    import torch

    from gym_core.plugin.startup import compose
    from gym_core.train.job import run_job

    before = torch.get_num_threads()
    seen = []
    from gym_core.train import loop as train_module

    real = train_module.rebalance

    def spy():
        seen.append(torch.get_num_threads())
        return real()

    train_module.rebalance = spy
    try:
        cfg = compose([*tiny_overrides, "trainer.max_steps=1", "trainer.threads=1",
                       "trainer.eval_before=false", "run.name=threads"])
        run_job(cfg, tmp_path / "run")
    finally:
        train_module.rebalance = real
        torch.set_num_threads(before)
    assert seen == [1]


def test_a_resumed_run_keeps_its_recorded_thread_count(tmp_path, tiny_overrides, monkeypatch):
    """run.json records the count; a resume without trainer.threads computes with it
    whatever its neighbours are now; trainer.threads overrides it (and is recorded)."""
    import json

    import torch

    from gym_core.plugin.startup import compose
    from gym_core.train import loop as train_module
    from gym_core.train.job import run_job

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    seen = []
    real = train_module.rebalance
    monkeypatch.setattr(train_module, "rebalance", lambda: seen.append(real()) or seen[-1])
    args = [*tiny_overrides, "trainer.eval_before=false", "trainer.save_every=1"]
    try:
        run_job(compose([*args, "trainer.max_steps=1", "trainer.threads=2"]), tmp_path)
        assert json.loads((tmp_path / "run.json").read_text())["threads"] == 2
        monkeypatch.setattr(threads, "cpu_budget", lambda environ=None: 1)  # auto: 1 now
        run_job(compose([*args, "trainer.max_steps=2"]), tmp_path)
        assert json.loads((tmp_path / "run.json").read_text())["threads"] == 2
        run_job(compose([*args, "trainer.max_steps=3", "trainer.threads=1"]), tmp_path)
        assert json.loads((tmp_path / "run.json").read_text())["threads"] == 1
    finally:
        torch.set_num_threads(before)
    assert seen == [2, 2, 1]
    assert threads._plan is None  # released at the end of the job
