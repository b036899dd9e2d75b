"""``trainer.backend=ray`` on a local Ray cluster started by the tests (``ray start --head``
on 127.0.0.1, 2 CPUs, stopped at the end): the same job as torchrun, rank for rank; a
worker killed with SIGKILL is restarted by Ray Train from the last checkpoint; bad
settings are one line."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

ray = pytest.importorskip("ray")
from safetensors.torch import load_file  # noqa: E402

pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A head node on loopback for every Ray test, in its own process group
    (``ray start --block``): the end stops that group only, never another Ray cluster on
    the machine (``ray stop`` would stop every one)."""
    ray_bin = Path(sys.executable).with_name("ray")
    port = _free_port()
    tmp = tmp_path_factory.mktemp("ray")
    # Token authentication, explicitly: Ray >= 2.59 turns it on for a head that finds a
    # token in ~/.ray/auth_token (which any local ray.init() writes), while its CLI
    # client sends none unless RAY_AUTH_MODE=token, so `ray status` and the jobs could not
    # reach the head. Every process of the tests gets the mode and a token of its own.
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    saved = {k: os.environ.get(k) for k in auth}
    os.environ.update(auth)  # launch() passes os.environ to the jobs
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    log = open(tmp / "head.log", "w")  # noqa: SIM115 (open while the head runs)
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         "--disable-usage-stats", f"--temp-dir={tmp}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:  # up when `ray status` reaches it
            assert head.poll() is None, (tmp / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp / "head.log").read_text()[-3000:]
            ok = subprocess.run([str(ray_bin), "status", f"--address={address}"], env=env,
                                capture_output=True, timeout=60).returncode == 0
            if ok:
                break
            time.sleep(1)
        yield address
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)  # --block stops the node's processes
            head.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        time.sleep(2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # whatever is left of the group
        head.wait(timeout=30)
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)


def launch(args, cwd, nproc=None, timeout=900, pythonpath=None, **popen):
    env = {**os.environ, "PYTHONPATH": pythonpath or os.environ.get("PYTHONPATH", str(REPO)), "OMP_NUM_THREADS": "1",
           "RAY_USAGE_STATS_ENABLED": "0"}
    head = [sys.executable, "-m", "gym_core"]
    if nproc:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}", "-m", "gym_core"]
    if popen:
        return subprocess.Popen([*head, *args], cwd=cwd, env=env, **popen)
    return subprocess.run([*head, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def wait_for(path: Path, proc, log: Path, seconds: float = 900) -> None:
    """Until ``path`` exists (the run got that far); the run must still be going."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{path} did not appear in {seconds} s"
        time.sleep(0.2)


def rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def adapter(run_dir):
    files = list((run_dir / "final").glob("*.safetensors"))
    assert files, f"no final weights in {run_dir}"
    return load_file(str(files[0]))


@pytest.fixture
def common(tiny_overrides, digits_plugin_path, monkeypatch):
    """Tiny GRPO with a reward that has spread on a random model (tests/digits_plugin.py,
    an installed plugin for every process: the Ray workers get the driver's PYTHONPATH),
    so losses, gradients and updates are not zero."""
    monkeypatch.setenv("PYTHONPATH", digits_plugin_path)
    return [*tiny_overrides, "trainer.batch_size=2", "algorithm.lr=1e-2",
            "algorithm.rewards=[digit_share]", "trainer.eval_size=8",
            "trainer.eval_before=false", "trainer.threads=1"]


def test_ray_train_equals_torchrun(tmp_path, ray_cluster, common):
    """Two Ray Train workers and two torchrun ranks: the same losses and final weights."""
    args = [*common, "trainer.max_steps=3", "trainer.save_every=1"]
    tr = launch([*args, "run.name=torchrun"], tmp_path, nproc=2)
    assert tr.returncode == 0, tr.stderr[-3000:]
    rr = launch([*args, "run.name=ray", "trainer.backend=ray", f"ray.address={ray_cluster}",
                 "ray.num_workers=2"], tmp_path)
    assert rr.returncode == 0, rr.stdout[-3000:] + rr.stderr[-3000:]
    a, b = rows(tmp_path / "runs/torchrun"), rows(tmp_path / "runs/ray")
    assert [r["step"] for r in b] == [1, 2, 3]  # rank 0 alone logs
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-7)
        assert rb["reward_mean"] == pytest.approx(ra["reward_mean"], rel=1e-6)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
    assert any(abs(r["loss"]) > 1e-6 for r in a) and all(r["grad_norm"] > 0 for r in a)
    wa, wb = adapter(tmp_path / "runs/torchrun"), adapter(tmp_path / "runs/ray")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() <= 1e-6, k
    # the run folder is an ordinary run: gym's checkpoints, summary, Ray's records beside
    ray_run = tmp_path / "runs/ray"
    assert sorted(p.name for p in (ray_run / "checkpoints").iterdir()) == [
        "step-000002", "step-000003"]
    summary = json.loads((ray_run / "summary.json").read_text())
    assert summary["steps"] == 3
    assert (ray_run / "ray").is_dir()
    # and resumes like one: more steps continue from step 3 (here on torchrun)
    more = launch([*args, "trainer.max_steps=4", "run.name=ray", "trainer.backend=ray",
                   f"ray.address={ray_cluster}"], tmp_path)
    assert more.returncode == 0, more.stdout[-2000:] + more.stderr[-2000:]
    assert [r["step"] for r in rows(ray_run)] == [1, 2, 3, 4]


def test_ray_train_with_fsdp_equals_torchrun_ddp(tmp_path, ray_cluster, common):
    """trainer.strategy=fsdp under Ray Train (2 workers): the sharded run follows
    torchrun's DDP run, losses and final adapter (tests/test_fsdp.py has the rest)."""
    args = [*common, "trainer.max_steps=2"]
    tr = launch([*args, "run.name=torchrun"], tmp_path, nproc=2)
    assert tr.returncode == 0, tr.stderr[-3000:]
    rr = launch([*args, "run.name=ray-fsdp", "trainer.backend=ray", "trainer.strategy=fsdp",
                 f"ray.address={ray_cluster}", "ray.num_workers=2"], tmp_path)
    assert rr.returncode == 0, rr.stdout[-3000:] + rr.stderr[-3000:]
    a, b = rows(tmp_path / "runs/torchrun"), rows(tmp_path / "runs/ray-fsdp")
    assert [r["step"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-6)
        assert rb["reward_mean"] == pytest.approx(ra["reward_mean"], rel=1e-6)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-3)
    wa, wb = adapter(tmp_path / "runs/torchrun"), adapter(tmp_path / "runs/ray-fsdp")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() <= 1e-5, k


def _worker_pids(run_dir: Path) -> list[int]:
    """The processes of Ray Train workers running this job (their command lines are Ray's;
    the job's folder is found in their open files' cwd-independent environment)."""
    out = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_a_killed_worker_is_restarted_from_the_last_checkpoint(tmp_path, ray_cluster, common):
    args = [*common, "trainer.max_steps=6", "trainer.save_every=1", "trainer.keep_last=10",
            "run.name=killed", "trainer.backend=ray", f"ray.address={ray_cluster}",
            "ray.num_workers=2", "ray.max_failures=2"]
    log = open(tmp_path / "driver.log", "w")  # noqa: SIM115  (the driver writes it)
    proc = launch(args, tmp_path, stdout=log, stderr=subprocess.STDOUT)
    run = tmp_path / "runs/killed"
    wait_for(run / "checkpoints/step-000002", proc, tmp_path / "driver.log")
    pids = _worker_pids(run)
    assert pids, "no Ray Train worker process found"
    os.kill(pids[-1], signal.SIGKILL)
    assert proc.wait(timeout=600) == 0, (tmp_path / "driver.log").read_text()[-4000:]
    steps = [r["step"] for r in rows(run)]
    # every step logged once, in order (a step redone after the restart replaces nothing)
    assert sorted(set(steps)) == [1, 2, 3, 4, 5, 6]
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
    text = (tmp_path / "driver.log").read_text()
    assert "resuming" in text  # the restarted workers continued from a checkpoint


@pytest.mark.parametrize("override, message", [
    ("ray.num_workers=3", "asks for 3 CPUs; the cluster has 2"),
    ("ray.num_workers=0", "ray.num_workers=0"),
])
def test_bad_ray_settings_are_one_line(tmp_path, ray_cluster, common, override, message):
    r = launch([*common, "trainer.max_steps=1", "run.name=bad", "trainer.backend=ray",
                f"ray.address={ray_cluster}", override], tmp_path, timeout=180)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    line = [x for x in r.stderr.splitlines() if x.startswith("gym: error:")]
    assert line and message in line[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_a_cluster_that_does_not_answer(tmp_path, common):
    r = launch([*common, "trainer.max_steps=1", "run.name=nobody", "trainer.backend=ray",
                f"ray.address=127.0.0.1:{_free_port()}"], tmp_path, timeout=180)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "no Ray cluster answers there" in r.stderr
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------
# rollout workers (Ray actors) and asynchronous rollouts
# ---------------------------------------------------------------------------------------


def buffer_rows(run_dir):
    from gym_core.sampling.buffer import read_buffer

    return read_buffer(run_dir)


def test_one_rollout_worker_at_staleness_0_is_the_local_run(tmp_path, ray_cluster, common):
    """The worker samples with the trainer's weights (full sync), the same seeds and
    sampler: the same completions, token for token, and the same losses."""
    args = [*common, "trainer.max_steps=3"]
    local = launch([*args, "run.name=local"], tmp_path)
    assert local.returncode == 0, local.stderr[-3000:]
    actor = launch([*args, "run.name=actor", "rollout.workers=1", "rollout.max_staleness=0",
                    f"ray.address={ray_cluster}"], tmp_path)
    assert actor.returncode == 0, actor.stdout[-3000:] + actor.stderr[-3000:]
    a, b = buffer_rows(tmp_path / "runs/local"), buffer_rows(tmp_path / "runs/actor")
    assert [r["completion_ids"] for r in a] == [r["completion_ids"] for r in b]
    for ra, rb in zip(rows(tmp_path / "runs/local"), rows(tmp_path / "runs/actor")):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-6)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-3)
        assert rb["staleness"] == 0
    assert all(r["grad_norm"] > 0 for r in rows(tmp_path / "runs/local"))


def test_ray_train_ranks_share_a_rollout_worker(tmp_path, ray_cluster, common):
    """Two Ray Train ranks (half a CPU each) and one rollout worker (one CPU) on the
    2-CPU cluster: rank 0 asks the worker for each rank's share and scatters it, so the
    run samples what two torchrun ranks sample themselves, token for token, and trains
    to the same losses."""
    args = [*common, "trainer.max_steps=2"]
    tr = launch([*args, "run.name=torchrun"], tmp_path, nproc=2)
    assert tr.returncode == 0, tr.stderr[-3000:]
    rr = launch([*args, "run.name=ray-actor", "trainer.backend=ray", "ray.num_workers=2",
                 "ray.cpus_per_worker=0.5", "rollout.workers=1", "rollout.cpus_per_worker=1",
                 "rollout.max_staleness=0", f"ray.address={ray_cluster}"], tmp_path,
                timeout=600)
    assert rr.returncode == 0, rr.stdout[-3000:] + rr.stderr[-3000:]
    a, b = buffer_rows(tmp_path / "runs/torchrun"), buffer_rows(tmp_path / "runs/ray-actor")
    assert len(b) == 2 * 2 * 2 * 4  # steps x ranks x prompts x generations
    assert [r["completion_ids"] for r in a] == [r["completion_ids"] for r in b]
    assert {(r["step"], r["policy_version"]) for r in b} == {(1, 0), (2, 1)}
    for ra, rb in zip(rows(tmp_path / "runs/torchrun"), rows(tmp_path / "runs/ray-actor")):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-6)
        assert rb["staleness"] == 0 and rb["sync_bytes"] > 0


def test_multi_turn_episodes_in_a_rollout_worker_are_the_local_ones(tmp_path, ray_cluster,
                                                                     common):
    """env=calculator in the worker: the same episodes, token for token (model and
    environment tokens alike), the same turns and losses as the trainer's own."""
    args = [*common, "trainer.max_steps=2", "env=calculator", "env.max_tokens=24",
            "algorithm.num_generations=2"]
    local = launch([*args, "run.name=local-env"], tmp_path)
    assert local.returncode == 0, local.stderr[-3000:]
    actor = launch([*args, "run.name=actor-env", "rollout.workers=1",
                    "rollout.max_staleness=0", f"ray.address={ray_cluster}"], tmp_path)
    assert actor.returncode == 0, actor.stdout[-3000:] + actor.stderr[-3000:]
    a, b = buffer_rows(tmp_path / "runs/local-env"), buffer_rows(tmp_path / "runs/actor-env")
    assert a and [r["completion_ids"] for r in a] == [r["completion_ids"] for r in b]
    for ra, rb in zip(a, b):  # the trainer trains on the worker's tokens and log-probs
        assert rb["behaviour_logprobs"] == pytest.approx(ra["behaviour_logprobs"], abs=1e-4)
    for ra, rb in zip(rows(tmp_path / "runs/local-env"), rows(tmp_path / "runs/actor-env")):
        assert rb["env/turns"] == ra["env/turns"] and rb["env/errors"] == 0
        assert rb["env/environment_tokens"] == ra["env/environment_tokens"]
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4, abs=1e-6)
        assert rb["staleness"] == 0


@pytest.mark.parametrize("extra, nproc, message", [
    (["rollout.cpus_per_worker=3", "ray.address={cluster}"], None,
     "asks for 3 CPUs; the Ray cluster has"),
    (["trainer.strategy=fsdp"], 2, "rollout.workers > 0 with trainer.strategy=fsdp"),
])
def test_bad_rollout_worker_settings_are_one_line(tmp_path, ray_cluster, common, extra,
                                                  nproc, message):
    r = launch([*common, "trainer.max_steps=1", "run.name=bad", "rollout.workers=1",
                *[x.format(cluster=ray_cluster) for x in extra]], tmp_path, nproc=nproc,
               timeout=300)
    assert r.returncode != 0, r.stdout[-2000:] + r.stderr[-2000:]
    line = [x for x in r.stderr.splitlines() if "gym: error:" in x]
    assert line and message in line[0], r.stderr[-2000:]
    assert nproc or (r.returncode == 2 and "Traceback" not in r.stderr)


def test_staleness_1_trains_on_the_previous_policy(tmp_path, ray_cluster, common):
    args = [*common, "trainer.max_steps=4", "run.name=async", "rollout.workers=1",
            "rollout.max_staleness=1", "rollout.weight_sync=bitdelta",
            f"ray.address={ray_cluster}"]
    r = launch(args, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = rows(tmp_path / "runs/async")
    assert [x["staleness"] for x in m] == [0, 1, 1, 1]
    assert all(x["sync_bytes"] > 0 for x in m)
    buf = buffer_rows(tmp_path / "runs/async")
    assert {(x["step"], x["policy_version"]) for x in buf} == {(1, 0), (2, 0), (3, 1), (4, 2)}
    assert {x["staleness"] for x in buf if x["step"] > 1} == {1}


def test_a_dead_rollout_worker_is_replaced(tmp_path, ray_cluster, common):
    """kill -9 of the actor's process mid-run: the step is asked for again on a new
    actor and the run finishes. The driver is stopped (SIGSTOP) while the actor is killed,
    so a fast run cannot finish between seeing step 2 and the kill."""
    steps = 20
    args = [*common, f"trainer.max_steps={steps}", "trainer.save_every=1",
            "run.name=actor-dies", "rollout.workers=1", f"ray.address={ray_cluster}"]
    log = open(tmp_path / "driver.log", "w")  # noqa: SIM115  (the driver writes it)
    proc = launch(args, tmp_path, stdout=log, stderr=subprocess.STDOUT)
    run = tmp_path / "runs/actor-dies"
    deadline = time.monotonic() + 900
    def done() -> int:  # complete lines only: the driver may be mid-write
        f = run / "metrics.jsonl"
        return f.read_text().count("\n") if f.exists() else 0

    while done() < 2:
        assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the run did not reach step 2 in 900 s"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        assert done() < steps, "the run finished before the actor could be killed"
        out = subprocess.run(["pgrep", "-f", "RolloutWorker"], capture_output=True, text=True)
        pids = [int(p) for p in out.stdout.split()]
        assert pids, "no rollout worker process found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert proc.wait(timeout=600) == 0, (tmp_path / "driver.log").read_text()[-4000:]
    m = rows(run)
    assert [x["step"] for x in m] == list(range(1, steps + 1))
    assert m[-1]["rollout_workers_replaced"] >= 1


def test_hydra_ray_launcher_runs_a_sweep_on_the_cluster(tmp_path, ray_cluster, tiny_overrides):
    """A multirun whose jobs are Ray tasks (hydra-ray-launcher) on the same cluster: every
    job's run folder and the sweep summary."""
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    # null: the launcher sets a default object_store_memory, which joining a cluster refuses
    args = ["-m", "hydra/launcher=ray", f"hydra.launcher.ray.init.address={ray_cluster}",
            "+hydra.launcher.ray.init.object_store_memory=null",
            "+hydra.launcher.ray.remote.num_cpus=1", *tiny_overrides, "trainer.max_steps=1",
            "trainer.eval_before=false", "algorithm.lr=1e-3,1e-2", "run.name=raygrid",
            # the jobs run in Ray's worker processes, whose working folder is Ray's own
            f"run.root={tmp_path / 'runs'}"]
    r = launch(args, tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sweep = tmp_path / "runs/raygrid"
    jobs = json.loads((sweep / "sweep_summary.json").read_text())
    assert len(jobs) == 2
    for job in ("0", "1"):
        assert json.loads((sweep / job / "summary.json").read_text())["steps"] == 1
