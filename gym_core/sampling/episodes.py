"""Multi-turn episodes in the sampler: G episodes of a prompt share its prefill, and
after each model turn the environment's reply is appended as token ids while generation
continues from the KV cache; the history is never re-tokenised.

Each episode is a row of the decoder's rows API (:meth:`~gym_core.sampling.fused.
FusedDecoder.join` / ``extend`` / ``advance`` / ``leave``, on gym's decode engine or on the
model's own forward for a model outside its table: one loop drives either), each at its
own length: the G rows of a prompt are filled from its one prefill; each step every row
samples a token; a row whose turn ended gets that token and the environment's reply but
its last token in one pass (``extend``: forced, no logits sampled from), and the reply's
last token is fed with the next step, whose logits start the model's next turn; a
finished row leaves. The tokens recorded for training are the tokens fed, so what is
trained on is exactly what the model sampled and saw, and ``action_mask`` marks the
sampled ones (environment tokens: 0, out of the loss; the attention still sees them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gym_core.env.episode import Episode, EpisodeRecord
from gym_core.sampling.fused import build_decoder, left_padded
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
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = left_padded(ids, tokenizer.pad_token_id, device)
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
    decoder.open_rows(n, total)
    prompts = [ids[m.bool()].tolist() for ids, m in zip(prompt_ids, prompt_mask)]
    logits = decoder.join(prompts, [None] * len(prompts), copies=g)  # row i: episode i
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
    turn_ids: list[list[int]] = [[] for _ in range(n)]
    turns = [0] * n
    truncated = [False] * n
    at = list(range(n))  # the episode in each decoder row

    def drop(slots: list[int]) -> None:
        """Rows ``slots`` leave (highest first; the decoder's last row, and its logits,
        move into each place)."""
        nonlocal logits
        for slot in sorted(slots, reverse=True):
            if slot != len(at) - 1:
                logits[slot] = logits[len(at) - 1]
            logits = logits[: len(at) - 1]
            decoder.leave(slot)
            last = at.pop()
            if slot < len(at):
                at[slot] = last

    drop([i for i in range(n) if episodes[i].over])
    while at:
        gens = None if generators is None else [generators[r] for r in at]
        tok, lp = draw(logits, sampling, gens)
        feed, chunks, done = {}, {}, []  # feed: each episode's next token
        for slot, r in enumerate(at):
            t = int(tok[slot])
            step = lengths[r]
            tokens[r, step], action[r, step], turn[r, step] = t, 1, turns[r]
            logps[r, step] = float(lp[slot])
            turn_ids[r].append(t)
            lengths[r] = step + 1
            budget = max_tokens - lengths[r]
            feed[r] = t
            if t != eos and budget > 0:
                continue
            add = episodes[r].after_turn(turn_ids[r], t == eos, budget)
            turn_ids[r] = []
            turns[r] += 1
            if add is None:
                done.append(slot)
                continue
            # the environment's reply, as token ids after the model's turn; what does not
            # fit the budget is cut and the episode ends there
            reply = list(add)[:budget]
            for k, x in enumerate(reply):
                tokens[r, lengths[r] + k], turn[r, lengths[r] + k] = x, turns[r]
            lengths[r] += len(reply)
            if len(add) >= budget:
                truncated[r] = True
                done.append(slot)
            elif reply:  # the turn's last token and the reply but its last in one pass;
                # that last token is fed with the next step
                chunks[slot] = [t] + reply[:-1]
                feed[r] = reply[-1]
        if chunks:
            decoder.extend(list(chunks), list(chunks.values()))
        drop(done)
        if not at:
            break
        logits = decoder.advance(torch.tensor([feed[r] for r in at], dtype=torch.long,
                                              device=logits.device), [None] * len(at))
    for r in range(n):
        if truncated[r]:
            episodes[r].record.truncated = True
    return tokens, lengths, action, turn, logps
