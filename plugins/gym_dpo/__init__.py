"""DPO and its loss variants (docs/algorithms.md §4) as a gym plugin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gym_core.api import OfflineAlgorithmConfig, hookimpl

#: TRL 1.16's fifteen DPO loss types (docs/algorithms.md §4.3)
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                  "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
                  "sft", "sigmoid_norm")
#: f-divergence scores (§4.2) and the loss types that read them (TRL raises for others)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
F_DIVERGENCE_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust",
                      "discopop", "sft")


@dataclass
class DPOConfig(OfflineAlgorithmConfig):
    name: str = "dpo"
    lr: float = 5e-5  # LoRA on a small model; full fine-tuning uses ~1e-6
    beta: float = 0.1  # 0.1-0.5; for IPO this is tau
    # One of DPO_LOSS_TYPES, or a list of them whose losses are added with loss_weights
    # (§4.4): e.g. [sigmoid,sft] is RPO, [sigmoid,bco_pair,sft] with [0.8,0.2,1.0] is MPO.
    loss_type: Any = "sigmoid"
    loss_weights: list[float] | None = None  # one per loss type; None: all 1.0
    # robust: the label-flip rate; exo_pair: the label smoothing (> 0); aot, aot_unpaired:
    # their smoothing; sigmoid: conservative DPO (TRL 1.16 ignores it there, §12)
    label_smoothing: float = 0.0
    # the scores the losses compare (f-DPO, §4.2): reverse_kl (DPO) | forward_kl |
    # js_divergence | alpha_divergence (with f_alpha_divergence_coef)
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05  # DiscoPOP's mixing temperature (§4.3.13; the paper's value)
    # LD-DPO (§4.6): completion tokens past the shorter completion of the pair count by
    # this factor (policy and reference alike); None: off
    ld_alpha: float | None = None
    # keep each training pair's reference log-probs after its first use: later epochs
    # skip the reference forward pass
    cache_ref_logprobs: bool = True


@hookimpl
def gym_add_algorithms(registry):
    registry.add("dpo", DPOConfig, "gym_dpo.dpo:DPO")
