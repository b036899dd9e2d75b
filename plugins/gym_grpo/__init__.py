"""GRPO and its loss variants (Dr. GRPO, DAPO) as a gym plugin.

Cheap to import: the config dataclasses and the registration hook only; the algorithm
(torch) is loaded when a run selects it.
"""

from __future__ import annotations

from dataclasses import dataclass

from gym_core import hookimpl
from gym_core.config import OnlineAlgorithmConfig


@dataclass
class GRPOConfig(OnlineAlgorithmConfig):
    """GRPO (ALGORITHMS.md §1.1, §1.6). Defaults follow TRL v1.9 where the paper and TRL
    differ, except lr, which suits LoRA on a small model."""

    name: str = "grpo"
    lr: float = 5e-5  # LoRA adapters need a larger step than full fine-tuning's 1e-6
    beta: float = 0.0  # k3 KL weight; 0 skips the reference forward pass (TRL >= 0.19)
    epsilon: float = 0.2  # lower clip: ratio >= 1 - epsilon
    epsilon_high: float | None = None  # upper clip; None = epsilon (DAPO: 0.28)
    loss_type: str = "dapo"  # grpo | bnpo | dr_grpo | dapo (§1.2)
    scale_rewards: str = "group"  # group | batch | none
    mask_truncated_completions: bool = False  # drop completions that hit the length cap


@dataclass
class DrGRPOConfig(GRPOConfig):
    """Dr. GRPO (§1.3): no std scaling, a constant token budget as normaliser, no KL."""

    name: str = "dr_grpo"
    loss_type: str = "dr_grpo"
    scale_rewards: str = "none"
    beta: float = 0.0


@dataclass
class DAPOConfig(GRPOConfig):
    """DAPO (§1.4): clip-higher, token-level loss, truncated completions masked, no KL.
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
