"""REINFORCE with a moving-average baseline (Williams 1992).

The core's rollout engine samples each prompt a few times and scores the completions.
Each completion's return is its reward minus a KL penalty towards the reference model
(so the policy does not drift far from where it started). The baseline b is one number
the method keeps across steps: a moving average of the mean return, so the advantage is

    A_i = R_i - b          b from the steps before this one (it does not depend on o_i)
    b  <- decay * b + (1 - decay) * mean(R over the step, every rank)

and the loss is REINFORCE's, per token: -A_i * log pi_theta(o_i,t | q, o_i,<t), averaged
over tokens by the core's ``aggregate_token_loss``. REINFORCE is on-policy: one update
per batch of rollouts (the default ``updates_per_step``), no ratio, no clipping.

What the example shows of the plugin contract: log-probs only through
``self.policy.logprobs`` (with ``reference=True`` for the reference model), per-batch
work in ``prepare``, a statistic over the whole step in ``prepare_step`` (summed over the
ranks so that 2 processes compute what 1 would), and state that must survive a resume in
``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

import torch
from gym_core.api import Algorithm, aggregate_token_loss, sum_over_ranks

from gym_example_plugin import ReinforceConfig


def moving_average(baseline: float | None, step_mean: float, decay: float) -> float:
    """The baseline after a step whose mean return was ``step_mean`` (the first step
    starts it there)."""
    if baseline is None:
        return step_mean
    return decay * baseline + (1 - decay) * step_mean


class Reinforce(Algorithm):
    Config = ReinforceConfig
    online = True

    def __init__(self, cfg, policy):
        super().__init__(cfg, policy)  # values checked against ReinforceConfig's declarations
        self.baseline: float | None = None

    @property
    def needs_reference(self) -> bool:
        return self.cfg.beta != 0.0

    @torch.no_grad()
    def prepare(self, batch) -> None:
        returns = batch.rewards.float()
        if self.needs_reference:
            # k1 penalty on the sequence: sum_t (log pi - log pi_ref), in the return
            mask = batch.completion_mask.float()
            kl = ((self.policy.logprobs(batch) - self.policy.logprobs(batch, reference=True))
                  * mask).sum(dim=1)
            returns = returns - self.cfg.beta * kl
            batch.extras["kl"] = kl
        batch.extras["returns"] = returns

    @torch.no_grad()
    def prepare_step(self, batches) -> None:
        returns = torch.cat([b.extras["returns"] for b in batches])
        # the step's mean over every rank: each rank has its own share of the prompts
        total, count = sum_over_ranks(torch.stack([returns.sum(), returns.new_tensor(
            float(returns.numel()))])).tolist()
        step_mean = total / count
        baseline = step_mean if self.baseline is None else self.baseline
        for b in batches:
            b.extras["advantages"] = b.extras["returns"] - baseline
        self.baseline = moving_average(self.baseline, step_mean, self.cfg.baseline_decay)

    def loss(self, batch, totals):
        # the policy is the only road to log-probs: under torchrun it goes through DDP,
        # so every rank's gradients are averaged
        logp = self.policy.logprobs(batch)
        advantages = batch.extras["advantages"]
        per_token = -advantages.unsqueeze(1) * logp
        loss = aggregate_token_loss(per_token, batch.completion_mask, self.cfg.loss_type,
                                    totals, self.cfg.max_completion_length)
        metrics = {"advantage_abs_mean": advantages.abs().mean().item(),
                   "baseline": float(self.baseline)}
        if "kl" in batch.extras:
            metrics["kl"] = batch.extras["kl"].mean().item()
        return loss, metrics

    # the baseline is part of what the method learned: keep it in checkpoints
    def state_dict(self):
        return {} if self.baseline is None else {"baseline": self.baseline}

    def load_state_dict(self, state):
        self.baseline = state.get("baseline")
