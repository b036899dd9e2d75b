"""DPO and its loss variants (docs/algorithms.md §4) as a gym plugin."""

from __future__ import annotations

from dataclasses import dataclass

from gym_core.api import OfflineAlgorithmConfig, hookimpl


@dataclass
class DPOConfig(OfflineAlgorithmConfig):
    name: str = "dpo"
    lr: float = 5e-5  # LoRA on a small model; full fine-tuning uses ~1e-6
    beta: float = 0.1  # 0.1-0.5; for IPO this is tau
    loss_type: str = "sigmoid"  # sigmoid | robust | ipo | hinge
    # sigmoid: cDPO's label smoothing (TRL >= 0.29 ignores it there); robust: its eps
    label_smoothing: float = 0.0
    # keep each training pair's reference log-probs after its first use: later epochs
    # skip the reference forward pass
    cache_ref_logprobs: bool = True


@hookimpl
def gym_add_algorithms(registry):
    registry.add("dpo", DPOConfig, "gym_dpo.dpo:DPO")
