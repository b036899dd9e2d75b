"""The base class every algorithm plugin derives from (the method's math), and the
:class:`Updater` through which it changes the weights.

The core loop owns the optimizer, schedule, accumulation, clipping, DDP, checkpoints and
logging. Each step it hands the algorithm the step's batches (online methods: a
:class:`~gym_core.sampling.rollout.Rollout` each, from the core's rollout engine; offline methods:
whatever ``collate`` built) and calls :meth:`Algorithm.step`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, ClassVar

import torch

from gym_core.base.errors import GymError
from gym_core.train.losses import StepTotals


class Algorithm:
    #: the config dataclass (set by subclasses; also registered as the config schema)
    Config: ClassVar[type]
    #: online methods learn from their own samples: the core generates rollouts for them
    online: ClassVar[bool] = False
    #: False for training-free methods: the core creates no optimizer and the method
    #: overrides :meth:`step` (its ``updater`` is None)
    trains_weights: ClassVar[bool] = True
    #: the TRL dataset types the method trains on (gym_core/data/formats.py: prompt_only,
    #: prompt_completion, preference, unpaired_preference, language_modeling); given rows
    #: that serve none of them, a run stops with one line naming the columns it found.
    #: Empty: any rows (the method's check_data decides).
    data_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: Any, policy) -> None:
        self.cfg = cfg
        self.policy = policy  # gym_core.model.policy.Policy: the only road to log-probs

    def setup(self, cfg: Any, run_dir, plugins) -> None:
        """Called once after construction, before the starting policy is evaluated, with
        the whole composed config, the run directory and the loaded plugins: open what
        the method needs from other config groups here (e.g.
        ``plugins.component("experience_store", cfg.experience_store.name)``). Default:
        nothing."""

    def transform_examples(self, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The examples as the policy is to see them, applied to every rollout batch and to
        the held-out evaluation: a training-free method puts what it learned (an
        experience library) into ``example["prompt"]`` here. Default: unchanged."""
        return examples

    def sample_batch(self, examples: list[dict[str, Any]], seeds: list[int], engine) -> Any:
        """Online methods: the rollouts of one batch of examples. Default: the core's
        rollout engine on :meth:`transform_examples`. A training-free method whose policy
        is a remote model (an OpenAI-compatible API) samples there instead and returns a
        :class:`~gym_core.sampling.rollout.Rollout` of the texts it got."""
        return engine.generate(self.transform_examples(examples), seeds)

    def answer(self, examples: list[dict[str, Any]], max_new_tokens: int) -> list[str] | None:
        """The policy's greedy answers to held-out ``examples`` (already through
        :meth:`transform_examples`), or None (the default) for the local model's, which
        the core samples itself. A method whose policy is remote answers here."""
        return None

    def stop_reason(self) -> str | None:
        """Checked after every step: a reason to end the run there (a spent API budget).
        The loop writes a checkpoint of the step first, so the same command resumes from
        it, then stops with the reason as its one-line error. Default: None."""
        return None

    @property
    def needs_reference(self) -> bool:
        """True when the loss uses reference log-probs (the core then keeps a frozen
        reference for full fine-tuning; LoRA just disables the adapter)."""
        return False

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates per step on the step's batches (the learning-rate schedule
        counts them). Default 1; GRPO's ``num_iterations``."""
        return 1

    def check_data(self, train: list[dict[str, Any]]) -> None:
        """Called once with the training examples before the slow work: raise a
        :class:`~gym_core.base.errors.GymError` when they cannot serve this method."""

    def collate(self, examples: list[dict[str, Any]]) -> Any:
        """Offline methods: turn data rows into a batch, usually with
        ``self.policy.encode(prompts, completions, ...)`` (a
        :class:`~gym_core.data.batching.CompletionBatch`, prompts rendered as everywhere else).
        The default :meth:`step_totals` needs ``len(batch)`` and
        ``batch.completion_mask``."""
        raise NotImplementedError(f"{type(self).__name__} is offline but has no collate()")

    @torch.no_grad()
    def prepare_step(self, batches: list[Any]) -> None:
        """Called once per step after every batch was prepared, without gradients, with
        all of this rank's batches: statistics over the whole step (a batch-wide reward
        std, advantage whitening) go here; reduce over ranks with
        ``gym_core.api.sum_over_ranks`` so that N processes compute what one would.
        Default: nothing."""

    def step_totals(self, batches: list[Any]) -> StepTotals:
        """Counts over the step for loss normalisers: ``sequences`` counts rows
        (``len(batch)`` summed: completions, not prompts), ``tokens`` the active
        completion tokens, ``micro_batches`` the batches. Count this rank's batches only:
        the core sums each field over the ranks afterwards."""
        return StepTotals(
            sequences=sum(len(b) for b in batches),
            tokens=sum(int(b.completion_mask.sum()) for b in batches),
            micro_batches=len(batches),
        )

    @torch.no_grad()
    def prepare(self, batch: Any) -> None:
        """Called once per batch before its updates, without gradients: compute what
        stays fixed across updates (advantages, old / reference log-probs) into the
        batch (``batch.extras``)."""

    def loss(self, batch: Any, totals: StepTotals) -> tuple[torch.Tensor, dict[str, float]]:
        """This micro-batch's share of the step's loss, and metrics (plain floats)."""
        raise NotImplementedError

    def step(self, batches: list[Any], totals: StepTotals, updater: Updater | None
             ) -> dict[str, float]:
        """One training step on the step's batches; returns its metrics. The default
        takes :attr:`updates_per_step` optimizer updates, each over every micro-batch's
        :meth:`loss`. Training-free methods override it (``updater`` is then None)."""
        metrics: dict[str, float] = {}
        for _ in range(self.updates_per_step):
            metrics = updater.update(batches, lambda batch: self.loss(batch, totals))
        return metrics

    def report(self) -> dict[str, Any]:
        """Facts about what the method learned for ``summary.json`` (its
        ``algorithm_stats``), e.g. the size of an experience library. Default: none."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Extra state saved in each checkpoint (tensors, numbers, strings, lists, dicts:
        checkpoints are read back without unpickling arbitrary objects)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` when a run resumes."""


class Updater:
    """One optimizer update over a step's micro-batches, as :meth:`Algorithm.step` asks:
    zero the gradients, backward each micro-batch's loss (DDP all-reduces after the last
    one only), clip, step the optimizer and the schedule."""

    def __init__(self, policy, optimizer, scheduler, params, max_grad_norm: float, dist,
                 step: int = 0, deterministic: bool = False) -> None:
        self.policy, self.optimizer, self.scheduler = policy, optimizer, scheduler
        self.params, self.max_grad_norm, self.dist = params, max_grad_norm, dist
        self.step = step  # the step being taken, for messages
        #: trainer.deterministic: the clipping norm in a fixed order whatever the threads
        self.deterministic = deterministic

    def update(self, batches: list[Any], loss_fn) -> dict[str, float]:
        """``loss_fn(batch) -> (loss, metrics)`` for each micro-batch; returns the step's
        ``loss`` (summed shares, over all ranks), ``grad_norm``, ``lr`` and the mean of
        the micro-batches' metrics."""
        self.optimizer.zero_grad(set_to_none=True)
        total, rows = 0.0, []
        for i, batch in enumerate(batches):
            # DDP averages gradients over ranks while the shares add up to the step's
            # loss: scale by the world size; all-reduce only after the last micro-batch
            last = i == len(batches) - 1
            with contextlib.nullcontext() if last else self.policy.no_sync():
                loss, metrics = loss_fn(batch)
                value = loss.item()
                if not math.isfinite(value):
                    raise GymError(
                        f"the loss became {value} at step {self.step}; lower algorithm.lr or "
                        "check the rewards and data (the last checkpoint is kept)")
                (loss * self.dist.world).backward()
            total += value
            rows.append(metrics)
        if getattr(self.policy, "sharded", None) is not None:  # trainer.strategy=fsdp
            grad_norm = clip_sharded_grad_norm(self.params, self.max_grad_norm,
                                               self.deterministic)
        elif self.deterministic:
            grad_norm = clip_grad_norm_fixed_order(self.params, self.max_grad_norm)
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        lr = self.optimizer.param_groups[0]["lr"]  # this update's (the schedule then moves on)
        try:
            self.optimizer.step()
        except RuntimeError as exc:
            if "overflow" not in str(exc):
                raise
            raise GymError(f"the optimizer's update overflowed at step {self.step} (learning "
                           f"rate {lr:g}); lower algorithm.lr (the last checkpoint is "
                           "kept)") from None
        self.scheduler.step()
        return {"loss": self.dist.all_reduce_sum([total])[0], "grad_norm": grad_norm,
                "lr": lr, **mean_dicts(rows)}


def mean_dicts(rows: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise means over the rows that have each key."""
    keys = {k for r in rows for k in r}
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}


#: elements per partial sum of :func:`fixed_order_sum_of_squares` (below torch's grain
#: size, 32768, so each partial is one thread's sequential sum)
CHUNK = 4096


def fixed_order_sum_of_squares(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t``'s squares in float64, added in an order that does not depend on
    the number of threads: a full reduction of a tensor above torch's grain size is split
    into one part per thread, so its rounding changes with the thread count; here the
    partial sums are fixed rows of CHUNK elements (a row reduction is parallel over
    rows, each summed by one thread) and the few partials are then added in one pass."""
    flat = t.detach().reshape(-1).double()
    pad = (-flat.numel()) % CHUNK
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    partials = (flat * flat).view(-1, CHUNK).sum(dim=1)
    return partials.sum() if partials.numel() < CHUNK else fixed_order_sum_of_squares(
        partials.sqrt())


def clip_grad_norm_fixed_order(params, max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` (L2, ``max_norm / (norm + 1e-6)`` capped at 1)
    with the norm computed by :func:`fixed_order_sum_of_squares`: the same value, to the
    bit, at every thread count (trainer.deterministic)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.stack([fixed_order_sum_of_squares(g) for g in grads]).sum().sqrt()
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return float(total)


def sharded_norm(tensors, fixed_order: bool = False) -> float:
    """The L2 norm of tensors sharded over the ranks (FSDP's DTensors; plain tensors count
    as this rank's part): each rank's squares summed in float64 (in a fixed order with
    ``fixed_order``, :func:`fixed_order_sum_of_squares`), the sums added over the ranks."""
    from gym_core.train.distributed import sum_over_ranks
    from gym_core.train.fsdp import local

    parts = [fixed_order_sum_of_squares(local(t)) if fixed_order
             else local(t).detach().double().pow(2).sum() for t in tensors]
    total = torch.stack(parts).sum() if parts else torch.zeros((), dtype=torch.float64)
    return float(sum_over_ranks(total).sqrt())


def clip_sharded_grad_norm(params, max_norm: float, fixed_order: bool = False) -> float:
    """``torch.nn.utils.clip_grad_norm_`` for sharded gradients (trainer.strategy=fsdp):
    the norm of the whole gradient over every rank's shards (:func:`sharded_norm`), each
    shard scaled by the same ``max_norm / (norm + 1e-6)`` capped at 1."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = sharded_norm(grads, fixed_order)
    coef = min(1.0, max_norm / (total + 1e-6))
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total
