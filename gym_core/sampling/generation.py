"""Batched, KV-cached generation that runs each prompt once.

Group methods sample G completions per prompt. ``model.generate(num_return_sequences=G)``
copies every prompt G times before the prefill, so the prompt is computed G times;
here each distinct prompt is prefilled once and its KV cache repeated G times, then all
B*G rows decode together. The same sharing applies when training
(:func:`gym_core.train.losses.completion_logprobs`). One loop drives the decoder
:func:`gym_core.sampling.fused.build_decoder` picks: gym's decode engine for the
architectures of its table, the model's own forward (one fallback) for any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gym_core.data.tasks import render_prompts


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
    """Greedy, or a draw from softmax(warped logits): :func:`draw` without the log-probs."""
    return draw(logits, s, generators, with_logprobs=False)[0]


def draw(logits: torch.Tensor, s: Sampling, generators=None, *, with_logprobs: bool = True):
    """(tokens [n], log-probs [n] or None): greedy, or a draw from softmax(warped logits),
    and each token's log-prob on the trainer's definition (log softmax(logits /
    temperature), the whole vocabulary, no top-k / top-p: docs/algorithms.md §0.2).

    With one generator per row the draw is by inverse CDF: one float64 uniform u from the
    row's generator, and the token where the row's cumulative probability (summed in
    float64) first exceeds u x the total, an exact sample of the same distribution that
    uses only that row's generator, so a row's tokens do not depend on which other rows
    share the batch: 1 process and N data-parallel processes, or a run and its
    resumption, sample the same completions. gym_core/sampling/decode.cpp draws the token and its
    log-prob in one pass over the logits."""
    filtered = bool(s.top_k) or s.top_p < 1.0
    if not s.do_sample:
        tok = logits.argmax(dim=-1)
    elif generators is None:
        warped = warp_logits(logits.float(), s) if filtered or s.temperature != 1.0 \
            else logits.float()
        tok = torch.multinomial(warped.softmax(dim=-1), 1).squeeze(-1)
    else:
        from gym_core.sampling.fused import TorchOps, kernels

        ops = kernels() if logits.device.type == "cpu" else TorchOps
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
        u = u.to(logits.device)
        if not filtered:  # the token and its log-prob in one pass
            return ops.draw(logits.float().contiguous(), u, float(s.temperature))
        tok, _ = ops.draw(warp_logits(logits.float(), s).contiguous(), u, 1.0)
    return tok, (_chosen_logprobs(logits, tok, s.temperature) if with_logprobs else None)


def row_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(seed) % (2**63 - 1)) for seed in seeds]


def _chosen_logprobs(logits: torch.Tensor, tok: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature)[tok] in float32: the sampler's log-prob of each
    drawn token, on the trainer's definition (tempered logits, the whole vocabulary, no
    top-k / top-p: docs/algorithms.md §0.2)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, tok.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


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
    fused: bool | None = None,
    with_logprobs: bool = False,
    logits_mask=None,
    stop_fn=None,
):
    """Completions [B * num_samples, T <= max_new_tokens] for left-padded prompts [B, P];
    rows of one prompt are contiguous. Positions after a row's EOS hold ``pad_token_id``.
    ``row_seeds`` (one per output row) make each row's sampling independent of the batch.

    Each prompt is prefilled once and its KV cache shared by its rows; prefill and decode
    steps run on the decoder :func:`gym_core.sampling.fused.build_decoder` picks:
    :class:`~gym_core.sampling.fused.FusedDecoder` (adapters merged, a preallocated cache,
    finished rows out of the batch) when the architecture is in its table, else
    :class:`~gym_core.sampling.fused.OwnForward`, the model's own forward (each prompt's
    cache repeated for its rows; a warning says so once). One loop drives either.
    ``fused``: True forces the engine (an error for an unsupported model), False the
    model's own forward (the engine's reference), None picks.
    ``with_logprobs``: also return the sampler's log-prob of each drawn token [N, T]
    (0 after a row's end), for the trainer's mismatch correction (docs/algorithms.md §3).
    ``logits_mask``: per-row constrained decoding, an object with ``apply(rows, logits)
    -> logits`` (forbidden tokens at -inf for the output rows ``rows``) and
    ``advance(rows, tokens)``, e.g. :class:`gym_core.sampling.structured.JsonConstraint`.
    ``stop_fn(rows, tokens)``: called after each step with the output rows still running
    [m] and the tokens so far [N, width]; rows it returns True for [m] end there, as at
    EOS (stop strings: an evaluation's ``until``).
    """
    from gym_core.sampling.fused import build_decoder

    total = prompt_ids.shape[1] + max_new_tokens
    # one token: no decode step, so the engine's merge and packing would cost more than
    # they save
    decoder = build_decoder(model, total, fused=fused if max_new_tokens > 1 else False)
    decoder.rotary(total, prompt_ids.device)
    logits = decoder.prefill(prompt_ids, prompt_mask, num_samples, max_new_tokens)
    if num_samples > 1:
        logits = logits.repeat_interleave(num_samples, dim=0)
    n = logits.shape[0]
    generators = None
    if row_seeds is not None and sampling.do_sample:
        if len(row_seeds) != n:
            raise ValueError(f"{len(row_seeds)} row seeds for {n} rows")
        generators = row_generators(row_seeds)
    tokens = torch.full((n, max_new_tokens), pad_token_id, dtype=torch.long,
                        device=logits.device)
    logps = torch.zeros(n, max_new_tokens, device=logits.device) if with_logprobs else None
    return _decode(decoder, logits, prompt_ids.shape[1], tokens, logps, sampling, generators,
                   eos_token_id, logits_mask, stop_fn)


def _decode(decoder, logits, prompt_len, tokens, logps, sampling, generators,
            eos_token_id, logits_mask=None, stop_fn=None):
    """The decode loop, on either decoder of :func:`gym_core.sampling.fused.build_decoder`.
    Only running rows are sampled; a finished row is fed its EOS until the decoder's
    ``compact_at`` share of the rows or fewer still runs, then the finished rows leave
    the batch (:meth:`~gym_core.sampling.fused.FusedDecoder.keep_rows`)."""
    n, width = logits.shape[0], 0
    rows = torch.arange(n, device=logits.device)  # the output row of each batch row
    alive = torch.ones(n, dtype=torch.bool, device=logits.device)
    fed = torch.empty(n, dtype=torch.long, device=logits.device)
    decoder.pack(n)
    for step in range(tokens.shape[1]):
        every = bool(alive.all())
        act = None if every else alive.nonzero().squeeze(1)
        lg = logits if every else logits.index_select(0, act)
        gens = generators if every or generators is None else [generators[i] for i in act.tolist()]
        out_rows = rows if every else rows[act]
        if logits_mask is not None:
            lg = logits_mask.apply(out_rows.cpu(), lg)
        tok, lp = draw(lg, sampling, gens, with_logprobs=logps is not None)
        if logits_mask is not None:
            logits_mask.advance(out_rows.cpu(), tok.cpu())
        tokens[out_rows, step] = tok
        if logps is not None:
            logps[out_rows, step] = lp
        width = step + 1
        if every:
            fed = tok
            alive = tok != eos_token_id
        else:
            fed[act] = tok
            alive[act] = tok != eos_token_id
        if stop_fn is not None:
            running = alive.nonzero().squeeze(1)
            if running.numel():
                alive[running] = ~stop_fn(rows[running], tokens[:, :width])
        live = int(alive.sum())
        if step + 1 == tokens.shape[1] or live == 0:
            break
        if live < alive.numel() and live <= alive.numel() * decoder.compact_at:
            keep = alive.nonzero().squeeze(1)  # enough rows finished: the rest move up
            rows, fed, alive = rows[keep], fed[keep], alive[keep]
            if generators is not None:
                generators = [generators[i] for i in keep.tolist()]
            decoder.keep_rows(keep)
        logits = decoder.step(fed, prompt_len + step)
    ids = tokens[:, :width]
    if logps is not None:
        return ids, logps[:, :width]
    return ids


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
    # [B * num_samples, C] the sampler's log-prob of each token (0 on padding), when asked
    logprobs: torch.Tensor | None = None


_warned_cut: set[int] = set()  # the limits a prompt-cut warning was printed for


@torch.no_grad()
def sample(model, tokenizer, prompts: list[Any], *, system_prompt: str | None,
           max_new_tokens: int, sampling: Sampling, num_samples: int = 1,
           row_seeds: list[int] | None = None, max_prompt_length: int | None = None,
           with_logprobs: bool = False, logits_mask=None) -> Samples:
    """The one sampling path (rollouts, evaluation, a policy answering as a chat model):
    render the prompts (strings or chat messages) with the chat template, tokenize,
    generate with the KV cache (each prompt prefilled once for its ``num_samples`` rows),
    mask after the first EOS and decode. A prompt longer than ``max_prompt_length``
    tokens keeps its last ones, as offline batches do (:func:`gym_core.data.batching.
    encode_completions`): the end holds the question and the assistant turn's start; a
    warning says so the first time. ``with_logprobs``: also record the sampler's
    log-prob of each drawn token (:attr:`Samples.logprobs`). ``logits_mask``: constrained
    decoding per output row (:func:`generate`)."""
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
                from gym_core.base.errors import warn

                warn(f"{cut} of {len(ids)} prompts are longer than algorithm."
                     f"max_prompt_length={max_prompt_length} tokens (the longest: {longest}); "
                     "they keep their last tokens (the metric prompts_cut counts them; "
                     "raise the limit to keep them whole)")
    from gym_core.sampling.fused import left_padded

    prompt_ids, prompt_mask = left_padded(ids, tokenizer.pad_token_id,
                                          next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        ids = generate(model, prompt_ids, prompt_mask, num_samples=num_samples,
                       max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, sampling=sampling,
                       row_seeds=row_seeds, with_logprobs=with_logprobs,
                       logits_mask=logits_mask)
    finally:
        model.train(was_training)
    logprobs = None
    if with_logprobs:
        ids, logprobs = ids
    mask, truncated = completion_masks(ids, tokenizer.eos_token_id)
    ids = ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    if logprobs is not None:
        logprobs = logprobs.masked_fill(mask == 0, 0.0)
    return Samples(prompt_ids, prompt_mask, ids, mask, truncated,
                   tokenizer.batch_decode(ids, skip_special_tokens=True), cut, logprobs)
