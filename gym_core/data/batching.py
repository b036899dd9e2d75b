"""Batches of given completions (preference pairs, labelled answers) in the same layout
as rollouts: distinct prompts [B, P] left-padded, their completions [B * G, C]
right-padded with G contiguous rows per prompt, so every method scores them through
``policy.logprobs`` (each prompt run once). Built by ``policy.encode``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from gym_core.data.tasks import render_completion, render_prompts


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


@dataclass
class SequenceBatch:
    """Whole sequences (prompt and answer in one row, a conversation, a plain text), with
    the tokens a loss trains on marked: what supervised methods score when they need more
    than a completion's log-probs (the prompt's tokens, several assistant turns).

    Rows are right-padded, one sequence each, or several sequences *packed* into one
    row. ``position_ids`` restart at 0 for every sequence (and for every run of padding),
    which is how transformers recognises packed sequences: attention never crosses from
    one sequence to another (docs/algorithms.md §7.3). ``segment`` says which sequence
    (index into ``examples``) each token belongs to, -1 on padding. ``target_mask`` is 1
    on the tokens a loss counts (never a sequence's first token: nothing predicts it).
    ``shared_prefix``: unpacked rows that all begin with the same untrained tokens (a
    chat template's system prompt) share that many; they are run once for all rows."""

    input_ids: torch.Tensor  # [R, L]
    position_ids: torch.Tensor  # [R, L]
    target_mask: torch.Tensor  # [R, L], long
    segment: torch.Tensor  # [R, L], long; -1 on padding
    examples: list[dict[str, Any]]  # one per sequence
    shared_prefix: int = 0
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    def per_sequence(self, values: torch.Tensor) -> torch.Tensor:
        """Sums of ``values`` [R, L] over each sequence's target tokens: [len(self)]."""
        keep = self.target_mask.bool()
        out = values.new_zeros(len(self))
        return out.index_add(0, self.segment[keep], values[keep])


def tokenize_segments(tokenizer, segments: list[tuple[str, bool]], max_length: int
                      ) -> tuple[list[int], list[bool]]:
    """One sequence's tokens and which of them a loss trains on, from text segments
    ``(text, trained)``. Adjacent segments with the same flag are tokenised together (a
    prompt is tokenised exactly as :func:`encode_completions` tokenises it); the sequence
    is cut to its first ``max_length`` tokens."""
    ids: list[int] = []
    trained: list[bool] = []
    merged: list[list] = []
    for text, flag in segments:
        if merged and merged[-1][1] == flag:
            merged[-1][0] += text
        elif text:
            merged.append([text, flag])
    for text, flag in merged:
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids += piece
        trained += [flag] * len(piece)
    ids, trained = ids[:max_length], trained[:max_length]
    if trained:
        trained[0] = False  # the first token has no context to be predicted from
    return ids, trained


def encode_sequences(
    tokenizer,
    rows: list[list[tuple[str, bool]]],
    *,
    max_length: int,
    packing: bool = False,
    device: torch.device,
    examples: list[dict[str, Any]] | None = None,
) -> SequenceBatch:
    """Tokenise each row's segments (:func:`tokenize_segments`) into a
    :class:`SequenceBatch`. Unpacked, each sequence gets a row, and the untrained tokens
    all rows begin with are marked as their shared prefix. Packed, sequences are placed
    best-fit-decreasing into as few rows of at most ``max_length`` tokens as hold them;
    the loss over the batch is the same either way, only the layout differs."""
    seqs = [tokenize_segments(tokenizer, segs, max_length) for segs in rows]
    if any(not ids for ids, _ in seqs):
        raise ValueError("a sequence has no tokens")
    shared = 0
    if packing:
        layout = _best_fit_decreasing([len(ids) for ids, _ in seqs], max_length)
    else:
        layout = [[i] for i in range(len(seqs))]
        if len(seqs) > 1:
            shared = _shared_untrained_prefix(seqs)
    width = max(sum(len(seqs[i][0]) for i in members) for members in layout)
    shape = (len(layout), width)
    input_ids = torch.full(shape, tokenizer.pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    target_mask = torch.zeros(shape, dtype=torch.long)
    segment = torch.full(shape, -1, dtype=torch.long)
    for r, members in enumerate(layout):
        t = 0
        for i in members:
            ids, trained = seqs[i]
            n = len(ids)
            input_ids[r, t:t + n] = torch.tensor(ids)
            position_ids[r, t:t + n] = torch.arange(n)
            target_mask[r, t:t + n] = torch.tensor(trained, dtype=torch.long)
            segment[r, t:t + n] = i
            t += n
        position_ids[r, t:] = torch.arange(width - t)  # trailing padding
    return SequenceBatch(input_ids.to(device), position_ids.to(device), target_mask.to(device),
                         segment.to(device),
                         list(examples) if examples is not None else [{} for _ in rows],
                         shared_prefix=shared)


def _shared_untrained_prefix(seqs: list[tuple[list[int], list[bool]]]) -> int:
    """How many leading tokens every sequence has in common, none of them trained, and
    at least one token short of the shortest (its rest must predict something)."""
    limit = min(len(ids) for ids, _ in seqs) - 1
    first_ids = seqs[0][0]
    n = 0
    while (n < limit and not any(trained[n] for _, trained in seqs)
           and all(ids[n] == first_ids[n] for ids, _ in seqs)):
        n += 1
    return n


def _best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of sequence indices, each summing to at most ``capacity`` tokens: longest
    first, each into the fullest bin it still fits (TRL's "bfd" strategy)."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [b for b in range(len(bins)) if free[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: free[b])
            bins[b].append(i)
            free[b] -= lengths[i]
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return bins
