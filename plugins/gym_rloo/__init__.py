"""RLOO (REINFORCE Leave-One-Out, docs/algorithms.md §6.1) as a gym plugin.

Cheap to import: the config dataclass and the registration hook only; the algorithm
(torch) is loaded when a run selects it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from gym_core.api import GroupPolicyConfig, GymError, bounded, hookimpl, one_of

KLEstimator = Literal["k1", "k3"]
KL_ESTIMATORS = get_args(KLEstimator)


@dataclass
class RLOOConfig(GroupPolicyConfig):
    """RLOO as TRL 1.16's RLOOTrainer computes it (§6.1): each completion's baseline is
    the mean reward of the other k - 1 completions of its prompt, the KL to the
    reference is a penalty in the reward, and the loss is PPO's clip on the sequence
    ratio. epsilon, epsilon_high, num_iterations and mask_truncated_completions come
    from GroupPolicyConfig; so does scale_rewards, which divides the leave-one-out
    advantage by a std ("none", TRL's behaviour, by default)."""

    name: str = "rloo"
    lr: float = 5e-5  # LoRA adapters need a larger step than full fine-tuning's 1e-6
    # k completions per prompt; each baseline averages the other k - 1 (TRL's default 2
    # leaves a one-sample baseline; gym samples as many as its GRPO)
    num_generations: int = 8
    # KL penalty in the reward, r_i - beta * sum_t KL[i,t] (TRL's default 0.05); 0 skips
    # the reference forward pass
    beta: float = 0.05
    # per-token KL estimate summed into the reward: k1 = log pi_old - log pi_ref (TRL,
    # following the RLOO paper; can be negative) or k3 (>= 0, Schulman), §0.4
    kl_estimator: str = one_of(KLEstimator, "k1")
    # the leave-one-out advantage as it is, like TRL (§6.1)
    scale_rewards: str = "none"
    # (A - mean(A)) / (std(A) + 1e-4) over the whole step, every rank (TRL's option)
    normalize_advantages: bool = False
    # clamp each reward (before the KL penalty) into [low, high]; None: off
    reward_clip_range: list[float] | None = bounded(None, length=2, hint="[low, high]")

    @staticmethod
    def validate(cfg, key):
        clip = cfg.reward_clip_range
        if clip is not None and clip[0] > clip[1]:
            raise GymError(f"{key}.reward_clip_range={list(clip)} must be [low, high] with "
                           "low <= high")


@hookimpl
def gym_add_algorithms(registry):
    registry.add("rloo", RLOOConfig, "gym_rloo.rloo:RLOO")
