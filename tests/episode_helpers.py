"""Helpers of the environment adapter tests: episodes of the tiny random model."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from gym_core.sampling.generation import Sampling


def eos_biased(policy):
    """``policy`` with an LM head biased towards its end-of-turn token, so the tiny random
    model's turns end within a few tokens; returned for chaining."""
    hf = policy.model.get_base_model()
    head = torch.nn.Linear(hf.lm_head.in_features, hf.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(hf.lm_head.weight)
        head.bias.zero_()
        head.bias[policy.tokenizer.eos_token_id] = 2.5
    hf.lm_head = head
    return policy


def tiny_episodes(env_cls, cfg, rows, g=2):
    """G episodes of each row sampled by the tiny random model (its turns end within a
    few tokens: an LM-head bias towards its end-of-turn token)."""
    from gym_core.config.schema import ModelConfig
    from gym_core.model.policy import load_policy
    from gym_core.sampling.episodes import sample_episodes

    torch.manual_seed(0)
    p = eos_biased(load_policy(OmegaConf.structured(ModelConfig(source="tiny")),
                               torch.device("cpu")))
    return sample_episodes(p.model, p.tokenizer, env_cls, cfg, rows, num_samples=g,
                           sampling=Sampling(True, 1.0),
                           row_seeds=[10 * i + j for i in range(len(rows)) for j in range(g)])


def check_episodes(out, min_turns=1):
    for rec in out.records:
        assert rec.error is None, rec.error
        assert rec.turns >= min_turns
    assert (out.action_mask <= out.completion_mask).all()
    assert out.action_mask.sum() > 0
