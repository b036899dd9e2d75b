"""Rollout workers as Ray actors, apart from the trainer (``rollout.workers=N``), and
asynchronous rollouts (``rollout.max_staleness=k``).

Each worker holds the policy as one plain model (base and adapter merged) and gym's own
sampler (:class:`gym_core.sampling.rollout.RolloutEngine`: the fused decoder, the same
per-example seeds, the same reward functions resolved by name from the plugins). The
trainer sends it weights in the codec ``rollout.weight_sync`` names
(:mod:`gym_core.sampling.weight_sync`) through Ray's object store, one ``ray.put`` a sync
however many workers read it.

Steps are pipelined: the rollouts of step ``s`` are asked for as soon as the weights of
step ``s - 1 - k`` are sent, so a worker samples step ``s`` while the trainer still
trains the steps before it. A worker runs its calls in the order it got them, so the
policy that sampled step ``s`` is version ``s - 1 - k`` or later (k = 0: synchronous, the
same rollouts as without workers). Every rollout comes back with the version that sampled
it; the trainer's sampler correction (TIS/MIS, docs/algorithms.md §3) weighs the lag with
the behaviour log-probs the worker recorded, and the step's ``staleness`` is a metric.

Trainer ranks (torchrun, ``trainer.backend=ray``) share the workers through rank 0
(:class:`RankedRollouts`): rank 0 alone calls the actors and pushes the weights, asking
for each rank's share of a step separately, and hands every rank its own rollouts over
``torch.distributed``. One caller keeps the order above (Ray orders an actor's calls per
caller only), and under torchrun only rank 0 needs a Ray connection.

A worker that dies (``kill -9``, a lost node) is replaced: a new actor gets the full
weights and the step's rollouts are asked for again (the same seeds, so the same
completions up to the policy version).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from gym_core.base.errors import GymError


class RolloutWorker:
    """One rollout worker (a Ray actor's class; plain Python, testable in-process)."""

    def __init__(self, config: dict, index: int = 0, threads: int | None = None):
        os.environ["GYM_ROLLOUT_WORKER"] = str(index)
        import torch
        from omegaconf import OmegaConf

        from gym_core.model.policy import Policy, load_start
        from gym_core.plugin.startup import bootstrap
        from gym_core.sampling.rollout import RolloutEngine
        from gym_core.sampling.weight_sync import Receiver

        if threads:
            torch.set_num_threads(int(threads))
        cfg = OmegaConf.create(config)  # the trainer's resolved config
        plugins = bootstrap()
        model, tok, _ = load_start(cfg.model)
        model.eval()
        model.requires_grad_(False)
        policy = Policy(model, tok, lora=False, system_prompt=cfg.data.system_prompt)
        policy.temperature = float(cfg.algorithm.temperature)
        names = list(cfg.algorithm.rewards)
        weights = cfg.algorithm.reward_weights or [1.0] * len(names)
        rewards = [(n, plugins.component("reward", n).load(), float(w))
                   for n, w in zip(names, weights)]
        from gym_core.env.setup import selected_environment

        # env=<name>: multi-turn episodes, sampled as the trainer would (the trainer has
        # checked the environment against its data rows already)
        env = selected_environment(cfg, plugins, True, [])
        self.engine = RolloutEngine(policy, cfg.algorithm, rewards, env=env)
        self.receiver = Receiver(model, plugins)
        self.version = -1
        self.index = index

    def sync(self, message: dict[str, Any], version: int) -> int:
        self.receiver.apply(message)
        self.version = int(version)
        return self.version

    def generate(self, examples: list[dict], seeds: list[int] | None):
        t0 = time.perf_counter()
        rollout = self.engine.generate(examples, seeds)
        return rollout, self.version, time.perf_counter() - t0

    def pid(self) -> int:
        return os.getpid()


class RemoteRollouts:
    """The trainer's handle on its rollout workers: submit a step's examples, get its
    rollouts back (with the policy version that sampled them), push weights."""

    def __init__(self, cfg, policy, plugins, start_version: int):
        from gym_core.sampling.weight_sync import Sender
        from gym_core.train.ray_train import import_ray

        rcfg = cfg.rollout  # its values checked against RolloutConfig's declarations
        self.ray = import_ray()
        self._started = False
        if not self.ray.is_initialized():
            self._connect(cfg)
        want = float(rcfg.workers) * float(rcfg.cpus_per_worker)
        # free CPUs: under Ray Train the trainer ranks hold theirs (ray.cpus_per_worker)
        have = float(self.ray.available_resources().get("CPU", 0))
        total = float(self.ray.cluster_resources().get("CPU", 0))
        if want > have + 1e-9:
            self.close()
            raise GymError(f"rollout.workers={rcfg.workers} x rollout.cpus_per_worker="
                           f"{rcfg.cpus_per_worker} asks for {want:g} CPUs; the Ray cluster "
                           f"has {have:g} free of {total:g}: lower one of them (fractions "
                           "work, e.g. rollout.cpus_per_worker=0.5, and "
                           "ray.cpus_per_worker for trainer ranks)")
        from omegaconf import OmegaConf

        self.cfg = cfg
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.cpus = float(rcfg.cpus_per_worker)
        self.actor_cls = self.ray.remote(RolloutWorker)
        self.sender = Sender(str(rcfg.weight_sync), policy, plugins)
        self.workers = [self._new_worker(i) for i in range(int(rcfg.workers))]
        self.version = int(start_version)
        first = self.sender.initial()
        self._last_full = (first, self.version)
        ref = self.ray.put(first)
        self.ray.get([w.sync.remote(ref, self.version) for w in self.workers])
        self.pending: dict[int, tuple[int, Any, list, list | None]] = {}
        self.sync_log: list[dict[str, float]] = []
        self.replaced = 0

    def _connect(self, cfg) -> None:
        from gym_core.base.threads import affinity
        from gym_core.train.ray_train import start_ray

        self._started = start_ray(self.ray, cfg.ray.address, len(affinity()))

    def _new_worker(self, index: int):
        threads = max(1, int(self.cpus))
        return self.actor_cls.options(num_cpus=self.cpus).remote(self.config, index, threads)

    def submit(self, step: int, examples: list[dict], seeds: list[int] | None) -> None:
        w = step % len(self.workers)
        fut = self.workers[w].generate.remote(examples, seeds)
        self.pending[step] = (w, fut, examples, seeds)

    def result(self, step: int, retries: int = 2):
        """The rollouts of ``step`` and the version that sampled them; a worker that died
        is replaced (full weights) and the step asked for again."""
        from ray.exceptions import RayActorError

        w, fut, examples, seeds = self.pending.pop(step)
        for attempt in range(retries + 1):
            try:
                rollout, version, seconds = self.ray.get(fut)
                return rollout, version, seconds
            except RayActorError as exc:
                if attempt == retries:
                    raise GymError(f"rollout worker {w} died {retries + 1} times on step "
                                   f"{step}: {str(exc).splitlines()[0]}") from None
                self.replaced += 1
                self.workers[w] = self._new_worker(w)
                for message in self.sender.full_now():
                    self.ray.get(self.workers[w].sync.remote(self.ray.put(message),
                                                             self.version))
                # steps queued on the dead worker are asked for again, in order
                for s in sorted(self.pending):
                    ws, _, ex, sd = self.pending[s]
                    if ws == w:
                        self.pending[s] = (w, self.workers[w].generate.remote(ex, sd), ex, sd)
                fut = self.workers[w].generate.remote(examples, seeds)
        raise AssertionError("unreachable")

    def push(self, version: int) -> dict[str, float]:
        """Send the trainer's weights (version = steps taken) to every worker."""
        from gym_core.sampling.weight_sync import message_bytes

        t0 = time.perf_counter()
        message = self.sender.update()
        ref = self.ray.put(message)
        for w in self.workers:
            w.sync.remote(ref, version)
        self.version = int(version)
        stats = {"sync_bytes": float(message_bytes(message)),
                 "sync_seconds": time.perf_counter() - t0,
                 "rollout_workers_replaced": float(self.replaced)}
        self.sync_log.append(stats)
        return stats

    def pids(self) -> list[int]:
        return self.ray.get([w.pid.remote() for w in self.workers])

    def close(self) -> None:
        for w in getattr(self, "workers", []):
            with contextlib.suppress(Exception):  # already gone
                self.ray.kill(w)
        if self._started:
            self.ray.shutdown()
            self._started = False


class RankedRollouts:
    """:class:`RemoteRollouts` for every trainer rank; the calls are collective (every
    rank makes them, in the same order). Rank 0 holds the workers: it submits each rank's
    examples and seeds (the batch that rank would sample itself) as a call of its own, and
    scatters each rank its rollouts; the weights go out from rank 0 (DDP: every rank holds
    the same ones). With one process this is :class:`RemoteRollouts` itself."""

    def __init__(self, cfg, policy, plugins, start_version: int, dist):
        self.dist = dist
        self.remote, problem = None, None
        if dist.main:
            try:
                self.remote = RemoteRollouts(cfg, policy, plugins, start_version)
            except GymError as exc:
                problem = str(exc)
        problem = dist.broadcast(problem)  # every rank stops when rank 0 could not start
        if problem is not None:
            raise GymError(problem)

    def submit(self, step: int, examples: list[dict], seeds: list[int] | None) -> None:
        shares = self.dist.all_gather((examples, seeds))
        if self.remote is not None:
            for r, (ex, sd) in enumerate(shares):
                self.remote.submit(step * self.dist.world + r, ex, sd)

    def result(self, step: int):
        """This rank's rollouts of ``step``, the version that sampled them, seconds."""
        got, problem = None, None
        if self.remote is not None:
            try:
                got = [self.remote.result(step * self.dist.world + r)
                       for r in range(self.dist.world)]
            except GymError as exc:
                problem = str(exc)
            if problem is not None:
                got = [problem] * self.dist.world
        mine = self.dist.scatter(got)
        if isinstance(mine, str):
            raise GymError(mine)
        return mine

    def push(self, version: int) -> dict[str, float]:
        """The trainer's weights to every worker (from rank 0: the sync's metrics there)."""
        return self.remote.push(version) if self.remote is not None else {}

    def pids(self) -> list[int]:
        return self.remote.pids() if self.remote is not None else []

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()
