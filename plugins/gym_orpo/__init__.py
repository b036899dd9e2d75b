"""ORPO (docs/algorithms.md §5.2) as a gym plugin: supervised fine-tuning on the chosen
answer plus an odds-ratio penalty against the rejected one, without a reference model."""

from __future__ import annotations

from dataclasses import dataclass

from gym_core.api import OfflineAlgorithmConfig, bounded, hookimpl


@dataclass
class ORPOConfig(OfflineAlgorithmConfig):
    name: str = "orpo"
    # LoRA (r 16) on a 135M model; the NLL term makes ORPO as fast to move as SFT. TRL's
    # 1e-6 default is for full fine-tuning.
    lr: float = 2e-4
    # lambda, the odds-ratio term's weight (the paper and TRL: 0.1)
    beta: float = bounded(0.1, ge=0)


@hookimpl
def gym_add_algorithms(registry):
    registry.add("orpo", ORPOConfig, "gym_orpo.orpo:ORPO")
