"""The GRPO family as a gym plugin: one implementation with every TRL 1.16 loss type
(grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo), GMPO's geometric mean, token,
sequence (GSPO) and GSPO-token importance ratios, two-sided clipping, and presets
(Dr. GRPO, DAPO, GSPO, GMPO, CISPO) that only change defaults.

Cheap to import: the config dataclasses and the registration hook only; the algorithm
(torch) is loaded when a run selects it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from gym_core.api import GroupPolicyConfig, GymError, bounded, hookimpl, one_of

#: loss_type values (docs/algorithms.md §2.8): TRL 1.16's eight, and GMPO (§2.7)
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo", "gmpo"]
GRPO_LOSS_TYPES = get_args(LossType)
#: importance_sampling_level values: TRL's token and sequence (§1.2, §2.1), and GSPO-token
#: (§2.2, which TRL 1.16 no longer ships)
ImportanceSamplingLevel = Literal["token", "sequence", "sequence_token"]
IS_LEVELS = get_args(ImportanceSamplingLevel)


@dataclass
class GRPOConfig(GroupPolicyConfig):
    """GRPO (docs/algorithms.md §1-2). Defaults follow TRL 1.16 where the paper and TRL
    differ, except lr, which suits LoRA on a small model. beta, epsilon, epsilon_high,
    scale_rewards, num_iterations and mask_truncated_completions come from
    GroupPolicyConfig."""

    name: str = "grpo"
    lr: float = 5e-5  # LoRA adapters need a larger step than full fine-tuning's 1e-6
    # The surrogate and its normaliser (§1.4, §2.8): grpo | bnpo | dr_grpo | dapo | cispo |
    # sapo | luspo | vespo (TRL 1.16's) | gmpo (GMPO's geometric mean, §2.7; its epsilon
    # is in log space)
    loss_type: str = one_of(LossType, "dapo")
    # token: a ratio per token; sequence: GSPO's length-normalised sequence ratio (§2.1);
    # sequence_token: GSPO-token, the sequence ratio's value with per-token gradients (§2.2)
    importance_sampling_level: str = one_of(ImportanceSamplingLevel, "token")
    # Two-sided clipping (INTELLECT-2, §1.8): caps the unclipped ratio at delta, so a
    # negative-advantage token whose probability shot up has a bounded loss. None: off.
    # TRL recommends delta > 1 + epsilon_high. Loss types grpo, bnpo, dr_grpo, dapo, luspo.
    delta: float | None = bounded(None, gt=0, hint="null: off")
    # k3 times the importance ratio (DeepSeek-V3.2, §1.3): the same value on-policy, the
    # unbiased reverse-KL gradient. TRL 1.16's default; False adds plain k3.
    use_bias_correction_kl: bool = True
    # SAPO's gate temperatures for positive / non-positive advantages (§2.4; TRL defaults)
    sapo_temperature_pos: float = bounded(1.0, gt=0)
    sapo_temperature_neg: float = bounded(1.05, gt=0)
    # VESPO's Gamma weight phi(w) = e^lam w^k e^(-lam w) per advantage sign (§2.6; TRL defaults)
    vespo_k_pos: float = bounded(2.0, ge=0)
    vespo_lambda_pos: float = bounded(3.0, gt=0)
    vespo_k_neg: float = bounded(3.0, ge=0)
    vespo_lambda_neg: float = bounded(2.0, gt=0)

    @staticmethod
    def validate(cfg, key):
        if cfg.loss_type == "cispo" and cfg.epsilon_high is None:
            # TRL would fall back to epsilon (0.2) and cap every weight, on-policy ones
            # included, at 0.2 (§2.3)
            raise GymError(f"{key}.loss_type=cispo caps the ratio at epsilon_high itself: "
                           f"set {key}.epsilon_high (TRL recommends 5.0), or use "
                           "algorithm=cispo")


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


@dataclass
class GSPOConfig(GRPOConfig):
    """GSPO (docs/algorithms.md §2.1): sequence-level ratios and clipping with the
    paper's clip range, three orders of magnitude below GRPO's 0.2 (a sequence ratio is
    a geometric mean of token ratios, so it moves far less; 0.2 would never clip,
    trl#3834), and TRL's recommended per-sequence normaliser. GSPO-token:
    importance_sampling_level=sequence_token."""

    name: str = "gspo"
    loss_type: str = "grpo"
    importance_sampling_level: str = "sequence"
    epsilon: float = 3e-4
    epsilon_high: float | None = 4e-4


@dataclass
class GMPOConfig(GRPOConfig):
    """GMPO (docs/algorithms.md §2.7): the geometric mean of the clipped token ratios;
    epsilon is in log space, the ratio range (e^-0.4, e^0.4) of the paper and TRL's
    GMPOConfig."""

    name: str = "gmpo"
    loss_type: str = "gmpo"
    epsilon: float = 0.4


@dataclass
class CISPOConfig(GRPOConfig):
    """CISPO (docs/algorithms.md §2.3): a REINFORCE loss weighted by the importance ratio
    capped at epsilon_high (the cap itself, not 1 + epsilon_high; TRL recommends 5.0)."""

    name: str = "cispo"
    loss_type: str = "cispo"
    epsilon_high: float | None = 5.0


PRESETS = (GRPOConfig, DrGRPOConfig, DAPOConfig, GSPOConfig, GMPOConfig, CISPOConfig)


@hookimpl
def gym_add_algorithms(registry):
    for cfg in PRESETS:
        registry.add(cfg.name, cfg, "gym_grpo.grpo:GRPO")
