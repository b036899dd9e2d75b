"""RLOO: REINFORCE with a leave-one-out baseline (arXiv 2402.14740).

Each prompt is sampled k times by the core's rollout engine. Completion i's baseline is
the mean reward of the *other* k - 1 completions, so it is unbiased (it does not depend
on o_i) and needs no value network:

    A_i = r_i - (sum_j r_j - r_i) / (k - 1) = k / (k - 1) * (r_i - mean_j r_j)

The loss is REINFORCE's, per token: -A_i * log pi_theta(o_i,t | q, o_i,<t), averaged
over tokens by the core's ``aggregate_token_loss``. REINFORCE is on-policy: one update
per batch of rollouts (the default ``updates_per_step``), no ratio, no clipping.
"""

from __future__ import annotations

import torch
from gym_core.api import LOSS_TYPES, Algorithm, GymError, aggregate_token_loss

from gym_example_plugin import RLOOConfig


def leave_one_out_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """[N] rewards, a prompt's k completions contiguous -> [N] advantages r_i - b_i with
    b_i the mean of the other k - 1 rewards of its group."""
    r = rewards.view(-1, k)
    baseline = (r.sum(dim=1, keepdim=True) - r) / (k - 1)
    return (r - baseline).reshape(-1)


class RLOO(Algorithm):
    Config = RLOOConfig
    online = True

    def __init__(self, cfg, policy):
        super().__init__(cfg, policy)
        if cfg.loss_type not in LOSS_TYPES:
            raise GymError(f"algorithm.loss_type={cfg.loss_type!r} is not one of {LOSS_TYPES}")

    @property
    def needs_reference(self) -> bool:
        return self.cfg.beta != 0.0

    @torch.no_grad()
    def prepare(self, batch) -> None:
        rewards = batch.rewards.float()
        if self.needs_reference:
            # TRL's k1 penalty on the sequence: sum_t (log pi_old - log pi_ref), in the
            # reward, so the baseline is taken over penalised rewards as well.
            mask = batch.completion_mask.float()
            logp = self.policy.logprobs(batch)
            ref_logp = self.policy.logprobs(batch, reference=True)
            kl = ((logp - ref_logp) * mask).sum(dim=1)
            rewards = rewards - self.cfg.beta * kl
            batch.extras["kl"] = kl
        batch.extras["advantages"] = leave_one_out_advantages(rewards, batch.group_size)

    def loss(self, batch, totals):
        # the policy is the only road to log-probs: under torchrun it goes through DDP,
        # so every rank's gradients are averaged
        logp = self.policy.logprobs(batch)
        advantages = batch.extras["advantages"]
        per_token = -advantages.unsqueeze(1) * logp
        loss = aggregate_token_loss(per_token, batch.completion_mask, self.cfg.loss_type,
                                    totals, self.cfg.max_completion_length)
        metrics = {"advantage_abs_mean": advantages.abs().mean().item()}
        if "kl" in batch.extras:
            metrics["kl"] = batch.extras["kl"].mean().item()
        return loss, metrics
