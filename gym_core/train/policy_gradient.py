"""The shared base of policy-gradient methods over groups of samples (GRPO, GSPO, RLOO and
their kin, docs/algorithms.md §1-2, §6.1): advantages from a baseline and a reward scale,
the loss mask, old and reference log-probs computed once per batch, and
``num_iterations`` updates per batch. A method adds its objective in ``loss``."""

from __future__ import annotations

from typing import get_args

import torch

from gym_core.config.schema import ImportanceSamplingMode, ScaleRewards
from gym_core.train.algorithm import Algorithm
from gym_core.train.distributed import sum_over_ranks
from gym_core.train.losses import StepTotals

#: scale_rewards' choices, declared in the schema (GroupPolicyConfig)
SCALE_REWARDS = get_args(ScaleRewards)
ADV_EPS = 1e-4  # added to the std (not a floor): identical rewards give A = 0, not NaN
IS_MODES = get_args(ImportanceSamplingMode)


def importance_weights(old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                       mode: ImportanceSamplingMode, clip_min: float | None, clip_max: float | None
                       ) -> tuple[torch.Tensor, dict[str, float]]:
    """The sampler/trainer correction of docs/algorithms.md §3.2 (TRL 1.16's
    ``vllm_importance_sampling_*``): d = (log pi_old - log pi_smp) on completion tokens;
    rho = exp(d) per token ([N, T]) or exp(sum_t d) per sequence ([N, 1]); ``*_truncate``
    clamps rho to [clip_min, clip_max], ``*_mask`` zeroes it outside. Returns rho (no
    gradient) and TRL's ``sampling/*`` metrics."""
    with torch.no_grad():
        mask = mask.to(old_logp.dtype)
        d = torch.nan_to_num((old_logp - sampler_logp) * mask, nan=0.0)
        sequence = mode.startswith("sequence")
        rho = torch.exp(d.sum(-1, keepdim=True) if sequence else d)
        if mode.endswith("truncate"):
            rho = rho.clamp(min=clip_min, max=clip_max)
        else:
            lo = float("-inf") if clip_min is None else clip_min
            hi = float("inf") if clip_max is None else clip_max
            rho = rho.masked_fill((rho < lo) | (rho > hi), 0.0)
        on = mask.bool()
        delta = (old_logp - sampler_logp).abs()[on & ~torch.isnan(old_logp - sampler_logp)]
        flat = rho.flatten() if sequence else rho[on]
        zero = torch.zeros((), device=rho.device)
        metrics = {
            "sampling/sampling_logp_difference/mean": (delta.mean() if delta.numel() else zero).item(),
            "sampling/sampling_logp_difference/max": (delta.max() if delta.numel() else zero).item(),
            "sampling/importance_sampling_ratio/min": (flat.min() if flat.numel() else zero).item(),
            "sampling/importance_sampling_ratio/mean": (flat.mean() if flat.numel() else zero).item(),
            "sampling/importance_sampling_ratio/max": (flat.max() if flat.numel() else zero).item(),
        }
    return rho, metrics


def group_advantages(rollout, scale: ScaleRewards, eps: float = ADV_EPS) -> torch.Tensor:
    """A_i = r_i - mean(group), divided by the group std ("group"), by the std of the
    whole rollout ("batch", Lite PPO), or not at all ("none", Dr. GRPO); stds are
    Bessel-corrected as TRL's, over scorable completions only; a completion no reward
    function scored gets 0. docs/algorithms.md §1.1. (Inside a training step
    :class:`GroupPolicyGradient` takes the "batch" std over the whole step, every rank.)"""
    if scale not in SCALE_REWARDS:  # a caller's argument; a config's value is checked once
        raise ValueError(f"scale {scale!r} is not one of {SCALE_REWARDS}")
    mean, std = rollout.group_stats()
    adv = rollout.rewards - mean
    if scale == "group":
        adv = adv / (std + eps)
    elif scale == "batch":
        ok = rollout.scorable_mask()
        adv = adv / (rollout.rewards[ok].std() + eps)
    return unscored_to_zero(adv, rollout)


def unscored_to_zero(adv: torch.Tensor, rollout) -> torch.Tensor:
    """Advantage 0 for completions no reward function scored, and wherever a statistic
    was undefined (NaN: a group with fewer than 2 scorable completions)."""
    return torch.nan_to_num(torch.where(rollout.scorable_mask(), adv, torch.nan), nan=0.0)


def turn_advantages(adv: torch.Tensor, batch, std: torch.Tensor | None,
                    mask: torch.Tensor) -> torch.Tensor:
    """[N, C] per-token advantages of multi-turn episodes: A_i + (G_k - G_0) on the
    tokens of turn k (``adv`` [N]: each episode's return minus its episode-level group
    baseline, before scaling; G_k: ``batch.token_returns``), divided by ``std + eps``
    when given (scale_rewards=group), 0 on unscored episodes and environment tokens."""
    shift = batch.token_returns.to(adv.device) - batch.rewards.unsqueeze(1)
    tok = adv.unsqueeze(1) + shift
    if std is not None:
        tok = tok / (std.unsqueeze(1) + ADV_EPS)
    ok = batch.scorable_mask().unsqueeze(1) & ~torch.isnan(tok)
    return torch.where(ok, tok, torch.zeros_like(tok)) * mask


def step_std(values: list[torch.Tensor]) -> torch.Tensor:
    """Bessel-corrected std of the concatenation of ``values`` over every rank (a 0-d
    tensor; NaN with fewer than 2 values)."""
    device = values[0].device if values else torch.device("cpu")
    flat = torch.cat([v.reshape(-1).double() for v in values]) if values else torch.zeros(0)
    s = sum_over_ranks(torch.stack([flat.new_tensor(float(flat.numel())), flat.sum(),
                                    (flat ** 2).sum()]).to(device))
    n, total, sq = s[0], s[1], s[2]
    var = (sq - total ** 2 / n) / (n - 1)
    return torch.sqrt(var.clamp(min=0)).float() if n > 1 else torch.tensor(float("nan"))


class GroupPolicyGradient(Algorithm):
    """Base of online methods whose config derives from
    :class:`gym_core.config.schema.GroupPolicyConfig`. ``prepare`` fills ``batch.extras`` with
    ``loss_mask`` [N, C] (completion tokens, without truncated completions when
    ``mask_truncated_completions``), ``old_logp`` (when ``num_iterations > 1`` or
    :attr:`needs_old_logprobs`), ``ref_logp`` (when ``beta != 0``) and then
    ``advantages`` [N]: :meth:`advantages` (the reward minus a baseline) scaled as
    ``scale_rewards`` says. A method's ``loss`` multiplies its per-token loss by
    :meth:`sampling_correction`'s weight. Its config's values and their relations are
    checked before a job starts (GroupPolicyConfig's declarations and ``validate``)."""

    online = True
    data_types = ("prompt_only",)

    def __init__(self, cfg, policy):
        super().__init__(cfg, policy)
        self.eps_low = cfg.epsilon
        self.eps_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high

    @property
    def needs_reference(self) -> bool:
        return self.cfg.beta != 0.0

    @property
    def needs_old_logprobs(self) -> bool:
        """True when ``prepare`` must score the sampling policy even on-policy (RLOO's
        KL reward reads it). Default: only with ``num_iterations > 1``."""
        return self.cfg.num_iterations > 1

    @property
    def updates_per_step(self) -> int:
        return self.cfg.num_iterations

    def advantages(self, batch) -> torch.Tensor:
        """[N] each completion's reward minus its baseline, before ``scale_rewards``
        (default: GRPO's group mean over scorable completions). Runs in ``prepare``
        after ``old_logp`` and ``ref_logp`` are in ``batch.extras``."""
        mean, _ = batch.group_stats()
        return batch.rewards - mean

    @torch.no_grad()
    def prepare(self, batch) -> None:
        # multi-turn episodes: the model's own tokens only (docs/agents.md)
        trained = getattr(batch, "trained_mask", None)
        mask = (trained() if trained is not None else batch.completion_mask).float()
        if self.cfg.mask_truncated_completions:
            mask = mask * (~batch.truncated).float().unsqueeze(1)
        batch.extras["loss_mask"] = mask
        # With one update per rollout, pi_old = pi_theta: the ratio's denominator is the
        # same forward's log-probs, detached (old_logprobs), so no extra pass is needed.
        if self.needs_old_logprobs:
            batch.extras["old_logp"] = self.policy.logprobs(batch)
        if self.needs_reference:
            batch.extras["ref_logp"] = self.policy.logprobs(batch, reference=True)
        adv = raw = self.advantages(batch)
        if self.cfg.scale_rewards == "group":
            _, std = batch.group_stats()
            adv = adv / (std + ADV_EPS)
        # "batch": divided by the std of the step's rewards in prepare_step
        batch.extras["advantage_defined"] = ~torch.isnan(adv) & batch.scorable_mask()
        batch.extras["advantages"] = unscored_to_zero(adv, batch)
        returns = getattr(batch, "token_returns", None)
        if returns is not None:
            batch.extras["token_advantages"] = turn_advantages(
                raw, batch, std=None if self.cfg.scale_rewards != "group"
                else batch.group_stats()[1], mask=mask)

    def token_advantages(self, batch) -> torch.Tensor:
        """[N, 1] the episode-level advantages, or [N, C] per token for multi-turn
        episodes with turn-level returns (docs/agents.md): what a per-token loss
        multiplies."""
        tok = batch.extras.get("token_advantages")
        return tok if tok is not None else batch.extras["advantages"].unsqueeze(1)

    @torch.no_grad()
    def prepare_step(self, batches) -> None:
        """``scale_rewards="batch"``: divide by the std of every scorable reward of the
        step on every rank, TRL's generation batch (§1.1)."""
        if self.cfg.scale_rewards == "batch":
            std = step_std([b.rewards[b.scorable_mask()] for b in batches])
            for b in batches:
                b.extras["advantages"] = unscored_to_zero(
                    b.extras["advantages"] / (std.to(b.rewards.device) + ADV_EPS), b)
                if "token_advantages" in b.extras:
                    b.extras["token_advantages"] = (b.extras["token_advantages"]
                                                    / (std.to(b.rewards.device) + ADV_EPS))

    def old_logprobs(self, batch, logp: torch.Tensor) -> torch.Tensor:
        """log pi_old: computed in :meth:`prepare`, or this forward's, detached."""
        return batch.extras.get("old_logp", logp.detach())

    def sampling_correction(self, batch, old_logp: torch.Tensor
                            ) -> tuple[torch.Tensor | None, dict[str, float]]:
        """The weight rho = pi_old / pi_sampler of docs/algorithms.md §3 that a method
        multiplies into its per-token loss ([N, T] for token modes, [N, 1] for sequence
        modes; no gradient), and the mismatch metrics. (None, {}) when the batch carries
        no sampler log-probs (an offline batch); (None, metrics) when
        ``importance_sampling_correction`` is off."""
        sampler = getattr(batch, "sampler_logp", None)
        if sampler is None:
            return None, {}
        cfg = self.cfg
        trained = getattr(batch, "trained_mask", None)
        rho, metrics = importance_weights(
            old_logp, sampler.to(old_logp.device),
            trained() if trained is not None else batch.completion_mask,
            cfg.importance_sampling_mode, cfg.importance_sampling_clip_min,
            cfg.importance_sampling_clip_max)
        return (rho if cfg.importance_sampling_correction else None), metrics

    def step_totals(self, batches) -> StepTotals:
        totals = super().step_totals(batches)
        tokens = sum(int(b.extras["loss_mask"].sum()) for b in batches)
        return StepTotals(totals.sequences, tokens, totals.micro_batches)
