"""The base class every algorithm plugin derives from: the method's math, nothing else.

The core loop owns the optimizer, schedule, accumulation, clipping, checkpoints and
logging. It hands the algorithm a batch (online methods: a :class:`~gym_core.rollout.
Rollout` from the core's rollout engine; offline methods: whatever ``collate`` built)
and asks for a loss and metrics.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from gym_core.losses import StepTotals


class Algorithm:
    #: the config dataclass (set by subclasses; also registered as the config schema)
    Config: ClassVar[type]
    #: online methods learn from their own samples: the core generates rollouts for them
    online: ClassVar[bool] = False
    #: False for training-free methods: the core then creates no optimizer and calls
    #: :meth:`update` once per step instead of :meth:`loss` and ``backward``
    trains_weights: ClassVar[bool] = True

    def __init__(self, cfg: Any, policy) -> None:
        self.cfg = cfg
        self.policy = policy

    def setup(self, cfg: Any, run_dir, plugins) -> None:
        """Called once after construction, before the starting policy is evaluated, with
        the whole composed config, the run directory and the loaded plugins: open what
        the method needs from other config groups here (``cfg.experience_store`` through
        ``plugins.component("experience_store", ...)``, ``cfg.llm``). Default: nothing."""

    def transform_examples(self, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The examples as the policy is to see them, applied to every rollout batch and to
        the held-out evaluation: a training-free method puts what it learned (an
        experience library) into ``example["prompt"]`` here. Default: unchanged."""
        return examples

    @property
    def needs_reference(self) -> bool:
        """True when the loss uses reference log-probs (the core then keeps a frozen
        reference for full fine-tuning; LoRA just disables the adapter)."""
        return False

    def check_data(self, train: list[dict[str, Any]]) -> None:
        """Called once with the training examples before the slow work: raise a
        :class:`~gym_core.errors.GymError` when they cannot serve this method."""

    def collate(self, examples: list[dict[str, Any]]) -> Any:
        """Offline methods: turn data rows into a batch (tokenise, pad)."""
        raise NotImplementedError(f"{type(self).__name__} is offline but has no collate()")

    def step_totals(self, batches: list[Any]) -> StepTotals:
        """Counts over the whole step for loss normalisers (default: completion tokens)."""
        return StepTotals(
            sequences=sum(len(b) for b in batches),
            tokens=sum(int(b.completion_mask.sum()) for b in batches),
            micro_batches=len(batches),
        )

    @torch.no_grad()
    def prepare(self, batch: Any) -> None:
        """Called once per batch before its updates, without gradients: compute what
        stays fixed across updates (old / reference log-probs) into the batch."""

    def loss(self, batch: Any, totals: StepTotals) -> tuple[torch.Tensor, dict[str, float]]:
        """This micro-batch's share of the step's loss, and metrics (plain floats)."""
        raise NotImplementedError

    def update(self, batches: list[Any]) -> dict[str, float]:
        """Training-free methods (``trains_weights = False``): learn from the step's
        batches without gradients (e.g. edit an experience library); return metrics."""
        raise NotImplementedError

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
