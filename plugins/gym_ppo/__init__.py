"""PPO for RLHF (docs/algorithms.md §6.2) as a gym plugin: a value head on the policy's
hidden states, GAE, clipped policy and value losses, a per-token KL penalty against the
reference folded into the reward, whitened advantages, several epochs per rollout.

Cheap to import: the config dataclass and the registration hook only; the algorithm
(torch) is loaded when a run selects it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from gym_core.api import OnlineAlgorithmConfig, bounded, hookimpl, one_of

KLEstimator = Literal["k1", "k3"]
KL_ESTIMATORS = get_args(KLEstimator)


@dataclass
class PPOConfig(OnlineAlgorithmConfig):
    """The classic RLHF PPO of "The N+ Implementation Details of RLHF with PPO" (arXiv
    2403.17031), as TRL's PPOTrainer computed it before TRL removed it (§6.2). Defaults
    are TRL's except lr (LoRA), the sampling width (gym's rollout engine samples
    num_generations completions per prompt) and the value head, which sits on the
    policy's own hidden states (§6.2, gym)."""

    name: str = "ppo"
    lr: float = 5e-5  # LoRA adapters need a larger step than full fine-tuning's 3e-6
    num_generations: int = 4  # completions per prompt, each an independent PPO sample
    temperature: float = 0.7  # TRL's PPO default; log-probs are of softmax(logits / T)
    num_ppo_epochs: int = bounded(4, ge=1)  # passes over each rollout batch
    # optimizer updates per epoch; the step's micro-batches (trainer.grad_accum) are
    # shuffled and split into this many groups, so it must divide grad_accum
    num_mini_batches: int = bounded(1, ge=1)
    cliprange: float = bounded(0.2, ge=0)  # the policy ratio's clip range
    # values move at most this far from the rollout's values
    cliprange_value: float = bounded(0.2, ge=0)
    vf_coef: float = bounded(0.1, ge=0)  # loss = policy loss + vf_coef * value loss
    # per-token reward -kl_coef * KL[t]; 0 skips the reference pass
    kl_coef: float = bounded(0.05, ge=0)
    # k1 = log pi_old - log pi_ref, or k3 (>= 0), §0.4
    kl_estimator: str = one_of(KLEstimator, "k1")
    gamma: float = bounded(1.0, ge=0, le=1)  # discount (1: the episode is one completion)
    lam: float = bounded(0.95, ge=0, le=1)  # GAE's lambda: bias (0) versus variance (1)
    whiten_rewards: bool = False  # scale the per-token rewards to unit variance first
    # subtracted from the score of a completion that hit max_completion_length without
    # an EOS; None: off
    missing_eos_penalty: float | None = bounded(None, hint="null: off")


@hookimpl
def gym_add_algorithms(registry):
    registry.add("ppo", PPOConfig, "gym_ppo.ppo:PPO")
