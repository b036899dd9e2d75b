"""GSPO: s_i = exp(mean_t log(pi_theta / pi_old)) per completion, clipped as a whole
sequence; J = (1/G) sum_i min(s_i A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i)
(ALGORITHMS.md §2). Advantages are GRPO's, from the core."""

from __future__ import annotations

import torch

from gym_core.algorithm import Algorithm
from gym_core.errors import GymError
from gym_core.losses import k3_kl
from gym_core.rollout import group_advantages
from gym_gspo import GSPOConfig


def sequence_log_ratio(logp, old_logp, mask):
    """mean_t (log pi_theta - log pi_old) over each completion's tokens: log s_i."""
    return ((logp - old_logp) * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def gspo_loss_terms(logp, old_logp, advantages, mask, eps_low, eps_high, variant="sequence"):
    """Per-sequence loss [B] and whether each sequence was clipped.

    sequence: -min(s A, clip(s) A) with s = exp(log s_i), so every token of o_i gets the
    gradient weight s_i A_i / |o_i|.
    token (GSPO-token): s_it = sg[s_i] * pi(o_t) / sg[pi(o_t)] has the value of s_i, and
    the token losses are averaged per sequence; with one advantage per sequence its
    gradient equals GSPO's.
    """
    log_s = sequence_log_ratio(logp, old_logp, mask)
    adv = advantages
    if variant == "sequence":
        s = torch.exp(log_s)
        clipped = torch.clamp(s, 1 - eps_low, 1 + eps_high)
        loss = -torch.min(s * adv, clipped * adv)
    elif variant == "token":
        s_t = torch.exp(log_s.detach().unsqueeze(1) + logp - logp.detach())
        clipped_t = torch.clamp(s_t, 1 - eps_low, 1 + eps_high)
        a = adv.unsqueeze(1)
        per_token = -torch.min(s_t * a, clipped_t * a)
        loss = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        s = torch.exp(log_s)
    else:
        raise GymError(f"algorithm.variant={variant!r} is not one of sequence, token")
    was_clipped = ((s < 1 - eps_low) & (adv < 0)) | ((s > 1 + eps_high) & (adv > 0))
    return loss, was_clipped.float()


class GSPO(Algorithm):
    Config = GSPOConfig
    online = True

    @property
    def needs_reference(self) -> bool:
        return self.cfg.beta != 0.0

    def logprobs(self, batch, reference: bool = False):
        return self.policy.logprobs(batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                    batch.completion_mask, reference=reference)

    @torch.no_grad()
    def prepare(self, batch) -> None:
        batch.extras["advantages"] = group_advantages(batch, self.cfg.scale_rewards)
        # on-policy (num_iterations 1) the old policy is this forward's, detached: s_i = 1
        if self.cfg.num_iterations > 1:
            batch.extras["old_logp"] = self.logprobs(batch)
        if self.needs_reference:
            batch.extras["ref_logp"] = self.logprobs(batch, reference=True)

    def loss(self, batch, totals):
        logp = self.logprobs(batch)
        old = batch.extras.get("old_logp", logp.detach())
        mask = batch.completion_mask.float()
        per_seq, clipped = gspo_loss_terms(logp, old, batch.extras["advantages"], mask,
                                           self.cfg.epsilon, self.cfg.epsilon_high,
                                           self.cfg.variant)
        metrics = {"clip_fraction": clipped.mean().item(),
                   "seq_ratio_mean": torch.exp(sequence_log_ratio(logp, old, mask)).mean().item()}
        if self.needs_reference:
            kl = k3_kl(logp, batch.extras["ref_logp"])
            per_seq = per_seq + self.cfg.beta * (kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)
            metrics["kl"] = ((kl * mask).sum() / mask.sum().clamp(min=1)).item()
        # (1/G) sum_i over each group, averaged over the step's groups: a mean over all
        # the step's sequences, this micro-batch's share of it
        return per_seq.sum() / totals.sequences, metrics
