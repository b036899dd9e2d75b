"""The rollout engine: one batched, KV-cached generate call yields G completions per
prompt; completion masks, rewards and group statistics are computed once here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from gym_core.errors import GymError
from gym_core.generation import Sampling


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

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def group_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group mean and std (Bessel-corrected, as TRL), broadcast to completions."""
        r = self.rewards.view(-1, self.group_size)
        mean = r.mean(dim=1)
        std = r.std(dim=1) if self.group_size > 1 else torch.zeros_like(mean)
        g = self.group_size
        return mean.repeat_interleave(g), std.repeat_interleave(g)


class RolloutEngine:
    def __init__(self, policy, cfg, rewards: list[tuple[str, Any, float]]):
        """``cfg`` is an OnlineAlgorithmConfig; ``rewards`` (name, fn, weight) triples."""
        if cfg.num_generations < 2:
            raise GymError(
                f"algorithm.num_generations={cfg.num_generations}: group methods need at "
                "least 2 completions per prompt to compare them"
            )
        self.policy, self.cfg, self.rewards = policy, cfg, rewards

    @torch.no_grad()
    def generate(self, examples: list[dict[str, Any]], seeds: list[int] | None = None) -> Rollout:
        """G completions for each example; ``seeds`` (one per example, e.g. derived from
        its position in the data stream) fix each completion's sampling noise."""
        cfg, g = self.cfg, self.cfg.num_generations
        out = self.policy.sample(
            [ex["prompt"] for ex in examples], num_samples=g,
            max_new_tokens=cfg.max_completion_length, max_prompt_length=cfg.max_prompt_length,
            sampling=Sampling(True, cfg.temperature, cfg.top_p, cfg.top_k),
            row_seeds=None if seeds is None else [s * 1009 + i for s in seeds for i in range(g)],
            with_logprobs=True,
        )
        completions = out.texts
        rows = [ex for ex in examples for _ in range(g)]
        prompts = [ex["prompt"] for ex in rows]
        total = torch.zeros(len(rows))
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
        )


def rollout_metrics(rollout: Rollout) -> dict[str, float]:
    _, std = rollout.group_stats()
    lengths = rollout.completion_mask.sum(dim=1).float()
    return {
        "reward_mean": rollout.rewards.mean().item(),
        "reward_std": rollout.rewards.std().item() if len(rollout) > 1 else 0.0,
        "frac_reward_zero_std": (std.view(-1, rollout.group_size)[:, 0] == 0).float().mean().item(),
        "completion_length": lengths.mean().item(),
        "truncated_fraction": rollout.truncated.float().mean().item(),
        "prompts_cut": float(rollout.prompts_cut),
        **rollout.reward_metrics,
    }
