"""DPO and its loss variants (docs/algorithms.md §4) as a gym plugin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from gym_core.api import GymError, OfflineAlgorithmConfig, bounded, hookimpl, one_of

#: TRL 1.16's fifteen DPO loss types (docs/algorithms.md §4.3)
DPOLossType = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                      "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
                      "sft", "sigmoid_norm"]
DPO_LOSS_TYPES = get_args(DPOLossType)
#: f-divergence scores (§4.2) and the loss types that read them (TRL raises for others)
FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
F_DIVERGENCES = get_args(FDivergence)
F_DIVERGENCE_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust",
                      "discopop", "sft")


@dataclass
class DPOConfig(OfflineAlgorithmConfig):
    name: str = "dpo"
    lr: float = 5e-5  # LoRA on a small model; full fine-tuning uses ~1e-6
    beta: float = bounded(0.1, gt=0)  # 0.1-0.5; for IPO this is tau
    # One of DPO_LOSS_TYPES, or a list of them whose losses are added with loss_weights
    # (§4.4): e.g. [sigmoid,sft] is RPO, [sigmoid,bco_pair,sft] with [0.8,0.2,1.0] is MPO.
    loss_type: Any = one_of(DPOLossType, "sigmoid")
    loss_weights: list[float] | None = bounded(None, ge=0)  # one per loss type; None: all 1.0
    # robust: the label-flip rate; exo_pair: the label smoothing (> 0); aot, aot_unpaired:
    # their smoothing; sigmoid: conservative DPO (TRL 1.16 ignores it there, §12)
    label_smoothing: float = bounded(0.0, ge=0, lt=1)
    # the scores the losses compare (f-DPO, §4.2): reverse_kl (DPO) | forward_kl |
    # js_divergence | alpha_divergence (with f_alpha_divergence_coef)
    f_divergence_type: str = one_of(FDivergence, "reverse_kl")
    f_alpha_divergence_coef: float = bounded(0.5)
    # DiscoPOP's mixing temperature (§4.3.13; the paper's value)
    discopop_tau: float = bounded(0.05, gt=0)
    # LD-DPO (§4.6): completion tokens past the shorter completion of the pair count by
    # this factor (policy and reference alike); None: off
    ld_alpha: float | None = bounded(None, ge=0, le=1, hint="null: off")
    # keep each training pair's reference log-probs after its first use: later epochs
    # skip the reference forward pass
    cache_ref_logprobs: bool = True

    @staticmethod
    def validate(cfg, key):
        """What TRL refuses (§4.2-4.4): weights per loss type, the smoothing exo_pair and
        robust need, f-divergences only where a loss type reads them."""
        names = [cfg.loss_type] if isinstance(cfg.loss_type, str) else list(cfg.loss_type)
        if not names:
            raise GymError(f"{key}.loss_type=[] names no loss type: give one of "
                           f"{', '.join(DPO_LOSS_TYPES)}, or a list of them")
        if cfg.loss_weights is not None and len(cfg.loss_weights) != len(names):
            raise GymError(f"{key}.loss_weights has {len(cfg.loss_weights)} values for the "
                           f"{len(names)} loss types {names}")
        eps = cfg.label_smoothing
        if "exo_pair" in names and not 0 < eps < 1:
            raise GymError(f"{key}.loss_type=exo_pair needs 0 < {key}.label_smoothing < 1 "
                           f"(got {eps}; the EXO paper uses 1e-3)")
        if "robust" in names and not eps < 0.5:
            raise GymError(f"{key}.label_smoothing={eps} must be in [0, 0.5) for robust")
        if cfg.f_divergence_type != "reverse_kl":
            other = [n for n in names if n not in F_DIVERGENCE_TYPES]
            if other:
                raise GymError(f"{key}.f_divergence_type={cfg.f_divergence_type} is not "
                               f"defined for loss types {other}; it applies to "
                               f"{', '.join(F_DIVERGENCE_TYPES)}")


@hookimpl
def gym_add_algorithms(registry):
    registry.add("dpo", DPOConfig, "gym_dpo.dpo:DPO")
