"""Held-out evaluation: greedy answers to the task's test prompts, scored by its metric."""

from __future__ import annotations

import torch

from gym_core.data import render_prompts
from gym_core.distributed import Dist
from gym_core.generation import Sampling, generate


@torch.no_grad()
def evaluate(model, tokenizer, examples, metric_fn, *, system_prompt=None, batch_size=64,
             max_new_tokens=32, desc="eval", dist: Dist | None = None) -> float:
    """Mean of ``metric_fn`` over greedy completions of ``examples`` (one KV-cached
    generation per batch of prompts). Under torchrun each rank scores every world-th
    example and the sums are all-reduced: every rank returns the same mean."""
    dist = dist or Dist()
    if not examples:
        return float("nan")
    total = len(examples)
    examples = examples[dist.rank :: dist.world]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        texts = render_prompts(tokenizer, [ex["prompt"] for ex in chunk], system_prompt)
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        ids = generate(
            model, enc.input_ids.to(device), enc.attention_mask.to(device), num_samples=1,
            max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, sampling=Sampling(do_sample=False),
        )
        completions = tokenizer.batch_decode(ids, skip_special_tokens=True)
        scores.extend(metric_fn([ex["prompt"] for ex in chunk], completions, chunk))
    model.train(was_training)
    return dist.all_reduce_sum([sum(scores)])[0] / total
