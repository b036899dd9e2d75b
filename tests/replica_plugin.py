"""A test plugin for distributed runs: algorithms that record every rank's trainable
weights after every step (a float64 checksum per rank, one line per step in
``$GYM_TEST_REPLICA_DIR/rank<r>.txt``), so a test can compare the ranks directly; and two
algorithms that compute their loss outside ``policy.logprobs``, which gym must refuse.

``checked_dpo`` wraps the built-in DPO (an offline method), ``checked_rloo`` and
``checked_ppo`` the built-in RLOO and PPO (online; PPO with a value head). The example
package checks its own REINFORCE the same way (docs/examples/gym-example-plugin/tests/
test_ddp.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gym_core.api import OnlineAlgorithmConfig, hookimpl
from gym_dpo import DPOConfig
from gym_ppo import PPOConfig
from gym_rloo import RLOOConfig


def _record(algo) -> None:
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    total = sum(float(p.detach().double().sum()) for p in algo.policy.trainable_parameters())
    with open(Path(os.environ["GYM_TEST_REPLICA_DIR"]) / f"rank{rank}.txt", "a") as fh:
        fh.write(f"{total!r}\n")


def checked(cls):
    class Checked(cls):
        def step(self, batches, totals, updater):
            metrics = super().step(batches, totals, updater)
            _record(self)
            return metrics

    Checked.__name__ = f"Checked{cls.__name__}"
    return Checked


def checked_dpo():
    from gym_dpo.dpo import DPO

    return checked(DPO)


def checked_rloo():
    from gym_rloo.rloo import RLOO

    return checked(RLOO)


def checked_ppo():
    from gym_ppo.ppo import PPO

    return checked(PPO)


@dataclass
class CheckedDPOConfig(DPOConfig):
    name: str = "checked_dpo"


@dataclass
class CheckedRLOOConfig(RLOOConfig):
    name: str = "checked_rloo"


@dataclass
class CheckedPPOConfig(PPOConfig):
    name: str = "checked_ppo"


@dataclass
class TrapConfig(OnlineAlgorithmConfig):
    name: str = "raw_logprobs"
    lr: float = 1e-2


@dataclass
class BypassConfig(TrapConfig):
    name: str = "bypass_forward"


def raw_logprobs():
    """Log-probs with gradients from the raw function on the model: what the example's
    RLOO did before plugin API 2."""
    from gym_core.api import Algorithm
    from gym_core.train.losses import completion_logprobs

    class RawLogprobs(Algorithm):
        online = True

        def loss(self, batch, totals):
            logp = completion_logprobs(self.policy.model, batch.prompt_ids, batch.prompt_mask,
                                       batch.completion_ids, batch.completion_mask)
            adv = (batch.rewards - batch.rewards.mean()).unsqueeze(1)
            return -(adv * logp * batch.completion_mask).sum() / totals.tokens, {}

    return RawLogprobs


def bypass_forward():
    """A loss from the model's own forward pass, around every gym helper: nothing can
    refuse the call, so only the replica check after the step can catch it."""
    from gym_core.api import Algorithm

    class BypassForward(Algorithm):
        online = True

        def loss(self, batch, totals):
            logits = self.policy.model(input_ids=batch.completion_ids).logits.float()
            return logits.logsumexp(-1).mean() * 1e-2, {}

    return BypassForward


@hookimpl
def gym_add_algorithms(registry):
    registry.add("checked_dpo", CheckedDPOConfig, checked_dpo())
    registry.add("checked_rloo", CheckedRLOOConfig, checked_rloo())
    registry.add("checked_ppo", CheckedPPOConfig, checked_ppo())
    registry.add("raw_logprobs", TrapConfig, raw_logprobs())
    registry.add("bypass_forward", BypassConfig, bypass_forward())
