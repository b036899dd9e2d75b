"""GSPO (Group Sequence Policy Optimization, docs/algorithms.md §2.1) as a gym plugin."""

from __future__ import annotations

from dataclasses import dataclass

from gym_core.api import GroupPolicyConfig, hookimpl


@dataclass
class GSPOConfig(GroupPolicyConfig):
    """Sequence-level ratios and clipping. The clip range is the paper's, three orders of
    magnitude below GRPO's 0.2 (a sequence ratio is a geometric mean of token ratios,
    so it moves far less; 0.2 would never clip, trl#3834)."""

    name: str = "gspo"
    lr: float = 5e-5  # LoRA; as gym's GRPO
    epsilon: float = 3e-4
    epsilon_high: float | None = 4e-4
    # beta 0 (no KL in the paper) and GRPO's group advantages: GroupPolicyConfig's defaults
    variant: str = "sequence"  # sequence | token (GSPO-token: per-token advantages allowed)


@hookimpl
def gym_add_algorithms(registry):
    registry.add("gspo", GSPOConfig, "gym_gspo.gspo:GSPO")
