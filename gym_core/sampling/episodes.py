"""Multi-turn episodes in the sampler: G episodes of a prompt share its prefill, and
after each model turn the environment's reply is appended as token ids while generation
continues from the KV cache; the history is never re-tokenised.

Rows move in lock-step, one position per decode step, on the sampler's decoder
(:func:`gym_core.sampling.fused.build_decoder`: gym's decode engine, or the model's own
forward for a model outside its table; one loop drives either): a row in a model turn feeds the
token it sampled; a row whose environment has replied feeds that reply's tokens one by
one (forced; their logits are not sampled from). The tokens recorded for training are
the tokens fed, so what is trained on is exactly what the model sampled and saw, and
``action_mask`` marks the sampled ones (environment tokens: 0, out of the loss; the
attention still sees them).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from gym_core.env.episode import Episode, EpisodeRecord
from gym_core.sampling.fused import build_decoder
from gym_core.sampling.generation import Sampling, draw, row_generators


@dataclass
class EpisodeSamples:
    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor  # [N, C]: each episode's tokens after the prompt
    completion_mask: torch.Tensor  # 1 on every episode token (model's and environment's)
    action_mask: torch.Tensor  # 1 on the tokens the model sampled
    turn_index: torch.Tensor  # [N, C] the model turn each token follows (-1: padding)
    logprobs: torch.Tensor  # [N, C] the sampler's log-prob of each sampled token, else 0
    truncated: torch.Tensor  # [N] bool: ended by a limit
    records: list[EpisodeRecord]
    prompts_cut: int = 0


@torch.no_grad()
def sample_episodes(model, tokenizer, env_cls, env_cfg, rows: list[dict], *,
                    num_samples: int, sampling: Sampling, row_seeds: list[int] | None = None,
                    system_prompt: str | None = None, max_prompt_length: int | None = None,
                    fused: bool | None = None) -> EpisodeSamples:
    """``num_samples`` episodes of each row, up to ``env_cfg.max_tokens`` tokens each."""
    g = num_samples
    episodes = [Episode(env_cls, env_cfg, row, tokenizer, system_prompt)
                for row in rows for _ in range(g)]
    starts = [e.start() for e in episodes]
    prompt_texts, cut = [], 0
    for b, row in enumerate(rows):
        group = starts[b * g:(b + 1) * g]
        text = next((t for t in group if t is not None), None)
        if text is None:  # every reset failed: the rows are empty, the prompt is the row's
            from gym_core.data.tasks import render_prompts

            text = render_prompts(tokenizer, [row.get("prompt", "")], system_prompt)[0]
        for i, t in enumerate(group):
            if t is not None and t != text:
                episodes[b * g + i].fail(
                    f"env={env_cfg.name}: reset gave another prompt than the group's first "
                    "episode for the same row (episodes of a row must start alike)")
        prompt_texts.append(text)
    ids = tokenizer(prompt_texts, add_special_tokens=False).input_ids
    if max_prompt_length is not None:
        cut = sum(len(x) > max_prompt_length for x in ids)
        ids = [x[-max_prompt_length:] for x in ids]
    width = max(len(x) for x in ids)
    device = next(model.parameters()).device
    prompt_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        prompt_ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
        prompt_mask[i, width - len(x):] = 1
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    was_training = model.training
    model.eval()
    try:
        out = _decode(model, tokenizer, episodes, prompt_ids, prompt_mask, g,
                      int(env_cfg.max_tokens), sampling, row_seeds, fused)
    finally:
        model.train(was_training)
        for e in episodes:
            e.close()
    tokens, lengths, action, turn, logps = out
    # as wide as the longest episode, not the token budget: the training pass runs on
    # every column (a budget of 192 with episodes of ~50 tokens cost 4x its memory)
    cw = max(1, max(lengths, default=0))
    tokens, action, turn, logps = (t[:, :cw] for t in (tokens, action, turn, logps))
    positions = torch.arange(cw).unsqueeze(0)
    mask = (positions < torch.tensor(lengths).unsqueeze(1)).long()
    tokens = tokens.masked_fill(mask == 0, tokenizer.pad_token_id)
    truncated = torch.tensor([e.record.truncated for e in episodes], dtype=torch.bool)
    return EpisodeSamples(prompt_ids, prompt_mask, tokens.to(device), mask.to(device),
                          (action * mask).to(device), turn.masked_fill(mask == 0, -1).to(device),
                          (logps * action * mask).to(device), truncated.to(device),
                          [e.record for e in episodes], cut)


def _decode(model, tokenizer, episodes: list[Episode], prompt_ids, prompt_mask, g: int,
            max_tokens: int, sampling: Sampling, row_seeds, fused):
    n = len(episodes)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    total = prompt_ids.shape[1] + max_tokens
    decoder = build_decoder(model, total, fused=fused if max_tokens > 1 else False)
    decoder.rotary(total, prompt_ids.device)
    logits = decoder.prefill(prompt_ids, prompt_mask, g, max_tokens)
    if g > 1:
        logits = logits.repeat_interleave(g, dim=0)
    generators = None
    if row_seeds is not None and sampling.do_sample:
        if len(row_seeds) != n:
            raise ValueError(f"{len(row_seeds)} row seeds for {n} rows")
        generators = row_generators(row_seeds)
    tokens = torch.full((n, max_tokens), pad, dtype=torch.long)
    action = torch.zeros(n, max_tokens, dtype=torch.long)
    turn = torch.zeros(n, max_tokens, dtype=torch.long)
    logps = torch.zeros(n, max_tokens)
    lengths = [0] * n
    queues = [deque() for _ in range(n)]
    turn_ids: list[list[int]] = [[] for _ in range(n)]
    turns = [0] * n
    alive = [not e.over for e in episodes]
    rows = list(range(n))  # the output row of each batch row (the batch compacts)
    decoder.pack(n)
    for step in range(max_tokens):
        live = [i for i, r in enumerate(rows) if alive[r]]
        if not live:
            break
        index = torch.tensor(live, device=logits.device)
        every = len(live) == len(rows)
        lg = logits if every else logits.index_select(0, index)
        gens = None if generators is None else [generators[rows[i]] for i in live]
        tok, lp = draw(lg, sampling, gens)
        fed = torch.full((len(rows),), pad, dtype=torch.long)
        for k, i in enumerate(live):
            r = rows[i]
            if queues[r]:  # the environment's reply, token by token
                t = queues[r].popleft()
            else:
                t = int(tok[k])
                action[r, step] = 1
                logps[r, step] = float(lp[k])
                turn_ids[r].append(t)
            tokens[r, step] = t
            turn[r, step] = turns[r]
            fed[i] = t
            lengths[r] = step + 1
            budget = max_tokens - step - 1
            if action[r, step] and (t == eos or budget == 0):
                finished = t == eos
                add = episodes[r].after_turn(turn_ids[r], finished, budget)
                turn_ids[r] = []
                turns[r] += 1
                if add is None:
                    alive[r] = False
                else:
                    queues[r].extend(add)
        if step + 1 == max_tokens or not any(alive[r] for r in rows):
            break
        fed = fed.to(logits.device)
        still = [i for i, r in enumerate(rows) if alive[r]]
        if len(still) < len(rows) and len(still) <= len(rows) * decoder.compact_at:
            keep = torch.tensor(still, device=logits.device)
            decoder.keep_rows(keep)
            rows = [rows[i] for i in still]
            fed = fed.index_select(0, keep)
        logits = decoder.step(fed, prompt_ids.shape[1] + step)
    for r in range(n):  # the budget ran out mid-reply or mid-turn
        if alive[r]:
            episodes[r].record.truncated = True
            if turn_ids[r]:
                episodes[r].record.turns += 1
    return tokens, lengths, action, turn, logps
