"""The shared base of policy-gradient methods over groups of samples (GRPO, GSPO and
their kin, docs/algorithms.md §1-2): group-relative advantages, the loss mask, old and
reference log-probs computed once per batch, and ``num_iterations`` updates per batch.
A method adds its objective in ``loss``."""

from __future__ import annotations

import torch

from gym_core.algorithm import Algorithm
from gym_core.errors import GymError
from gym_core.losses import StepTotals

SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(rollout, scale: str, eps: float = 1e-4) -> torch.Tensor:
    """A_i = r_i - mean(group), divided by the group std ("group"), by the std of the
    whole batch ("batch", Lite PPO), or not at all ("none", Dr. GRPO); stds are
    Bessel-corrected as TRL's. docs/algorithms.md §1.1."""
    mean, std = rollout.group_stats()
    adv = rollout.rewards - mean
    if scale == "group":
        return adv / (std + eps)
    if scale == "batch":
        return adv / (rollout.rewards.std() + eps)
    if scale == "none":
        return adv
    raise GymError(f"algorithm.scale_rewards={scale!r} is not one of {SCALE_REWARDS}")


class GroupPolicyGradient(Algorithm):
    """Base of online methods whose config derives from
    :class:`gym_core.config.GroupPolicyConfig`. ``prepare`` fills ``batch.extras`` with
    ``advantages`` [N], ``loss_mask`` [N, C] (completion tokens, without truncated
    completions when ``mask_truncated_completions``), ``old_logp`` (when
    ``num_iterations > 1``) and ``ref_logp`` (when ``beta != 0``)."""

    online = True

    def __init__(self, cfg, policy):
        super().__init__(cfg, policy)
        if cfg.scale_rewards not in SCALE_REWARDS:
            raise GymError(f"algorithm.scale_rewards={cfg.scale_rewards!r} is not one of "
                           f"{SCALE_REWARDS}")
        if cfg.num_iterations < 1:
            raise GymError(f"algorithm.num_iterations={cfg.num_iterations} must be at least 1")
        self.eps_low = cfg.epsilon
        self.eps_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high

    @property
    def needs_reference(self) -> bool:
        return self.cfg.beta != 0.0

    @property
    def updates_per_step(self) -> int:
        return self.cfg.num_iterations

    def advantages(self, batch) -> torch.Tensor:
        """[N] one advantage per completion (default: GRPO's group-relative one)."""
        return group_advantages(batch, self.cfg.scale_rewards)

    @torch.no_grad()
    def prepare(self, batch) -> None:
        batch.extras["advantages"] = self.advantages(batch)
        mask = batch.completion_mask.float()
        if self.cfg.mask_truncated_completions:
            mask = mask * (~batch.truncated).float().unsqueeze(1)
        batch.extras["loss_mask"] = mask
        # With one update per rollout, pi_old = pi_theta: the ratio's denominator is the
        # same forward's log-probs, detached (old_logprobs), so no extra pass is needed.
        if self.cfg.num_iterations > 1:
            batch.extras["old_logp"] = self.policy.logprobs(batch)
        if self.needs_reference:
            batch.extras["ref_logp"] = self.policy.logprobs(batch, reference=True)

    def old_logprobs(self, batch, logp: torch.Tensor) -> torch.Tensor:
        """log pi_old: computed in :meth:`prepare`, or this forward's, detached."""
        return batch.extras.get("old_logp", logp.detach())

    def step_totals(self, batches) -> StepTotals:
        totals = super().step_totals(batches)
        tokens = sum(int(b.extras["loss_mask"].sum()) for b in batches)
        return StepTotals(totals.sequences, tokens, totals.micro_batches)
