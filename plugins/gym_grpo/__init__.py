"""GRPO and its loss variants (Dr. GRPO, DAPO) as a gym plugin.

Cheap to import: the config dataclasses and the registration hook only; the algorithm
(torch) is loaded when a run selects it.
"""

from __future__ import annotations

from dataclasses import dataclass

from gym_core.api import GroupPolicyConfig, hookimpl


@dataclass
class GRPOConfig(GroupPolicyConfig):
    """GRPO (docs/algorithms.md §1.1, §1.10). Defaults follow TRL where the paper and TRL
    differ, except lr, which suits LoRA on a small model. beta, epsilon, epsilon_high,
    scale_rewards, num_iterations and mask_truncated_completions come from
    GroupPolicyConfig."""

    name: str = "grpo"
    lr: float = 5e-5  # LoRA adapters need a larger step than full fine-tuning's 1e-6
    loss_type: str = "dapo"  # grpo | bnpo | dr_grpo | dapo (§1.4)


@dataclass
class DrGRPOConfig(GRPOConfig):
    """Dr. GRPO (docs/algorithms.md §1.6): no std scaling, a constant token budget as normaliser, no KL."""

    name: str = "dr_grpo"
    loss_type: str = "dr_grpo"
    scale_rewards: str = "none"
    beta: float = 0.0


@dataclass
class DAPOConfig(GRPOConfig):
    """DAPO (docs/algorithms.md §1.7): clip-higher, token-level loss, truncated completions masked, no KL.
    Dynamic sampling is not implemented (TRL has none either)."""

    name: str = "dapo"
    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: float | None = 0.28
    mask_truncated_completions: bool = True
    beta: float = 0.0


@hookimpl
def gym_add_algorithms(registry):
    for cfg in (GRPOConfig, DrGRPOConfig, DAPOConfig):
        registry.add(cfg.name, cfg, "gym_grpo.grpo:GRPO")
