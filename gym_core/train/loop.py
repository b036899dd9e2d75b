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

from gym_core.base.errors import GymError, Interrupted, warn
from gym_core.base.threads import rebalance
from gym_core.data.tasks import Sampler
from gym_core.sampling.rollout import RolloutEngine, rollout_metrics
from gym_core.train.algorithm import Updater, mean_dicts, sharded_norm
from gym_core.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from gym_core.train.distributed import Dist
from gym_core.train.fsdp import is_sharded, local
from gym_core.train.metrics import MetricsLog


@dataclass
class TrainResult:
    steps: int
    seconds: float  # wall time spent in training steps (all sessions of a resumed run)
    completion_tokens: int  # tokens generated (online) or trained on (offline)

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


def lr_lambda(tcfg, total_updates: int):
    """Linear warmup, then constant / linear decay / cosine decay to 0 at
    ``total_updates``: the learning-rate factor of update ``u`` (0-based; the schema's
    Schedule declares the kinds)."""
    return schedule_fn(schedule_spec(tcfg, total_updates))


def schedule_spec(tcfg, total_updates: int) -> dict:
    """The schedule as plain data (saved in checkpoints): kind, warmup and total updates,
    and the bridge of an extended run (:func:`continue_schedule`)."""
    return {"kind": str(tcfg.lr_scheduler), "warmup": max(0, int(tcfg.warmup_steps)),
            "updates": int(total_updates), "bridge": None}


def schedule_fn(spec: dict):
    kind, warmup, total = spec["kind"], spec["warmup"], spec["updates"]

    def f(update: int) -> float:
        if update < warmup:
            return (update + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (update - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    if not spec.get("bridge"):
        return f
    start, begin, length = spec["bridge"]
    end = f(start + length)

    def bridged(update: int) -> float:
        if start <= update < start + length:  # linear from `begin` (update start-1) to `end`
            return begin + (end - begin) * (update - start + 1) / (length + 1)
        return f(update)

    return bridged


def continue_schedule(saved: dict | None, spec: dict, done: int) -> dict:
    """The schedule a resumed run follows after ``done`` updates. The same schedule as the
    checkpoint's (an interrupted run): unchanged, so the run equals an uninterrupted one.
    A changed one (``trainer.max_steps`` raised to extend a finished run, another kind or
    warmup): the new schedule, reached from the factor of the last update taken through
    a linear bridge of ``max(1, warmup)`` updates, so the rate does not jump (a finished
    cosine run ends near 0, and the longer schedule is higher there); from then on it is
    the new schedule's, as in a run started with it (docs/guide.md, Resume)."""
    if saved is None:  # a checkpoint from before schedules were saved
        return spec
    if all(saved.get(k) == spec[k] for k in ("kind", "warmup", "updates")):
        return {**spec, "bridge": saved.get("bridge")}
    old, new = schedule_fn(saved), schedule_fn(spec)
    if done == 0 or abs(old(done - 1) - new(done - 1)) < 1e-12:
        return spec  # they agree here (warmup, constant): the new one continues smoothly
    return {**spec, "bridge": [done, old(done - 1), max(1, spec["warmup"])]}


def apply_optimizer_settings(optimizer, scheduler, acfg, spec: dict) -> None:
    """Set the config's learning rate, betas and weight decay, and the schedule ``spec``,
    on an optimizer restored from a checkpoint (which brought back its own): a resumed
    run trains with the values its config records. Unchanged values give the same
    numbers the checkpoint held."""
    fn = schedule_fn(spec)
    scheduler.lr_lambdas = [fn for _ in optimizer.param_groups]
    scheduler.base_lrs = [float(acfg.lr) for _ in optimizer.param_groups]
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["initial_lr"] = base
        group["lr"] = base * fn(scheduler.last_epoch)
        group["weight_decay"] = float(acfg.weight_decay)
        group["betas"] = tuple(float(b) for b in acfg.adam_betas)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg, policy, algo, task, rewards, plugins, run_dir: Path, dist: Dist | None = None,
          stop=None, trackers=None, checkpoint_checked: bool = False) -> TrainResult:
    """Train ``algo`` for ``trainer.max_steps`` steps, resuming from the newest checkpoint
    in ``run_dir``. Under torchrun each rank takes its share of every step's prompts;
    rank 0 alone writes. ``trainer.batch_size`` counts prompts (examples) per process.
    ``stop`` (a :class:`gym_core.train.interrupt.StopRequest`): a signal ends the loop after
    the current step, with a checkpoint, by raising :class:`Interrupted`. ``checkpoint_checked``:
    the caller checked the newest checkpoint already (:func:`check_checkpoint`). ``trackers``: the
    run's experiment trackers (:mod:`gym_core.train.trackers`), started here and closed by
    the caller; None: the ones ``cfg.logger`` selects, opened and closed here."""
    dist = dist or Dist()
    tcfg, acfg = cfg.trainer, cfg.algorithm  # checked against the schema by preflight

    strategy = str(tcfg.get("strategy", "ddp"))  # ddp | fsdp, declared in TrainerConfig
    if algo.needs_reference:  # the starting weights, before any sharding or resume
        policy.keep_reference()
    if algo.trains_weights and policy.trainable_parameters():
        if dist.enabled:  # before the optimizer: FSDP replaces the parameters by shards
            policy.distribute(dist.device, strategy)
        elif strategy == "fsdp" and dist.main:
            print("gym: trainer.strategy=fsdp with one process: nothing to shard, training "
                  "unsharded (launch with torchrun --nproc_per_node=N or "
                  "trainer.backend=ray to shard)")
    params = policy.trainable_parameters() if algo.trains_weights else []
    optimizer = scheduler = updater = None
    spec = schedule_spec(tcfg, tcfg.max_steps * algo.updates_per_step)
    if algo.trains_weights:
        optimizer = torch.optim.AdamW(
            params, lr=acfg.lr, betas=tuple(acfg.adam_betas), weight_decay=acfg.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg, spec["updates"]))
        updater = Updater(policy, optimizer, scheduler, params, tcfg.max_grad_norm, dist,
                          deterministic=bool(tcfg.get("deterministic", False)))
    sampler = Sampler(len(task.train), tcfg.seed)
    start_step, seconds, tokens = 0, 0.0, 0
    start_norm = None  # the trainable weights' norm when the run started

    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        step, path = checkpoints[-1]
        extra = load_checkpoint(path, policy.model, optimizer, scheduler, policy.heads,
                                sharded=policy.sharded, checked=checkpoint_checked)
        algo.load_state_dict(extra.get("algorithm", {}))
        start_step, sampler.position = int(extra["step"]), int(extra["data_position"])
        seconds, tokens = float(extra["train_seconds"]), int(extra["completion_tokens"])
        start_norm = extra.get("start_weight_norm")
        if optimizer is not None:
            spec = continue_schedule(extra.get("schedule"), spec, scheduler.last_epoch)
            apply_optimizer_settings(optimizer, scheduler, acfg, spec)
        if dist.main:
            print(f"gym: resuming {run_dir} from step {start_step} ({path.name})")
    else:
        seed_everything(tcfg.seed)
    if updater is not None and start_norm is None:
        start_norm = weight_norm(params)
    own_trackers = trackers is None and dist.main
    if own_trackers:
        from gym_core.train.trackers import open_trackers

        trackers = open_trackers(cfg, plugins)
    log = None
    if dist.main:
        log = MetricsLog(run_dir, start_step, trackers)
        trackers.start(cfg, run_dir, start_step)

    during = None  # trainer.eval_every / keep_best (gym_core/eval/during.py)
    if tcfg.get("eval_every") or tcfg.get("keep_best"):
        from gym_core.eval.during import DuringTraining

        during = DuringTraining(cfg, plugins, run_dir)
    from gym_core.env.setup import selected_environment

    env = selected_environment(cfg, plugins, algo.online, task.train)  # docs/agents.md
    engine = RolloutEngine(policy, acfg, rewards, env=env) if algo.online else None

    def draw():
        """The next micro-batch's examples (this rank's share) and their sampling seeds:
        every rank draws the same global batch and keeps its own slice; the sampling seed
        of an example is its position in the data stream."""
        first = sampler.position
        chosen = sampler.take(tcfg.batch_size * dist.world)
        mine = slice(dist.rank * tcfg.batch_size, (dist.rank + 1) * tcfg.batch_size)
        seeds = [tcfg.seed * 1_000_003 + p for p in range(first, first + len(chosen))][mine]
        return [task.train[i] for i in chosen[mine]], seeds

    remote, ahead = None, {}
    consumed = sampler.position  # the data position of the last step taken (checkpoints)
    rcfg = cfg.get("rollout")
    if engine is not None and rcfg is not None and int(rcfg.workers) > 0:
        if policy.sharded is not None:
            raise GymError("rollout.workers > 0 with trainer.strategy=fsdp: the workers get "
                           "whole weights, which FSDP ranks hold in shards (not supported "
                           "yet); use trainer.strategy=ddp or rollout.workers=0")
        from gym_core.sampling.actors import RankedRollouts

        remote = RankedRollouts(cfg, policy, plugins, start_step, dist)
        lag = int(rcfg.max_staleness)

        def plan(s: int) -> None:
            """Draw step ``s``'s examples now and ask the workers for their rollouts."""
            draws = [draw() for _ in range(tcfg.grad_accum)]
            ahead[s] = (draws, sampler.position)
            for j, (examples, seeds) in enumerate(draws):
                remote.submit(s * tcfg.grad_accum + j, algo.transform_examples(examples), seeds)

        for s in range(start_step + 1, min(start_step + 1 + lag, tcfg.max_steps) + 1):
            plan(s)

    buffer = None
    if engine is not None and tcfg.rollout_buffer:
        from gym_core.sampling.buffer import RolloutBuffer

        buffer = RolloutBuffer(run_dir)
    if dist.main:
        plugins.hook.gym_run_start(cfg=cfg, run_dir=str(run_dir), start_step=start_step)

    progress = None
    if tcfg.progress and dist.main:
        from tqdm.auto import tqdm

        progress = tqdm(total=tcfg.max_steps, initial=start_step, desc="train", unit="step")

    def checkpoint(step: int) -> None:
        extra = {
            "step": step,
            "data_position": consumed,
            "train_seconds": seconds,
            "completion_tokens": tokens,
            "algorithm": algo.state_dict(),
            "schedule": spec,
            "start_weight_norm": start_norm,
        }
        gathered = None
        if policy.sharded is not None:  # every rank sends its shards, rank 0 writes
            from gym_core.train.checkpoint import HEADS_PREFIX

            gathered = (policy.sharded.trainable_state(HEADS_PREFIX),
                        policy.sharded.optimizer_state(optimizer) if optimizer else None)
        if dist.main:
            path = save_checkpoint(
                run_dir, step, policy.model, optimizer, scheduler, extra, tcfg.keep_last,
                policy.heads, protect=during.protected if during is not None else frozenset(),
                gathered=gathered,
            )
            if during is not None:
                during.write_best()
            plugins.hook.gym_checkpoint_saved(step=step, path=str(path))
        dist.barrier()  # no rank may read checkpoints before this one is complete

    step = saved = start_step
    exploded = False
    policy.model.train()
    if stop is not None:
        stop.deferred = True  # a signal now ends the loop after the step in progress
    was_deterministic = (torch.are_deterministic_algorithms_enabled(),
                         torch.is_deterministic_algorithms_warn_only_enabled())
    if tcfg.get("deterministic", False):
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        while step < tcfg.max_steps:
            rebalance()  # another gym process may have started or ended on these CPUs
            t0 = time.perf_counter()
            # 1. batches for the whole step (online: rollouts), so that loss normalisers
            #    that need step-wide counts (dapo, dr_grpo) know them before any backward.
            batches, batch_metrics, sampled, step_sources = [], [], [], []
            if remote is not None:
                draws, consumed = ahead.pop(step + 1)
            else:
                draws = [draw() for _ in range(tcfg.grad_accum)]
                consumed = sampler.position
            lags = []
            for j, (examples, seeds) in enumerate(draws):
                step_sources += [ex.get("source") for ex in examples]
                if remote is not None:
                    batch, version, _ = remote.result((step + 1) * tcfg.grad_accum + j)
                    lags.append(step - version)
                    batch_metrics.append(rollout_metrics(batch))
                elif engine is not None:
                    batch, version = algo.sample_batch(examples, seeds, engine), step
                    batch_metrics.append(rollout_metrics(batch))
                else:
                    batch = algo.collate(examples)
                if buffer is not None:
                    from gym_core.sampling.buffer import rollout_rows

                    sampled.extend(rollout_rows(batch, step + 1, version))
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
            if dist.enabled and params and policy.sharded is None:  # FSDP: shards differ
                check_replicas(params, dist, step + 1)

            step += 1
            sync = {}
            if remote is not None:  # the new weights out, the next step's rollouts asked for
                sync = remote.push(step)
                if step + 1 + lag <= tcfg.max_steps:
                    plan(step + 1 + lag)
            dt = time.perf_counter() - t0
            seconds += dt
            step_tokens = totals.tokens
            tokens += step_tokens
            own = ("loss", "grad_norm", "lr")
            reported = {k: v for k, v in step_metrics.items() if k not in own}
            metrics = {
                **{k: v for k, v in step_metrics.items() if k in own},
                **dist.all_reduce_mean_dict({**reported, **mean_dicts(batch_metrics)}),
                "step_seconds": dt,
                # online: sampling the rollouts; offline: building the batches
                ("generate_seconds" if engine is not None else "collate_seconds"): t_batches,
                "tokens_per_second": step_tokens / dt,
            }
            sources = getattr(task.train, "sources", None)  # a mixture's (gym_core/data/mixture.py)
            if sources:  # rows of each source this step, over every rank
                counts = [float(step_sources.count(s)) for s in sources]
                if dist.enabled:
                    counts = dist.all_reduce_sum(counts)
                metrics.update({f"data/rows_{s}": float(c) for s, c in zip(sources, counts)})
            if remote is not None:  # the policy lag of this step's rollouts, and the sync
                metrics.update({"staleness": sum(lags) / len(lags),
                                "staleness_max": float(max(lags)), **sync})
            if updater is not None:
                # how far the weights moved from where the run started: a learning rate
                # that blows them up without a NaN shows here first
                ratio = weight_norm(params) / max(start_norm, 1e-12)
                metrics["weight_norm_ratio"] = ratio
                if not math.isfinite(ratio) and not weights_finite(params, dist):
                    raise GymError(
                        f"at step {step} the trainable weights became infinite or NaN; lower "
                        f"algorithm.lr (now {acfg.lr:g}); "
                        + (f"the last checkpoint (step {saved}) is kept" if saved else
                           "no checkpoint was written yet"))
                if not ratio <= EXPLODED_RATIO and not exploded and dist.main:
                    exploded = True
                    size = (f"{ratio:.3g} times what it was" if math.isfinite(ratio) else
                            "beyond float32's range, from a finite one")
                    warn(f"at step {step} the trainable weights' norm is {size} at the start: "
                         f"the updates are exploding; lower algorithm.lr (now {acfg.lr:g})")
            best = False
            if during is not None:
                if during.due(step):  # rank 0 scores; the others wait
                    with policy.full_model() as model:  # FSDP: every rank gathers
                        if dist.main:
                            metrics.update(during(step, policy, model))
                best = during.improved(step, metrics)
                if dist.enabled:  # every rank saves the checkpoint together
                    best = bool(dist.broadcast(best))
            if buffer is not None:  # every rank's rollouts, in rank order, by rank 0
                gathered = dist.all_gather(sampled)
                if dist.main:
                    buffer.write(step, [row for rows in gathered for row in rows])
            if dist.main:
                log.log(step, metrics)
                plugins.hook.gym_step_end(step=step, metrics=metrics, run_dir=str(run_dir))
            if progress is not None:
                progress.update(1)
                shown = ("loss", "reward_mean", "kl", "tokens_per_second")
                progress.set_postfix({k: f"{metrics[k]:.3g}" for k in shown if k in metrics})
            if (tcfg.save_every and step % tcfg.save_every == 0) or step == tcfg.max_steps \
                    or best:
                checkpoint(step)
                saved = step
            reason = algo.stop_reason()  # e.g. a spent API budget: stop with a checkpoint
            if reason:
                if saved != step:
                    checkpoint(step)
                raise GymError(reason)
            signum = stop.agreed(dist) if stop is not None else None
            if signum:
                if saved != step:
                    checkpoint(step)
                raise Interrupted(signum, stop.describe(signum, step), show=dist.main)
    finally:
        torch.use_deterministic_algorithms(was_deterministic[0], warn_only=was_deterministic[1])
        if remote is not None:
            remote.close()
        if stop is not None:
            stop.deferred = False
        if progress is not None:
            progress.close()
        if log is not None:
            log.close()
        if own_trackers:
            trackers.close(ok=step == tcfg.max_steps)
    policy.gather()  # FSDP: the full trained weights on every rank, for what follows
    return TrainResult(steps=step, seconds=seconds, completion_tokens=tokens)


#: the trainable weights' norm, as a multiple of the run's starting one, past which the
#: updates count as exploding (a sound LoRA run on SmolLM2 stays within a few times)
EXPLODED_RATIO = 100.0


def weight_norm(params) -> float:
    """The L2 norm of all the trainable weights (one fused pass; FSDP: over the shards
    of every rank)."""
    if not params:
        return 0.0
    if any(is_sharded(p) for p in params):
        return sharded_norm(params)
    with torch.no_grad():
        return float(torch.nn.utils.get_total_norm([p.detach() for p in params]))


def weights_finite(params, dist: Dist) -> bool:
    """Whether every trainable weight is finite; sharded weights (FSDP): on every rank,
    so that all ranks agree whether to stop."""
    finite = all(bool(local(p).isfinite().all()) for p in params)
    if any(is_sharded(p) for p in params):
        finite = dist.all_reduce_max([0.0 if finite else 1.0])[0] == 0.0
    return finite


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
