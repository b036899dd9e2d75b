"""Batches of given completions (preference pairs, labelled answers) in the same layout
as rollouts: distinct prompts [B, P] left-padded, their completions [B * G, C]
right-padded with G contiguous rows per prompt, so every method scores them through
``policy.logprobs`` (each prompt run once). Built by ``policy.encode``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from gym_core.data import render_completion, render_prompts


@dataclass
class CompletionBatch:
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    group_size: int
    examples: list[dict[str, Any]]  # one per prompt
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.completion_ids.shape[0]


def encode_completions(
    tokenizer,
    prompts: list[Any],
    completions: list[list[Any]],
    *,
    system_prompt: str | None,
    max_prompt_length: int,
    max_completion_length: int,
    device: torch.device,
    examples: list[dict[str, Any]] | None = None,
) -> CompletionBatch:
    """Tokenise prompts (rendered with the chat template; over-long ones keep their end)
    and, for each, the same number G of completions (cut at ``max_completion_length``)."""
    g = len(completions[0])
    if any(len(c) != g for c in completions):
        raise ValueError("every prompt needs the same number of completions")
    texts = render_prompts(tokenizer, prompts, system_prompt)
    ids = [tokenizer(t, add_special_tokens=False).input_ids[-max_prompt_length:] for t in texts]
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    prompt_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    prompt_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        prompt_ids[i, width - len(x):] = torch.tensor(x)
        prompt_mask[i, width - len(x):] = 1
    rows = []
    for prompt, group in zip(prompts, completions):
        for c in group:
            text = render_completion(tokenizer, prompt, c, system_prompt)
            rows.append(tokenizer(text, add_special_tokens=False).input_ids[:max_completion_length])
    width = max(max(len(r) for r in rows), 1)
    completion_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        completion_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        completion_mask[i, : len(r)] = 1
    return CompletionBatch(prompt_ids.to(device), prompt_mask.to(device),
                           completion_ids.to(device), completion_mask.to(device), g,
                           list(examples) if examples is not None else [{} for _ in prompts])
