"""A test-only plugin for test_ddp.py: the example's REINFORCE recording the checksum of
every rank's trainable weights after each step (one line per step in
``$REPLICA_DIR/rank<r>.txt``), and a reward with a spread even on gym's random tiny model
(the share of digit characters), so that the steps really move the weights."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gym_core.api import hookimpl

from gym_example_plugin import ReinforceConfig


@dataclass
class CheckedReinforceConfig(ReinforceConfig):
    name: str = "checked_reinforce"


def checked_reinforce():
    import torch.distributed as dist

    from gym_example_plugin.reinforce import Reinforce

    class CheckedReinforce(Reinforce):
        def step(self, batches, totals, updater):
            metrics = super().step(batches, totals, updater)
            rank = dist.get_rank() if dist.is_initialized() else 0
            # the trained weights (the LoRA adapter and any heads), in float64
            total = sum(float(p.detach().double().sum())
                        for p in self.policy.trainable_parameters())
            with open(Path(os.environ["REPLICA_DIR"]) / f"rank{rank}.txt", "a") as fh:
                fh.write(f"{total!r}\n")
            return metrics

    return CheckedReinforce


def digit_share(prompts, completions, examples):
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


@hookimpl
def gym_add_algorithms(registry):
    # the class itself (a test-only plugin may import torch at start-up)
    registry.add("checked_reinforce", CheckedReinforceConfig, checked_reinforce())


@hookimpl
def gym_add_rewards(registry):
    registry.add("digit_share", None, digit_share)
