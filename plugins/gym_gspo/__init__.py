"""GSPO (Group Sequence Policy Optimization, ALGORITHMS.md §2) as a gym plugin."""

from __future__ import annotations

from dataclasses import dataclass

from gym_core import hookimpl
from gym_core.config import OnlineAlgorithmConfig


@dataclass
class GSPOConfig(OnlineAlgorithmConfig):
    """Sequence-level ratios and clipping. The clip range is the paper's, three orders of
    magnitude below GRPO's 0.2 (a sequence ratio is a geometric mean of token ratios,
    so it moves far less; 0.2 would never clip, trl#3834)."""

    name: str = "gspo"
    lr: float = 5e-5  # LoRA; as gym's GRPO
    epsilon: float = 3e-4
    epsilon_high: float = 4e-4
    beta: float = 0.0  # no KL in the paper
    scale_rewards: str = "group"  # group | batch | none (the GRPO advantage, §1.1)
    variant: str = "sequence"  # sequence | token (GSPO-token: per-token advantages allowed)


@hookimpl
def gym_add_algorithms(registry):
    registry.add("gspo", GSPOConfig, "gym_gspo.gspo:GSPO")
