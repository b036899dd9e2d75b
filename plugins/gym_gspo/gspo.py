"""GSPO: s_i = exp(mean_t log(pi_theta / pi_old)) per completion, clipped as a whole
sequence; J = (1/G) sum_i min(s_i A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i)
(docs/algorithms.md §2.1). Advantages are GRPO's, from the core."""

from __future__ import annotations

import torch

from gym_core.api import GroupPolicyGradient, GymError, k3_kl
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


class GSPO(GroupPolicyGradient):
    Config = GSPOConfig

    def loss(self, batch, totals):
        logp = self.policy.logprobs(batch)
        old = self.old_logprobs(batch, logp)
        mask = batch.extras["loss_mask"]
        per_seq, clipped = gspo_loss_terms(logp, old, batch.extras["advantages"], mask,
                                           self.eps_low, self.eps_high, self.cfg.variant)
        rho, sampling = self.sampling_correction(batch, old)
        if rho is not None:
            # sampler/trainer mismatch (docs/algorithms.md §3.3): TRL weights the
            # broadcast per-token loss by rho; per sequence that is rho's mean over the
            # completion's tokens (rho itself in the sequence modes)
            per_seq = per_seq * ((rho * mask).sum(-1) / mask.sum(-1).clamp(min=1)
                                 if rho.shape[-1] > 1 else rho.squeeze(-1))
        metrics = {"clip_fraction": clipped.mean().item(),
                   "seq_ratio_mean": torch.exp(sequence_log_ratio(logp, old, mask)).mean().item(),
                   **sampling}
        if self.needs_reference:
            kl = k3_kl(logp, batch.extras["ref_logp"])
            per_seq = per_seq + self.cfg.beta * (kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)
            metrics["kl"] = ((kl * mask).sum() / mask.sum().clamp(min=1)).item()
        # (1/G) sum_i over each group, averaged over the step's groups: a mean over all
        # the step's sequences, this micro-batch's share of it
        return per_seq.sum() / totals.sequences, metrics
