"""The one training loop, in plain PyTorch: AdamW, warmup + schedule, gradient
accumulation, clipping, checkpoints and resume. Every algorithm runs through it; the
algorithm only turns a batch into a loss."""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np
import torch

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
    updates_per_step = getattr(acfg, "num_iterations", 1) if algo.online else 1
    if updates_per_step < 1:
        raise GymError(f"algorithm.num_iterations={updates_per_step} must be at least 1")
    if tcfg.batch_size < 1 or tcfg.grad_accum < 1:
        raise GymError("trainer.batch_size and trainer.grad_accum must be at least 1")

    params = policy.trainable_parameters() if algo.trains_weights else []
    optimizer = scheduler = None
    if algo.trains_weights:
        optimizer = torch.optim.AdamW(
            params, lr=acfg.lr, betas=tuple(acfg.adam_betas), weight_decay=acfg.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(tcfg, tcfg.max_steps * updates_per_step)
        )
    if dist.enabled and algo.trains_weights and params:
        policy.distribute(dist.device)
    sampler = Sampler(len(task.train), tcfg.seed)
    log = MetricsLog(run_dir, tcfg.tensorboard) if dist.main else None
    start_step, seconds, tokens = 0, 0.0, 0

    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        step, path = checkpoints[-1]
        extra = load_checkpoint(path, policy.model, optimizer, scheduler)
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
    engine = None
    if algo.online:
        engine = RolloutEngine(policy, acfg, rewards, cfg.data.system_prompt)
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
                run_dir, step, policy.model, optimizer, scheduler, extra, tcfg.keep_last
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
        t_gen = time.perf_counter() - t0
        totals = algo.step_totals(batches)
        if dist.enabled:  # normalisers count the whole step, over every rank
            totals = type(totals)(*map(int, dist.all_reduce_sum(list(astuple(totals)))))

        # 2. updates: each micro-batch's loss is already its share of the step's loss.
        loss_metrics: list[dict[str, float]] = []
        update_metrics: dict[str, float] = {}
        if optimizer is None:  # training-free: the algorithm learns without gradients
            loss_metrics.append(algo.update(batches))
        for _ in range(updates_per_step if optimizer is not None else 0):
            optimizer.zero_grad(set_to_none=True)
            total_loss = 0.0
            for i, batch in enumerate(batches):
                # DDP averages gradients over ranks while the shares add up to the step's
                # loss: scale by the world size; all-reduce only after the last micro-batch
                sync = i == len(batches) - 1
                with contextlib.nullcontext() if sync else policy.no_sync():
                    loss, m = algo.loss(batch, totals)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"the loss became {loss.item()} at step {step + 1}; lower "
                            "algorithm.lr or check the rewards (last checkpoint kept)"
                        )
                    (loss * dist.world).backward()
                total_loss += loss.item()
                loss_metrics.append(m)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            update_metrics = {"loss": dist.all_reduce_sum([total_loss])[0],
                              "grad_norm": float(grad_norm),
                              "lr": scheduler.get_last_lr()[0]}

        step += 1
        dt = time.perf_counter() - t0
        seconds += dt
        step_tokens = totals.tokens
        tokens += step_tokens
        metrics = {
            **update_metrics,
            **dist.all_reduce_mean_dict({**_mean_dicts(loss_metrics), **_mean_dicts(batch_metrics)}),
            "step_seconds": dt,
            "generate_seconds": t_gen,
            "tokens_per_second": step_tokens / dt,
        }
        if dist.main:
            log.log(step, metrics)
            plugins.hook.gym_step_end(step=step, metrics=metrics)
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


def _mean_dicts(rows: list[dict[str, float]]) -> dict[str, float]:
    if not rows:
        return {}
    keys = {k for r in rows for k in r}
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}
