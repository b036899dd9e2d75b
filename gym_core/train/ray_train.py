"""``trainer.backend=ray``: the same job under Ray Train's ``TorchTrainer``.

Ray Train starts ``ray.num_workers`` worker processes (actors) on a Ray cluster, connects
them with ``torch.distributed`` (gloo on CPU, NCCL on GPU) and sets the ``RANK`` /
``WORLD_SIZE`` variables torchrun would set; each worker then runs gym's ordinary job
(:func:`gym_core.train.job.run_job`) on the config composed from the same overrides. So a
Ray run is a torchrun run started by Ray: the same seed gives the same losses and weights,
rank 0 alone writes, and the run folder holds gym's own checkpoints, metrics and summary,
which resume, export, serve, eval and the UI read like any run's.

The driver (``python -m gym_core ... trainer.backend=ray``) holds the run folder's lock for
the whole job; the workers work in that folder without locking it. Ray's own records
(``ray/``) are kept in the run folder too (``RunConfig.storage_path``).

Failures: a worker that dies (``kill -9``, a lost node) makes Ray Train restart the whole
worker group up to ``ray.max_failures`` times; the restarted workers run the job again, and
gym's resume continues from the last checkpoint in the run folder (docs/scale.md "Ray").
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gym_core.base.errors import GymError

#: Set in the workers: the driver holds the run folder's lock for them.
WORKER_ENV = "GYM_RAY_WORKER"


def import_ray():
    try:
        import ray
        import ray.train  # noqa: F401
        import ray.train.torch  # noqa: F401
    except ImportError as exc:
        raise GymError(f"trainer.backend=ray needs Ray Train ({exc.name or exc} is missing): "
                       "pip install 'gym-core[ray]'") from None
    return ray


def check_reachable(address: str, setting: str = "ray.address") -> None:
    """A ``host:port`` address must accept a TCP connection within seconds: ``ray.init``
    itself retries a silent address for minutes."""
    import socket

    if address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        port_number = int(port)
    except ValueError:
        raise GymError(f"{setting}={address}: not HOST:PORT (e.g. 127.0.0.1:6379), auto, or "
                       "unset for a local cluster") from None
    try:
        with socket.create_connection((host or "127.0.0.1", port_number), timeout=5):
            pass
    except OSError as exc:
        raise GymError(f"{setting}={address}: no Ray cluster answers there ({exc.strerror or exc}); "
                       "start one with `ray start --head`, or leave ray.address unset to "
                       "start a local one") from None


def start_ray(ray, address: str | None, num_cpus: int) -> bool:
    """Join the cluster at ``address`` (checked to answer first) or start a local one of
    ``num_cpus`` CPUs; the workers see the driver's PYTHONPATH and working folder.
    Returns whether a local cluster was started here (the caller shuts it down)."""
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in [
        os.environ.get("PYTHONPATH", ""), os.getcwd()] if p)}}
    common = {"runtime_env": env, "include_dashboard": False, "configure_logging": False,
              "log_to_driver": True}
    if not address:
        ray.init(num_cpus=num_cpus, **common)
        return True
    check_reachable(str(address))
    try:
        ray.init(address=address, **common)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GymError(f"ray.address={address}: no Ray cluster answers there ({first}); "
                       "start one with `ray start --head`, or leave ray.address unset "
                       "to start a local one") from None
    return False


def connect(cfg):
    """Join ``ray.address`` or start a local cluster; checks the cluster can hold the
    workers. Returns (ray, started_here)."""
    ray = import_ray()
    r = cfg.ray
    if ray.is_initialized():
        return ray, False
    from gym_core.base.threads import affinity

    started = start_ray(ray, r.address, max(len(affinity()),
                                            int(r.num_workers * r.cpus_per_worker + 0.999)))
    want_cpu = float(r.num_workers) * float(r.cpus_per_worker)
    have_cpu = float(ray.cluster_resources().get("CPU", 0))
    if want_cpu > have_cpu + 1e-9:
        if started:
            ray.shutdown()
        raise GymError(f"ray.num_workers={r.num_workers} x ray.cpus_per_worker="
                       f"{r.cpus_per_worker} asks for {want_cpu:g} CPUs; the cluster has "
                       f"{have_cpu:g}: lower one of them (or add nodes)")
    if r.use_gpu and ray.cluster_resources().get("GPU", 0) < r.num_workers:
        if started:
            ray.shutdown()
        raise GymError(f"ray.use_gpu=true with ray.num_workers={r.num_workers}: the cluster "
                       f"has {ray.cluster_resources().get('GPU', 0):g} GPUs")
    return ray, started


def worker_overrides(overrides: list[str], run_name: str, run_root: str) -> list[str]:
    """The driver's overrides for the workers: the same job, on the torch backend (each
    worker is one rank), in the driver's run folder (a time-stamped name resolved once)."""
    keep = [o for o in overrides
            if o.split("=", 1)[0].lstrip("+~") not in ("trainer.backend", "run.name", "run.root")]
    return [*keep, "trainer.backend=torch", f"run.name={run_name}", f"run.root={run_root}"]


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: gym's job as one rank of the process group Ray set up."""
    os.environ[WORKER_ENV] = "1"
    from ray import train

    from gym_core.plugin.startup import compose
    from gym_core.train.job import run_job

    cfg = compose(config["overrides"])
    summary = run_job(cfg, run_dir=Path(config["run_dir"]))
    ev = (summary or {}).get("eval", {})
    metrics = {"steps": summary.get("steps", 0)}
    metrics.update({f"eval_{k}": v for k, v in ev.items() if isinstance(v, (int, float))})
    train.report(metrics)


def run_on_ray(cfg, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Run the job under Ray Train; returns the summary rank 0 wrote."""
    from gym_core.train.rundir import prepare_run_dir, run_lock

    run_dir = Path(run_dir).resolve()
    with run_lock(run_dir):
        prepare_run_dir(run_dir)
        ray, started = connect(cfg)
        try:
            from ray.train import FailureConfig, RunConfig, ScalingConfig
            from ray.train.torch import TorchConfig, TorchTrainer

            r = cfg.ray
            resources = {"CPU": float(r.cpus_per_worker)}
            trainer = TorchTrainer(
                _worker,
                train_loop_config={
                    "overrides": worker_overrides(overrides, run_dir.name, str(run_dir.parent)),
                    "run_dir": str(run_dir)},
                scaling_config=ScalingConfig(num_workers=int(r.num_workers),
                                             use_gpu=bool(r.use_gpu),
                                             resources_per_worker=resources),
                torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo"),
                run_config=RunConfig(name="ray", storage_path=str(run_dir),
                                     failure_config=FailureConfig(
                                         max_failures=int(r.max_failures))),
            )
            try:
                trainer.fit()
            except Exception as exc:  # Ray wraps a worker's GymError in its own errors
                raise GymError(_worker_error(exc)) from None
        finally:
            if started:
                ray.shutdown()
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        raise GymError(f"the Ray workers ended without writing {summary_file}")
    return json.loads(summary_file.read_text(encoding="utf-8"))


def _worker_error(exc: BaseException) -> str:
    """One line for a failed Ray job: a worker's own gym error if it raised one."""
    text = str(exc)
    for line in text.splitlines():
        if "GymError:" in line:
            return line.split("GymError:", 1)[1].strip()
    failures = getattr(exc, "worker_failures", None)
    if failures:
        rank, err = sorted(failures.items())[0]
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        return f"Ray Train worker {rank} failed: {first}"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"the Ray Train job failed: {first}"
