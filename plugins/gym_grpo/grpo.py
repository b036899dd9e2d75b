"""GRPO: group-relative advantages, clipped token ratios, optional k3 KL to the
reference (docs/algorithms.md §1). The loss normaliser (loss_type) comes from the core."""

from __future__ import annotations

import torch

from gym_core.api import LOSS_TYPES, GroupPolicyGradient, GymError, aggregate_token_loss, k3_kl
from gym_grpo import GRPOConfig


def grpo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    is_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss -min(w A, clip(w, 1-eps_low, 1+eps_high) A) rho + beta k3, with
    w = pi_theta / pi_old per token and A the completion's advantage ([B] -> [B, T]);
    rho (``is_weight``, [B, T] or [B, 1]) corrects a sampler/trainer mismatch and does
    not touch the KL term (docs/algorithms.md §1.5 steps 4-5, §3).

    Returns the [B, T] loss and [B, T] diagnostics (kl, low/high clip indicators).
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    if is_weight is not None:
        loss = loss * is_weight
    info = {
        "low_clipped": ((ratio < 1 - epsilon_low) & (adv < 0)).float(),
        "high_clipped": ((ratio > 1 + epsilon_high) & (adv > 0)).float(),
    }
    if beta != 0.0:
        kl = k3_kl(logp, ref_logp)
        loss = loss + beta * kl
        info["kl"] = kl
    return loss, info


class GRPO(GroupPolicyGradient):
    Config = GRPOConfig

    def __init__(self, cfg, policy):
        super().__init__(cfg, policy)
        if cfg.loss_type not in LOSS_TYPES:
            raise GymError(f"algorithm.loss_type={cfg.loss_type!r} is not one of {LOSS_TYPES}")

    def loss(self, batch, totals):
        logp = self.policy.logprobs(batch)
        mask = batch.extras["loss_mask"]
        old = self.old_logprobs(batch, logp)
        rho, sampling = self.sampling_correction(batch, old)
        per_token, info = grpo_token_loss(
            logp, old, batch.extras["advantages"], self.eps_low,
            self.eps_high, self.cfg.beta, batch.extras.get("ref_logp"), rho,
        )
        loss = aggregate_token_loss(
            per_token, mask, self.cfg.loss_type, totals, self.cfg.max_completion_length
        )
        denom = mask.sum().clamp(min=1)
        low = (info["low_clipped"] * mask).sum() / denom
        high = (info["high_clipped"] * mask).sum() / denom
        metrics = {
            "clip_fraction": (low + high).item(),
            "clip_ratio/low": low.item(),
            "clip_ratio/high": high.item(),
            "advantage_abs_mean": batch.extras["advantages"].abs().mean().item(),
            **sampling,
        }
        if "kl" in info:
            metrics["kl"] = ((info["kl"] * mask).sum() / denom).item()
        return loss, metrics
