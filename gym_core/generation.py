"""Batched, KV-cached generation that runs each prompt once.

Group methods sample G completions per prompt. ``model.generate(num_return_sequences=G)``
copies every prompt G times before the prefill, so the prompt is computed G times;
here each distinct prompt is prefilled once and its KV cache repeated G times, then all
B*G rows decode together. The same sharing applies when training
(:func:`gym_core.losses.completion_logprobs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gym_core.data import render_prompts


@dataclass
class Sampling:
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off


def warp_logits(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering, as transformers orders them."""
    logits = logits / s.temperature
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already cover top_p (keeps >= 1)
        drop = probs.cumsum(dim=-1) - probs > s.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def next_tokens(logits: torch.Tensor, s: Sampling, generators=None) -> torch.Tensor:
    """Greedy, or a draw from softmax(warped logits). With one generator per row the draw
    is Gumbel-max (argmax of logits + Gumbel noise, an exact sample of the same
    distribution) using only that row's generator, so a row's tokens do not depend on
    which other rows share the batch: 1 process and N data-parallel processes, or a run
    and its resumption, sample the same completions."""
    if not s.do_sample:
        return logits.argmax(dim=-1)
    warped = warp_logits(logits.float(), s)
    if generators is None:
        return torch.multinomial(warped.softmax(dim=-1), 1).squeeze(-1)
    vocab = warped.shape[-1]
    u = torch.stack([torch.rand(vocab, generator=g) for g in generators]).to(warped.device)
    return (warped - torch.log(-torch.log(u))).argmax(dim=-1)


def row_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(seed) % (2**63 - 1)) for seed in seeds]


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    num_samples: int,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    sampling: Sampling,
    row_seeds: list[int] | None = None,
) -> torch.Tensor:
    """Completions [B * num_samples, T <= max_new_tokens] for left-padded prompts [B, P];
    rows of one prompt are contiguous. Positions after a row's EOS hold ``pad_token_id``.
    ``row_seeds`` (one per output row) make each row's sampling independent of the batch."""
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True,
                logits_to_keep=1)
    cache = out.past_key_values
    logits = out.logits[:, -1]
    mask = prompt_mask
    if num_samples > 1:
        cache.batch_repeat_interleave(num_samples)
        logits = logits.repeat_interleave(num_samples, dim=0)
        mask = mask.repeat_interleave(num_samples, dim=0)
    n = logits.shape[0]
    generators = None
    if row_seeds is not None and sampling.do_sample:
        if len(row_seeds) != n:
            raise ValueError(f"{len(row_seeds)} row seeds for {n} rows")
        generators = row_generators(row_seeds)
    done = torch.zeros(n, dtype=torch.bool, device=logits.device)
    ones = torch.ones(n, 1, dtype=mask.dtype, device=mask.device)
    tokens = []
    for step in range(max_new_tokens):
        tok = next_tokens(logits, sampling, generators)
        tok = torch.where(done, torch.full_like(tok, pad_token_id), tok)
        tokens.append(tok)
        done |= tok == eos_token_id
        if step + 1 == max_new_tokens or bool(done.all()):
            break
        mask = torch.cat([mask, ones], dim=1)
        out = model(input_ids=tok.unsqueeze(1), attention_mask=mask, past_key_values=cache,
                    use_cache=True)
        logits = out.logits[:, -1]
    return torch.stack(tokens, dim=1)


def completion_masks(ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of the tokens up to and including the first EOS, and which rows never end."""
    is_eos = ids == eos_id
    has_eos = is_eos.any(dim=1)
    first = torch.where(has_eos, is_eos.int().argmax(dim=1), ids.shape[1])
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    mask = (positions <= first.unsqueeze(1)).long()
    return mask, ~has_eos


@dataclass
class Samples:
    """What :func:`sample` returns: the prompts as encoded and the completions."""

    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor  # [B * num_samples, C] padded after the first EOS
    completion_mask: torch.Tensor  # 1 up to and including the first EOS
    truncated: torch.Tensor  # [B * num_samples] bool: no EOS within max_new_tokens
    texts: list[str]  # decoded completions, special tokens dropped
    prompts_cut: int = 0  # prompts longer than max_prompt_length (they kept their end)


_warned_cut: set[int] = set()  # the limits a prompt-cut warning was printed for


@torch.no_grad()
def sample(model, tokenizer, prompts: list[Any], *, system_prompt: str | None,
           max_new_tokens: int, sampling: Sampling, num_samples: int = 1,
           row_seeds: list[int] | None = None, max_prompt_length: int | None = None
           ) -> Samples:
    """The one sampling path (rollouts, evaluation, a policy answering as a chat model):
    render the prompts (strings or chat messages) with the chat template, tokenize,
    generate with the KV cache (each prompt prefilled once for its ``num_samples`` rows),
    mask after the first EOS and decode. A prompt longer than ``max_prompt_length``
    tokens keeps its last ones, as offline batches do (:func:`gym_core.batching.
    encode_completions`): the end holds the question and the assistant turn's start; a
    warning says so the first time."""
    texts = render_prompts(tokenizer, prompts, system_prompt)
    ids = tokenizer(texts, add_special_tokens=False).input_ids
    cut = 0
    if max_prompt_length is not None:
        cut = sum(len(x) > max_prompt_length for x in ids)
        if cut:
            longest = max(len(x) for x in ids)
            ids = [x[-max_prompt_length:] for x in ids]
            if max_prompt_length not in _warned_cut:
                _warned_cut.add(max_prompt_length)
                from gym_core.errors import warn

                warn(f"{cut} of {len(ids)} prompts are longer than algorithm."
                     f"max_prompt_length={max_prompt_length} tokens (the longest: {longest}); "
                     "they keep their last tokens (the metric prompts_cut counts them; "
                     "raise the limit to keep them whole)")
    width = max(len(x) for x in ids)
    prompt_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):  # left-padded, so every prompt ends where generation starts
        prompt_ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
        prompt_mask[i, width - len(x):] = 1
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    was_training = model.training
    model.eval()
    try:
        ids = generate(model, prompt_ids, prompt_mask, num_samples=num_samples,
                       max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, sampling=sampling,
                       row_seeds=row_seeds)
    finally:
        model.train(was_training)
    mask, truncated = completion_masks(ids, tokenizer.eos_token_id)
    ids = ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    return Samples(prompt_ids, prompt_mask, ids, mask, truncated,
                   tokenizer.batch_decode(ids, skip_special_tokens=True), cut)
