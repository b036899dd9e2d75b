"""KTO (docs/algorithms.md §5.1) as a gym plugin: learning from unpaired desirable /
undesirable completions."""

from __future__ import annotations

from dataclasses import dataclass

from gym_core.api import OfflineAlgorithmConfig, bounded, hookimpl


@dataclass
class KTOConfig(OfflineAlgorithmConfig):
    name: str = "kto"
    lr: float = 5e-5  # LoRA on a small model; the paper: 5e-7..5e-6 for full fine-tuning
    beta: float = bounded(0.1, gt=0)
    # lambda_D n_D / (lambda_U n_U) should lie in [1, 4/3] (the paper's advice; warned)
    desirable_weight: float = bounded(1.0, gt=0)
    undesirable_weight: float = bounded(1.0, gt=0)


@hookimpl
def gym_add_algorithms(registry):
    registry.add("kto", KTOConfig, "gym_kto.kto:KTO")
