"""RLOO: REINFORCE with a leave-one-out baseline over the k samples of a prompt (Kool et
al. 2019; Ahmadian et al., arXiv 2402.14740), as TRL 1.16's RLOOTrainer computes it
(docs/algorithms.md §6.1):

    R_i  = clip(r_i) - beta * sum_t KL[i,t]             KL k1 (default) or k3, in the reward
    A_i  = R_i - mean_{j != i} R_j                      over the group's scorable completions
    rho_i = exp(sum_t log pi_theta - sum_t log pi_old)   the sequence ratio
    L    = mean_i -min(rho_i A_i, clip(rho_i, 1 - eps_low, 1 + eps_high) A_i)

Multi-turn episodes (docs/agents.md): turn k of episode i has the advantage
A_i + (G_k - G_0) (the leave-one-out advantage of the episode return, shifted by turn
k's discounted return, as GRPO's) and its own ratio over its sampled tokens; the
episode's loss sums its turns'.

Rollouts, the prompt-once scoring, old / reference log-probs and the loss mask come from
the core's GroupPolicyGradient, as for GRPO."""

from __future__ import annotations

import torch

from gym_core.api import GroupPolicyGradient, sum_over_ranks
from gym_rloo import KL_ESTIMATORS, RLOOConfig

NORM_EPS = 1e-4  # TRL's epsilon in normalize_advantages


def leave_one_out_advantages(rewards: torch.Tensor, k: int,
                             scorable: torch.Tensor | None = None) -> torch.Tensor:
    """[N] rewards, a prompt's k completions contiguous -> [N] r_i - b_i, with b_i the
    mean reward of the other scorable completions of its group. NaN where there is no
    baseline (an unscorable completion, or a group with one scorable completion)."""
    r = rewards.view(-1, k)
    ok = torch.ones_like(r, dtype=torch.bool) if scorable is None else scorable.view(-1, k)
    kept = torch.where(ok, r, torch.zeros_like(r))
    n = ok.sum(dim=1, keepdim=True)
    baseline = (kept.sum(dim=1, keepdim=True) - kept) / (n - 1).clamp(min=1)
    adv = torch.where(ok & (n > 1), r - baseline, torch.full_like(r, float("nan")))
    return adv.reshape(-1)


def sequence_kl(old_logp, ref_logp, mask, estimator: str) -> torch.Tensor:
    """[N] the per-token KL estimate of pi_old against pi_ref summed over each completion
    (docs/algorithms.md §0.4): k1 = log pi_old - log pi_ref, k3 = e^x - x - 1 with
    x = log pi_ref - log pi_old."""
    if estimator == "k1":
        per_token = old_logp - ref_logp
    elif estimator == "k3":
        x = ref_logp - old_logp
        per_token = torch.exp(x) - x - 1
    else:
        raise ValueError(f"estimator {estimator!r} is not one of {KL_ESTIMATORS}")
    return (per_token * mask).sum(-1)


def rloo_sequence_loss(logp, old_logp, advantages, mask, eps_low, eps_high, turn_index=None):
    """Per-sequence loss [N] -min(rho A, clip(rho) A), rho = exp(sum_t (lp - lp_old)) over
    the completion (the product of token ratios, no 1/|o|), and the clip indicators ([N],
    the share of its turns each sequence clipped).

    Multi-turn episodes (``turn_index`` [N, C], the turn each token follows; docs/agents.md):
    each model turn is a unit of its own, with its own ratio rho_k over the turn's tokens
    in ``mask`` and its own advantage (``advantages`` [N, C], constant within a turn:
    A_i + (G_k - G_0)); the sequence's loss is the sum over its turns. With one turn this
    is the sequence loss above; on-policy (rho = 1) its gradient is REINFORCE with each
    turn's return, sum_k A_k grad log pi(turn k)."""
    mask = mask.to(logp.dtype)
    if turn_index is None:
        turns = mask.unsqueeze(-1)  # [N, C, 1]: the whole completion is one unit
        adv = advantages.reshape(len(mask), -1)[:, :1]
        present = torch.ones_like(adv)  # as TRL: an all-masked row still counts
    else:
        k = int(turn_index.max().item()) + 1 if turn_index.numel() else 1
        turns = (torch.nn.functional.one_hot(turn_index.clamp(min=0).long(), max(k, 1))
                 * (turn_index >= 0).unsqueeze(-1)).to(mask.dtype) * mask.unsqueeze(-1)
        count = turns.sum(1)  # [N, K] tokens of each turn
        a = advantages if advantages.dim() == 2 else advantages.unsqueeze(1).expand_as(mask)
        adv = torch.einsum("nc,nck->nk", a.to(mask.dtype), turns) / count.clamp(min=1)
        present = (count > 0).to(mask.dtype)  # [N, K] the turns a row has
    log_ratio = torch.einsum("nc,nck->nk", (logp - old_logp).to(mask.dtype), turns)
    rho = torch.exp(log_ratio)
    unit = -torch.min(rho * adv, torch.clamp(rho, 1 - eps_low, 1 + eps_high) * adv)
    low = ((rho < 1 - eps_low) & (adv < 0)).to(mask.dtype) * present
    high = ((rho > 1 + eps_high) & (adv > 0)).to(mask.dtype) * present
    units = present.sum(-1).clamp(min=1)
    return (unit * present).sum(-1), low.sum(-1) / units, high.sum(-1) / units


class RLOO(GroupPolicyGradient):
    Config = RLOOConfig

    def __init__(self, cfg, policy):
        super().__init__(cfg, policy)  # values checked against RLOOConfig's declarations

    @property
    def needs_old_logprobs(self) -> bool:
        # the KL penalty is a reward: it needs pi_old's log-probs before the loss pass
        return self.cfg.beta != 0.0 or self.cfg.num_iterations > 1

    def advantages(self, batch) -> torch.Tensor:
        rewards = batch.rewards.float()
        if self.cfg.reward_clip_range is not None:
            low, high = self.cfg.reward_clip_range
            rewards = rewards.clamp(min=low, max=high)
        if self.cfg.beta != 0.0:
            mask = batch.extras["loss_mask"]
            kl = sequence_kl(batch.extras["old_logp"], batch.extras["ref_logp"], mask,
                             self.cfg.kl_estimator)
            rewards = rewards - self.cfg.beta * kl
            batch.extras["kl_sum"] = kl
        return leave_one_out_advantages(rewards, batch.group_size, batch.scorable_mask())

    @torch.no_grad()
    def prepare_step(self, batches) -> None:
        super().prepare_step(batches)
        if not self.cfg.normalize_advantages:
            return
        # TRL: over the rows with an advantage (nanmean, nanstd) of the whole generation
        # batch, every process
        kept = [b.extras["advantages"][b.extras["advantage_defined"]].double() for b in batches]
        flat = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.float64)
        s = sum_over_ranks(torch.stack([flat.new_tensor(float(flat.numel())), flat.sum(),
                                        (flat ** 2).sum()]))
        n, total, sq = s.tolist()
        mean = total / n if n else 0.0
        std = ((sq - total * total / n) / (n - 1)) ** 0.5 if n > 1 else float("nan")
        for b in batches:
            ok = b.extras["advantage_defined"]
            adv = (b.extras["advantages"] - mean) / (std + NORM_EPS)
            b.extras["advantages"] = torch.where(ok, torch.nan_to_num(adv, nan=0.0),
                                                 torch.zeros_like(adv))
            if "token_advantages" in b.extras:  # multi-turn: the same map on every turn
                tok = (b.extras["token_advantages"] - mean) / (std + NORM_EPS)
                b.extras["token_advantages"] = torch.where(
                    ok.unsqueeze(1), torch.nan_to_num(tok, nan=0.0),
                    torch.zeros_like(tok)) * b.extras["loss_mask"]

    def loss(self, batch, totals):
        logp = self.policy.logprobs(batch)
        mask = batch.extras["loss_mask"]
        adv = batch.extras["advantages"]
        # multi-turn episodes: a ratio and an advantage per turn (turn-level returns)
        per_seq, low, high = rloo_sequence_loss(
            logp, self.old_logprobs(batch, logp), batch.extras.get("token_advantages", adv),
            mask, self.eps_low, self.eps_high, turn_index=getattr(batch, "turn_index", None))
        metrics = {"advantage_abs_mean": adv.abs().mean().item(),
                   "clip_ratio/low": low.mean().item(), "clip_ratio/high": high.mean().item()}
        if "kl_sum" in batch.extras:  # TRL's logged kl: the token mean of the estimate
            metrics["kl"] = (batch.extras["kl_sum"].sum() / mask.sum().clamp(min=1)).item()
        # TRL: the mean over the micro-batch's sequences; here this micro-batch's share
        # of the mean over the step's sequences
        return per_seq.sum() / totals.sequences, metrics
