"""The one training loop, in plain PyTorch: AdamW, warmup + schedule, gradient
accumulation, clipping, checkpoints and resume. Every algorithm runs through it; the
algorithm only turns a batch into a loss."""

from __future__ import annotations

import math
import random
import time
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np
import torch

from gym_core.algorithm import Updater, mean_dicts
from gym_core.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from gym_core.data import Sampler
from gym_core.distributed import Dist
from gym_core.errors import GymError
from gym_core.metrics import MetricsLog
from gym_core.rollout import RolloutEngine, rollout_metrics

SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class TrainResult:
    steps: int
    seconds: float  # wall time spent in training steps (all sessions of a resumed run)
    completion_tokens: int  # tokens generated (online) or trained on (offline)

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


def lr_lambda(tcfg, total_updates: int):
    """Linear warmup, then constant / linear decay / cosine decay to 0."""
    if tcfg.lr_scheduler not in SCHEDULES:
        raise GymError(f"trainer.lr_scheduler={tcfg.lr_scheduler!r} is not one of {SCHEDULES}")
    warmup = max(0, tcfg.warmup_steps)

    def f(update: int) -> float:
        if update < warmup:
            return (update + 1) / (warmup + 1)
        if tcfg.lr_scheduler == "constant":
            return 1.0
        progress = min(1.0, (update - warmup) / max(1, total_updates - warmup))
        if tcfg.lr_scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg, policy, algo, task, rewards, plugins, run_dir: Path, dist: Dist | None = None
          ) -> TrainResult:
    """Train ``algo`` for ``trainer.max_steps`` steps, resuming from the newest checkpoint
    in ``run_dir``. Under torchrun each rank takes its share of every step's prompts;
    rank 0 alone writes. ``trainer.batch_size`` counts prompts (examples) per process."""
    dist = dist or Dist()
    tcfg, acfg = cfg.trainer, cfg.algorithm
    if tcfg.batch_size < 1 or tcfg.grad_accum < 1:
        raise GymError("trainer.batch_size and trainer.grad_accum must be at least 1")

    params = policy.trainable_parameters() if algo.trains_weights else []
    optimizer = scheduler = updater = None
    if algo.trains_weights:
        optimizer = torch.optim.AdamW(
            params, lr=acfg.lr, betas=tuple(acfg.adam_betas), weight_decay=acfg.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(tcfg, tcfg.max_steps * algo.updates_per_step)
        )
        if dist.enabled and params:
            policy.distribute(dist.device)
        updater = Updater(policy, optimizer, scheduler, params, tcfg.max_grad_norm, dist)
    sampler = Sampler(len(task.train), tcfg.seed)
    log = MetricsLog(run_dir, tcfg.tensorboard) if dist.main else None
    start_step, seconds, tokens = 0, 0.0, 0

    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        step, path = checkpoints[-1]
        extra = load_checkpoint(path, policy.model, optimizer, scheduler, policy.heads)
        algo.load_state_dict(extra.get("algorithm", {}))
        start_step, sampler.position = int(extra["step"]), int(extra["data_position"])
        seconds, tokens = float(extra["train_seconds"]), int(extra["completion_tokens"])
        if log is not None:
            log.truncate_after(start_step)
            print(f"gym: resuming {run_dir} from step {start_step} ({path.name})")
    else:
        seed_everything(tcfg.seed)

    if algo.needs_reference:
        policy.keep_reference()
    engine = RolloutEngine(policy, acfg, rewards) if algo.online else None
    if dist.main:
        plugins.hook.gym_run_start(cfg=cfg, run_dir=str(run_dir), start_step=start_step)

    progress = None
    if tcfg.progress and dist.main:
        from tqdm.auto import tqdm

        progress = tqdm(total=tcfg.max_steps, initial=start_step, desc="train", unit="step")

    def checkpoint(step: int) -> None:
        extra = {
            "step": step,
            "data_position": sampler.position,
            "train_seconds": seconds,
            "completion_tokens": tokens,
            "algorithm": algo.state_dict(),
        }
        if dist.main:
            path = save_checkpoint(
                run_dir, step, policy.model, optimizer, scheduler, extra, tcfg.keep_last,
                policy.heads,
            )
            plugins.hook.gym_checkpoint_saved(step=step, path=str(path))
        dist.barrier()  # no rank may read checkpoints before this one is complete

    step = start_step
    policy.model.train()
    while step < tcfg.max_steps:
        t0 = time.perf_counter()
        # 1. batches for the whole step (online: rollouts), so that loss normalisers
        #    that need step-wide counts (dapo, dr_grpo) know them before any backward.
        batches, batch_metrics = [], []
        for _ in range(tcfg.grad_accum):
            # every rank draws the same global batch and keeps its own slice; the
            # sampling seed of an example is its position in the data stream
            first = sampler.position
            chosen = sampler.take(tcfg.batch_size * dist.world)
            mine = slice(dist.rank * tcfg.batch_size, (dist.rank + 1) * tcfg.batch_size)
            examples = [task.train[i] for i in chosen[mine]]
            seeds = [tcfg.seed * 1_000_003 + p for p in range(first, first + len(chosen))][mine]
            if engine is not None:
                batch = engine.generate(algo.transform_examples(examples), seeds)
                batch_metrics.append(rollout_metrics(batch))
            else:
                batch = algo.collate(examples)
            algo.prepare(batch)
            batches.append(batch)
        algo.prepare_step(batches)
        t_batches = time.perf_counter() - t0
        totals = algo.step_totals(batches)
        if dist.enabled:  # normalisers count the whole step, over every rank
            totals = type(totals)(*map(int, dist.all_reduce_sum(list(astuple(totals)))))

        # 2. the algorithm's step: optimizer updates (or its own way of learning)
        if updater is not None:
            updater.step = step + 1
        step_metrics = algo.step(batches, totals, updater)
        if dist.enabled and params:
            check_replicas(params, dist, step + 1)

        step += 1
        dt = time.perf_counter() - t0
        seconds += dt
        step_tokens = totals.tokens
        tokens += step_tokens
        reported = {k: v for k, v in step_metrics.items() if k not in ("loss", "grad_norm", "lr")}
        metrics = {
            **{k: v for k, v in step_metrics.items() if k in ("loss", "grad_norm", "lr")},
            **dist.all_reduce_mean_dict({**reported, **mean_dicts(batch_metrics)}),
            "step_seconds": dt,
            # online: sampling the rollouts; offline: building the batches
            ("generate_seconds" if engine is not None else "collate_seconds"): t_batches,
            "tokens_per_second": step_tokens / dt,
        }
        if dist.main:
            log.log(step, metrics)
            plugins.hook.gym_step_end(step=step, metrics=metrics, run_dir=str(run_dir))
        if progress is not None:
            progress.update(1)
            shown = ("loss", "reward_mean", "kl", "tokens_per_second")
            progress.set_postfix({k: f"{metrics[k]:.3g}" for k in shown if k in metrics})
        if (tcfg.save_every and step % tcfg.save_every == 0) or step == tcfg.max_steps:
            checkpoint(step)

    if progress is not None:
        progress.close()
    if log is not None:
        log.close()
    return TrainResult(steps=step, seconds=seconds, completion_tokens=tokens)


def check_replicas(params, dist: Dist, step: int) -> None:
    """After a distributed step every rank must hold the same weights (DDP averaged the
    same gradients into the same optimizer state). They differ when a loss was computed
    outside ``policy.logprobs`` (no gradient all-reduce): stop, instead of training
    replicas that silently drift apart. Two float64 sums per rank, gathered once."""
    with torch.no_grad():
        flat = [p.detach().double().reshape(-1) for p in params]
        index = [torch.arange(1, f.numel() + 1, dtype=torch.float64, device=f.device)
                 for f in flat]
        local = [sum(float(f.sum()) for f in flat),
                 sum(float((f * i).sum()) for f, i in zip(flat, index))]
    gathered = dist.all_gather(local)
    if any(g != gathered[0] for g in gathered[1:]):
        raise GymError(
            f"after step {step} the ranks' trainable weights differ (checksums "
            f"{[round(g[0], 6) for g in gathered]}): gradients were not synchronised. An "
            "algorithm computed a loss outside policy.logprobs(batch), the only road that "
            "goes through DDP (docs/plugins.md, gym_add_algorithms)."
        )
