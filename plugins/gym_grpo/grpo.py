"""The GRPO family: group-relative advantages (from the core), an importance ratio per
token or per sequence, one of TRL 1.16's surrogates or GMPO's geometric mean, an
optional k3 KL to the reference, and the loss type's normaliser (docs/algorithms.md
§1-2). Computed in the order of TRL's ``GRPOTrainer._compute_loss`` (§1.5), so that the
numbers match it to float precision (tests/plugins/test_grpo_losses.py)."""

from __future__ import annotations

import math
import warnings

import torch

from gym_core.api import GroupPolicyGradient, aggregate_token_loss, k3_kl
from gym_grpo import GRPO_LOSS_TYPES, IS_LEVELS, GRPOConfig

#: the core normaliser (gym_core.train.losses.aggregate_token_loss) of each loss type (§1.4)
NORMALISER = {"grpo": "grpo", "bnpo": "bnpo", "dr_grpo": "dr_grpo", "dapo": "dapo",
              "cispo": "dapo", "vespo": "dapo", "sapo": "grpo", "luspo": "luspo"}
#: loss types whose unclipped branch two-sided clipping caps (§1.8)
DELTA_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


def log_importance_weights(logp, old_logp, mask, level: str) -> torch.Tensor:
    """log w: per token [B, T] (``token``); the mean over each completion's tokens [B, 1]
    (``sequence``, GSPO); or that mean's value with each token's own gradient [B, T]
    (``sequence_token``, GSPO-token: sg[log s_i] + lp - sg[lp])."""
    log_ratio = logp - old_logp
    if level == "token":
        return log_ratio
    seq = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    if level == "sequence":
        return seq
    if level == "sequence_token":
        return seq.detach() + logp - logp.detach()
    raise ValueError(f"level {level!r} is not one of {IS_LEVELS}")


@torch.no_grad()
def vespo_weights(advantages, log_ratio, mask, k_pos, lambda_pos, k_neg, lambda_neg):
    """VESPO's phi(w) [B, 1] of the sequence ratio w = prod_t(pi_theta / pi_old), a
    gradient scale without gradient (§2.6, TRL ``get_gamma_weights``)."""
    lower = math.log(1e-8)
    seq = (torch.clamp(log_ratio, -20.0, 20.0) * mask).sum(-1, keepdim=True)
    log_w = torch.clamp(seq, lower, 20.0)
    w = torch.exp(log_w)
    nonneg = advantages >= 0
    k = torch.where(nonneg, k_pos, k_neg)
    lam = torch.where(nonneg, lambda_pos, lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * w).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def grpo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    loss_type: str = "grpo",
    level: str = "token",
    delta: float | None = None,
    bias_correction_kl: bool = True,
    sapo_temperatures: tuple[float, float] = (1.0, 1.05),
    vespo: tuple[float, float, float, float] = (2.0, 3.0, 3.0, 2.0),
    is_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The per-token loss [B, T] before the normaliser, as TRL 1.16 computes it:

    - grpo, bnpo, dr_grpo, dapo, luspo: -min(w_unc A, clip(w, 1-eps_low, 1+eps_high) A),
      w_unc = min(w, delta) when delta is set (§1.2, §1.8);
    - cispo: -sg[min(w, eps_high)] A lp (§2.3);  sapo: -sigmoid(tau (w - 1)) 4/tau A (§2.4);
    - vespo: -phi(w_seq) A lp (§2.6);
    - beta != 0: + beta k3, times w (not detached) with ``bias_correction_kl`` (§1.3);
    - ``is_weight`` rho ([B, T] or [B, 1]) corrects a sampler/trainer mismatch: it weights
      the policy term and not the KL term (§3).

    ``w`` is the ratio of ``level`` (:func:`log_importance_weights`); ``advantages`` [B],
    or [B, T] for multi-turn episodes (a token of turn k: its turn-level advantage).
    Returns the loss and [B, T] diagnostics (kl, low/high clip indicators)."""
    if mask is None:
        mask = torch.ones_like(logp)
    # [B]: one advantage per completion; [B, T]: per token (multi-turn episodes'
    # turn-level returns, docs/agents.md)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    log_w = log_importance_weights(logp, old_logp, mask, level)
    ratio = torch.exp(log_w)
    if loss_type == "cispo":
        loss = -torch.clamp(ratio, max=epsilon_high).detach() * adv * logp
        low = torch.zeros_like(ratio, dtype=torch.bool)
        high = (ratio > epsilon_high) & (adv > 0)
    elif loss_type in DELTA_TYPES:
        clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
        unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
        loss = -torch.min(unclipped * adv, clipped * adv)
        low = (unclipped < 1 - epsilon_low) & (adv < 0)
        high = (unclipped > 1 + epsilon_high) & (adv > 0)
    elif loss_type == "sapo":
        tau = torch.where(adv > 0, sapo_temperatures[0], sapo_temperatures[1])
        loss = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
        low = high = torch.zeros_like(ratio, dtype=torch.bool)
    elif loss_type == "vespo":
        phi = vespo_weights(adv, logp - old_logp, mask, *vespo)
        loss = -phi * adv * logp
        low = high = torch.zeros_like(ratio, dtype=torch.bool)
    else:
        raise ValueError(f"loss_type {loss_type!r} is not one of {GRPO_LOSS_TYPES}")
    loss = loss.expand_as(logp)
    info = {"low_clipped": low.float().expand_as(logp), "high_clipped": high.float().expand_as(logp)}
    if is_weight is not None:
        loss = loss * is_weight
    if beta != 0.0:
        kl = k3_kl(logp, ref_logp)
        info["kl"] = kl.detach()
        loss = loss + beta * (kl * ratio if bias_correction_kl else kl)
    return loss, info


def gmpo_loss(logp, old_logp, advantages, mask, epsilon_low, epsilon_high, beta=0.0,
              ref_logp=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GMPO's per-sequence loss [B] (§2.7, TRL ``GMPOTrainer._compute_loss``):
    -exp(mean_t of the sign-aware clipped log-ratio) A, clipped in log space to
    [-eps_low, eps_high], plus beta times the sequence mean of plain k3."""
    log_ratio = logp - old_logp
    clamped = torch.clamp(log_ratio, min=-epsilon_low, max=epsilon_high)
    adv = advantages.unsqueeze(1)
    signed = torch.where(adv > 0, torch.minimum(log_ratio, clamped),
                         torch.maximum(log_ratio, clamped))
    n = mask.sum(-1).clamp(min=1.0)
    coef = torch.exp((signed * mask).sum(-1) / n)
    loss = -coef * advantages
    info = {"low_clipped": ((log_ratio < -epsilon_low) & (adv < 0)).float(),
            "high_clipped": ((log_ratio > epsilon_high) & (adv > 0)).float()}
    if beta != 0.0:
        kl = k3_kl(logp, ref_logp)
        info["kl"] = kl.detach()
        loss = loss + beta * (kl * mask).sum(-1) / n
    return loss, info


class GRPO(GroupPolicyGradient):
    Config = GRPOConfig

    def __init__(self, cfg, policy):
        super().__init__(cfg, policy)  # values checked against GRPOConfig's declarations
        if cfg.delta is not None and cfg.delta <= 1 + self.eps_high:
            # allowed, as in TRL, but then delta also caps ratios inside the clip range
            warnings.warn(f"algorithm.delta={cfg.delta} is not above 1 + epsilon_high = "
                          f"{1 + self.eps_high}: two-sided clipping is meant to cap ratios "
                          "beyond the clip range (docs/algorithms.md §1.8)", stacklevel=2)

    def loss(self, batch, totals):
        cfg = self.cfg
        logp = self.policy.logprobs(batch)
        old = self.old_logprobs(batch, logp)
        mask = batch.extras["loss_mask"]
        adv = batch.extras["advantages"]
        ref = batch.extras.get("ref_logp")
        rho, sampling = self.sampling_correction(batch, old)
        if cfg.loss_type == "gmpo":
            per_seq, info = gmpo_loss(logp, old, adv, mask, self.eps_low, self.eps_high)
            if rho is not None:
                # a sequence's loss is weighted by rho's mean over its tokens (rho itself
                # in the sequence modes), as a broadcast per-token loss would be; the KL
                # term is not weighted (§3)
                per_seq = per_seq * ((rho * mask).sum(-1) / mask.sum(-1).clamp(min=1)
                                     if rho.shape[-1] > 1 else rho.squeeze(-1))
            if cfg.beta != 0.0:  # as gmpo_loss adds it, after the correction
                kl = k3_kl(logp, ref)
                info["kl"] = kl.detach()
                per_seq = per_seq + cfg.beta * (kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)
            # mean over sequences: this micro-batch's share of the step's mean
            loss = per_seq.sum() / totals.sequences
        else:
            per_token, info = grpo_token_loss(
                logp, old, batch.extras.get("token_advantages", adv), self.eps_low, self.eps_high, cfg.beta, ref, mask=mask,
                loss_type=cfg.loss_type, level=cfg.importance_sampling_level, delta=cfg.delta,
                bias_correction_kl=cfg.use_bias_correction_kl,
                sapo_temperatures=(cfg.sapo_temperature_pos, cfg.sapo_temperature_neg),
                vespo=(cfg.vespo_k_pos, cfg.vespo_lambda_pos, cfg.vespo_k_neg,
                       cfg.vespo_lambda_neg),
                is_weight=rho)
            loss = aggregate_token_loss(per_token, mask, NORMALISER[cfg.loss_type], totals,
                                        cfg.max_completion_length)
        denom = mask.sum().clamp(min=1)
        with torch.no_grad():
            low = (info["low_clipped"].expand_as(mask) * mask).sum() / denom
            high = (info["high_clipped"].expand_as(mask) * mask).sum() / denom
            metrics = {
                "clip_fraction": (low + high).item(),
                "clip_ratio/low": low.item(),
                "clip_ratio/high": high.item(),
                "advantage_abs_mean": adv.abs().mean().item(),
                **sampling,
            }
            if cfg.importance_sampling_level != "token":
                seq = log_importance_weights(logp, old, mask, "sequence")
                metrics["seq_ratio_mean"] = torch.exp(seq).mean().item()
            if "kl" in info:
                metrics["kl"] = ((info["kl"] * mask).sum() / denom).item()
        return loss, metrics
