"""The rollout engine: one batched, KV-cached generate call yields G completions per
prompt; completion masks, rewards and group statistics are computed once here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from gym_core.base.errors import GymError
from gym_core.sampling.generation import Sampling


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [B, P] the distinct prompts, left-padded
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor  # [N, C] right-padded; N = B * G, a prompt's G rows contiguous
    completion_mask: torch.Tensor  # 1 up to and including the first EOS
    truncated: torch.Tensor  # [N] bool: no EOS within max_completion_length
    rewards: torch.Tensor  # [N] weighted sum of the reward functions
    group_size: int
    examples: list[dict[str, Any]]  # [N] the data row of each completion's prompt
    completions: list[str]
    reward_metrics: dict[str, float] = field(default_factory=dict)
    prompts_cut: int = 0  # prompts over max_prompt_length tokens (they kept their end)
    # [N, C] the sampler's log-prob of each completion token (0 on padding): the trainer
    # compares it with its own to measure and correct the mismatch (docs/algorithms.md §3)
    sampler_logp: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # algorithms' own tensors
    # [N] bool: False where every reward function returned None. Such a completion is
    # left out of its group's statistics and gets advantage 0 (TRL's rule, §1.1);
    # None: all scorable.
    scorable: torch.Tensor | None = None
    # Multi-turn episodes (env=..., docs/agents.md): [N, C] 1 on the tokens the model
    # sampled (environment tokens are 0: out of the loss, still attended to); None: every
    # completion token is the model's.
    action_mask: torch.Tensor | None = None
    # [N, C] the discounted return G_k of the turn each sampled token belongs to, and
    # each turn's reward on its last sampled token (PPO); None for single-turn rollouts
    token_returns: torch.Tensor | None = None
    turn_rewards: torch.Tensor | None = None
    # [N, C] the model turn each token follows (-1: padding): per-turn objectives (RLOO's
    # ratio per turn); None for single-turn rollouts
    turn_index: torch.Tensor | None = None
    episodes: list | None = None  # [N] gym_core.env.episode.EpisodeRecord

    def trained_mask(self) -> torch.Tensor:
        """[N, C] the tokens a loss may train on: the completion's, the model's own."""
        if self.action_mask is None:
            return self.completion_mask
        return self.completion_mask * self.action_mask

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def scorable_mask(self) -> torch.Tensor:
        """[N] bool, True where at least one reward function scored the completion."""
        if self.scorable is None:
            return torch.ones(len(self), dtype=torch.bool, device=self.rewards.device)
        return self.scorable.to(self.rewards.device)

    def group_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group mean and std (Bessel-corrected, as TRL) over the group's scorable
        completions, broadcast to completions; NaN where a group has too few of them
        (no scorable row for the mean, fewer than 2 for the std), as TRL's nanmean and
        nanstd."""
        g = self.group_size
        r = self.rewards.view(-1, g)
        if self.scorable is None or bool(self.scorable.all()):
            mean = r.mean(dim=1)
            std = r.std(dim=1) if g > 1 else torch.zeros_like(mean)
        else:
            ok = self.scorable_mask().view(-1, g).to(r.dtype)
            n = ok.sum(dim=1)
            mean = (r * ok).sum(dim=1) / n  # 0 / 0 = NaN for a group with no scorable row
            std = torch.sqrt(((r - mean.unsqueeze(1)) ** 2 * ok).sum(dim=1) / (n - 1))
            std = torch.where(n > 1, std, torch.full_like(std, float("nan")))
        return mean.repeat_interleave(g), std.repeat_interleave(g)


class RolloutEngine:
    def __init__(self, policy, cfg, rewards: list[tuple[str, Any, float]], env=None):
        """``cfg`` is an OnlineAlgorithmConfig (num_generations >= 2, declared there);
        ``rewards`` (name, fn, weight) triples; ``env``: (environment class, its config)
        for multi-turn episodes, whose rewards are the environment's (the reward
        functions are not applied)."""
        self.policy, self.cfg, self.rewards, self.env = policy, cfg, rewards, env

    @torch.no_grad()
    def generate(self, examples: list[dict[str, Any]], seeds: list[int] | None = None) -> Rollout:
        """G completions for each example; ``seeds`` (one per example, e.g. derived from
        its position in the data stream) fix each completion's sampling noise."""
        cfg, g = self.cfg, self.cfg.num_generations
        if self.env is not None:
            return self.episodes(examples, seeds)
        out = self.policy.sample(
            [ex["prompt"] for ex in examples], num_samples=g,
            max_new_tokens=cfg.max_completion_length, max_prompt_length=cfg.max_prompt_length,
            sampling=Sampling(True, cfg.temperature, cfg.top_p, cfg.top_k),
            row_seeds=None if seeds is None else [s * 1009 + i for s in seeds for i in range(g)],
            with_logprobs=True,
        )
        completions = out.texts
        rows = [ex for ex in examples for _ in range(g)]
        total, scored, metrics = self.score(rows, completions)
        return Rollout(
            prompt_ids=out.prompt_ids,
            prompt_mask=out.prompt_mask,
            completion_ids=out.completion_ids,
            completion_mask=out.completion_mask,
            truncated=out.truncated,
            rewards=total.to(out.completion_ids.device),
            group_size=g,
            examples=rows,
            completions=completions,
            reward_metrics=metrics,
            prompts_cut=out.prompts_cut,
            sampler_logp=out.logprobs,
            scorable=scored.to(out.completion_ids.device),
        )

    def score(self, rows: list[dict[str, Any]], completions: list[str]
              ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """The weighted reward of each completion (of its row), whether any reward
        function scored it, and each function's mean (also for rollouts sampled
        elsewhere, e.g. by an API policy)."""
        prompts = [ex["prompt"] for ex in rows]
        total = torch.zeros(len(rows))
        scored = torch.zeros(len(rows), dtype=torch.bool)
        metrics = {}
        for name, fn, weight in self.rewards:
            values = fn(prompts, completions, rows)
            if len(values) != len(rows):
                raise GymError(
                    f"reward '{name}' returned {len(values)} values for {len(rows)} completions"
                )
            r = torch.tensor([float("nan") if v is None else v for v in values])
            metrics[f"rewards/{name}"] = r.nanmean().item()
            total += weight * torch.nan_to_num(r, nan=0.0)
            scored |= ~torch.isnan(r)
        return total, scored, metrics


    @torch.no_grad()
    def episodes(self, examples: list[dict[str, Any]], seeds: list[int] | None) -> Rollout:
        """G multi-turn episodes of each example (docs/agents.md)."""
        from gym_core.env.returns import discounted_returns, token_returns, turn_end_rewards
        from gym_core.sampling.episodes import sample_episodes

        cfg, g = self.cfg, self.cfg.num_generations
        env_cls, env_cfg = self.env
        with self.policy.full_model() as model:  # FSDP: the full weights, every rank
            out = sample_episodes(
                model, self.policy.tokenizer, env_cls, env_cfg, examples,
                num_samples=g, sampling=Sampling(True, cfg.temperature, cfg.top_p, cfg.top_k),
                row_seeds=None if seeds is None else [s * 1009 + i for s in seeds
                                                      for i in range(g)],
                system_prompt=self.policy.system_prompt,
                max_prompt_length=cfg.max_prompt_length)
        recs = out.records
        turn_rewards = [r.rewards for r in recs]
        gamma = float(env_cfg.gamma)
        returns = [discounted_returns(r, gamma)[0] if r else 0.0 for r in turn_rewards]
        scorable = torch.tensor([r.error is None for r in recs], dtype=torch.bool)
        device = out.completion_ids.device
        n = len(recs)
        metrics = {
            "env/turns": sum(r.turns for r in recs) / n,
            "env/tool_calls": sum(r.tool_calls for r in recs) / n,
            "env/tool_errors": sum(r.tool_errors for r in recs) / n,
            "env/done": sum(r.done for r in recs) / n,
            "env/errors": sum(r.error is not None for r in recs) / n,
            "env/environment_tokens": float(
                (out.completion_mask - out.action_mask).sum()) / n,
        }
        tokenizer = self.policy.tokenizer
        texts = [tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
                 for ids, m in zip(out.completion_ids.cpu(), out.completion_mask.cpu())]
        return Rollout(
            prompt_ids=out.prompt_ids, prompt_mask=out.prompt_mask,
            completion_ids=out.completion_ids, completion_mask=out.completion_mask,
            truncated=out.truncated, rewards=torch.tensor(returns, device=device),
            group_size=g, examples=[ex for ex in examples for _ in range(g)],
            completions=texts, reward_metrics=metrics, prompts_cut=out.prompts_cut,
            sampler_logp=out.logprobs, scorable=scorable.to(device),
            action_mask=out.action_mask,
            token_returns=token_returns(out.turn_index, out.action_mask, turn_rewards, gamma),
            turn_rewards=turn_end_rewards(out.turn_index, out.action_mask, turn_rewards),
            turn_index=out.turn_index, episodes=recs)


def rollout_metrics(rollout: Rollout) -> dict[str, float]:
    _, std = rollout.group_stats()
    std = torch.nan_to_num(std, nan=0.0)
    lengths = rollout.trained_mask().sum(dim=1).float()
    return {
        "reward_mean": rollout.rewards.mean().item(),
        "reward_std": rollout.rewards.std().item() if len(rollout) > 1 else 0.0,
        "frac_reward_zero_std": (std.view(-1, rollout.group_size)[:, 0] == 0).float().mean().item(),
        "completion_length": lengths.mean().item(),
        "truncated_fraction": rollout.truncated.float().mean().item(),
        "prompts_cut": float(rollout.prompts_cut),
        **rollout.reward_metrics,
    }
