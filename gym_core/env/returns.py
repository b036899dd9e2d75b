"""Turn-level rewards and returns of multi-turn episodes (docs/agents.md, "Rewards").

An episode of K model turns has rewards r_0..r_{K-1} (``step``'s reward after each
turn). Its return from turn k is G_k = sum_{j >= k} gamma^(j - k) r_j; the episode's
return G_0 is the rollout's reward (what group baselines compare). Group methods give a
token of turn k the advantage A_i + (G_k - G_0) (the episode's advantage, computed with
the episode-level baseline, shifted by what turn k's return differs from the episode's);
PPO places r_k on turn k's last sampled token and runs GAE over the sampled tokens.
"""

from __future__ import annotations

import torch


def discounted_returns(rewards: list[float], gamma: float) -> list[float]:
    """[G_0, ..., G_{K-1}] of per-turn rewards."""
    out, running = [0.0] * len(rewards), 0.0
    for k in reversed(range(len(rewards))):
        running = rewards[k] + gamma * running
        out[k] = running
    return out


def token_returns(turn_index: torch.Tensor, action_mask: torch.Tensor,
                  rewards: list[list[float]], gamma: float) -> torch.Tensor:
    """[N, C]: each sampled token's G_k (k its turn), 0 elsewhere."""
    out = torch.zeros(turn_index.shape, dtype=torch.float32)
    for i, r in enumerate(rewards):
        if not r:
            continue
        g = torch.tensor(discounted_returns(r, gamma), dtype=torch.float32)
        k = turn_index[i].cpu().clamp(min=0, max=len(r) - 1)
        out[i] = g[k]
    return out.to(action_mask.device) * action_mask.float()


def turn_end_rewards(turn_index: torch.Tensor, action_mask: torch.Tensor,
                     rewards: list[list[float]]) -> torch.Tensor:
    """[N, C]: r_k on the last sampled token of turn k, 0 elsewhere (PPO's per-token
    rewards; a turn the budget cut gets no reward of its own)."""
    out = torch.zeros(turn_index.shape, dtype=torch.float32)
    act = action_mask.cpu().bool()
    idx = turn_index.cpu()
    for i, r in enumerate(rewards):
        for k, value in enumerate(r):
            pos = (act[i] & (idx[i] == k)).nonzero()
            if len(pos):
                out[i, int(pos[-1])] += float(value)
    return out.to(action_mask.device)
