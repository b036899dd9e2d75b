"""The token math every method shares: log-prob gathering, masking and loss
normalisation (docs/algorithms.md §1.4). Method formulas live in the plugins."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import get_args

import torch
import torch.distributed

from gym_core.base.errors import GymError
from gym_core.config.schema import TokenLoss
from gym_core.model.kv import cache_kw, cache_of

# Set while the DDP-wrapped scorer (gym_core.model.policy.LogprobScorer) runs: a log-prob pass
# with gradients anywhere else would skip DDP's gradient all-reduce.
_through_ddp = threading.local()

LOSS_TYPES = get_args(TokenLoss)  # the normalisers, declared in the schema


def selective_log_softmax(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[ids] without materialising the full log-softmax tensor."""
    picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def completion_logprobs(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    detached: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    temperature: float = 1.0,
    hidden: bool = False,
):
    """Per-token log-probs [N, C] of completions [N, C] given left-padded prompts [B, P],
    where N = B * G and the G completions of a prompt are contiguous rows.

    ``temperature``: log-probs of softmax(logits / temperature), the distribution an
    online method sampled from (docs/algorithms.md §0.2); 1 leaves the logits as they are.

    ``hidden=True``: also the final hidden states [N, C, H] that fed the LM head at the
    positions predicting each completion token (what a value head reads); returned as
    ``(logprobs, hidden)``, or ``(logprobs, detached_logprobs, hidden)`` with ``detached``.

    Each prompt is run once and its KV cache repeated for its G completions (gradients
    flow back through the repeat), instead of running the prompt G times; only the
    completion's tokens (``completion_mask``) go through the LM head, and positions
    after a completion's end hold 0. The result equals one forward pass over the
    concatenated sequences on the completion's tokens.

    ``detached=(ids, mask)``: more completions of the same prompts ([N, C'] in the same
    row layout), scored without gradients from the same prompt pass; returns
    ``(logprobs, detached_logprobs)``. Their activations are not kept for backward.

    Plugins call ``policy.logprobs(batch)`` instead: on a distributed run this pass with
    gradients must go through the DDP-wrapped scorer, or the ranks' weights drift apart;
    called directly there, it raises.
    """
    _refuse_outside_ddp(model, "completion_logprobs")
    g = completion_ids.shape[0] // prompt_ids.shape[0]
    split = _decoder_and_head(model)
    captured: list[torch.Tensor] = []
    hook = None
    if hidden and split is None:
        # the LM head's input is the final representation, whatever the architecture
        head = model.get_output_embeddings()
        if head is None:
            raise GymError(f"{type(model).__name__} has no output embeddings to read hidden "
                           "states from")
        hook = head.register_forward_hook(lambda mod, args, out: captured.append(args[0]))
    try:
        body = split[0] if split is not None else model
        kept = {} if split is not None else {"logits_to_keep": 1}
        out = body(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True, **kept)
        # the prompt's last position predicts the first completion token: its hidden
        # state (split) or its logits (the model's own head)
        first = (out.last_hidden_state if split is not None else out.logits)[:, -1:, :]
        cache = cache_of(out)
        prompt_len = prompt_ids.shape[1]
        if g > 1:
            cache.batch_repeat_interleave(g)
            first = first.repeat_interleave(g, dim=0)
            prompt_mask = prompt_mask.repeat_interleave(g, dim=0)

        def score(ids, mask, keep_hidden=False):
            rest = None
            if ids.shape[1] > 1:
                full_mask = torch.cat([prompt_mask, mask[:, :-1]], dim=1)
                rest = body(input_ids=ids[:, :-1], attention_mask=full_mask,
                            **cache_kw(cache), use_cache=True)
                rest = rest.last_hidden_state if split is not None else rest.logits
            if split is None:
                logits = (first if rest is None else torch.cat([first, rest], dim=1)).float()
                if temperature != 1.0:
                    logits = logits / temperature
                return selective_log_softmax(logits, ids), None
            # Only the completion's own tokens go through the 49k-wide LM head and its
            # log-softmax; positions after the end stay 0.
            states = first if rest is None else torch.cat([first, rest], dim=1)
            on = mask.bool()
            logits = split[1](states[on]).float()
            if temperature != 1.0:
                logits = logits / temperature
            picked = selective_log_softmax(logits, ids[on])
            logp = torch.zeros(ids.shape, dtype=picked.dtype, device=picked.device
                               ).masked_scatter(on, picked)
            return logp, (states if keep_hidden else None)

        logp, states = score(completion_ids, completion_mask, keep_hidden=hidden)
    finally:
        if hook is not None:
            hook.remove()
    outputs = [logp]
    if detached is not None:
        extra = cache.get_seq_length() - prompt_len
        if extra > 0:  # back to the prompt (new views: the graph above stays intact)
            cache.crop(-extra)
        with torch.no_grad():
            outputs.append(score(*detached)[0])
    if hidden:
        if states is None:
            # captured: the prompt's last position [B, 1, H] (once per prompt), then the
            # completion positions [N, C - 1, H]
            states = captured[0][:, -1:, :]
            if g > 1:
                states = states.repeat_interleave(g, dim=0)
            if len(captured) > 1:
                states = torch.cat([states, captured[1]], dim=1)
        outputs.append(states)
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def sequence_logprobs(model, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      target_mask: torch.Tensor, shared_prefix: int = 0) -> torch.Tensor:
    """Per-token log-probs [R, L] of whole sequences (a
    :class:`~gym_core.data.batching.SequenceBatch`'s tensors): entry [r, t] is
    log p(input_ids[r, t] | the tokens before it in its sequence) where ``target_mask``
    is 1, and exactly 0 elsewhere.

    ``position_ids`` restart at 0 for each packed sequence and no attention mask is
    passed, so transformers builds a block-diagonal causal mask from them (attention
    stays within each sequence). With ``shared_prefix = p > 0`` (unpacked rows that all
    begin with the same p untrained tokens) the prefix runs once and its KV cache is
    repeated for every row, as :func:`completion_logprobs` shares a prompt; gradients
    flow back through the repeat. Either way only the columns that predict a target
    token go through the LM head (a 1-D ``logits_to_keep``); the result equals one
    forward pass over the rows.

    Plugins call ``policy.logprobs(batch)``; on a distributed run this pass with
    gradients must go through the DDP-wrapped scorer (called directly there, it raises).
    """
    _refuse_outside_ddp(model, "sequence_logprobs")
    targets = target_mask.bool()
    p = shared_prefix
    if p <= 0:
        cols = targets[:, 1:].any(0).nonzero().squeeze(-1)  # column t predicts token t + 1
        out = model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                    logits_to_keep=cols)
        picked = selective_log_softmax(out.logits.float(), input_ids[:, cols + 1])
        return picked.new_zeros(input_ids.shape).index_copy(1, cols + 1, picked) * targets
    # the prefix once: its last position predicts every row's token p
    out = model(input_ids=input_ids[:1, :p], use_cache=True, logits_to_keep=1)
    cache = cache_of(out)
    cache.batch_repeat_interleave(input_ids.shape[0])
    first = torch.log_softmax(out.logits[0, -1].float(), -1)[input_ids[:, p]]  # [R]
    logp = first.new_zeros(input_ids.shape).index_copy(
        1, torch.tensor([p], device=input_ids.device), first[:, None])
    if input_ids.shape[1] > p + 1:  # the rest of each row, after the shared cache
        cols = targets[:, p + 1:].any(0).nonzero().squeeze(-1)  # rest column j: token p+1+j
        rest = model(input_ids=input_ids[:, p:-1], **cache_kw(cache), use_cache=True,
                     logits_to_keep=cols)
        picked = selective_log_softmax(rest.logits.float(), input_ids[:, p + 1 + cols])
        logp = logp.index_copy(1, p + 1 + cols, picked)
    return logp * targets


def _refuse_outside_ddp(model, name: str) -> None:
    if not getattr(_through_ddp, "active", False) and hasattr(
            next(model.parameters(), None), "device_mesh"):
        raise GymError(
            f"{name} was called on the FSDP-sharded model outside the scorer "
            "(trainer.strategy=fsdp): its weights are shards there. Compute log-probs with "
            "self.policy.logprobs(batch), and sample with self.policy.sample(...).")
    if (torch.is_grad_enabled() and not getattr(_through_ddp, "active", False)
            and torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
            and any(p.requires_grad for p in model.parameters())):
        raise GymError(
            f"{name} was called with gradients on a distributed run, outside "
            "the DDP-wrapped scorer: the ranks would train on unsynchronised gradients and "
            "drift apart. Compute log-probs with self.policy.logprobs(batch) (or call this "
            "under torch.no_grad() for values without gradients)."
        )


def _decoder_and_head(model):
    """(decoder, LM head) of a causal LM whose logits are exactly ``head(decoder(x))``
    (the architectures gym_core.sampling.fused reproduces), so the head can run on chosen
    positions only; None for any other model (its own forward is used)."""
    from gym_core.sampling.fused import ARCHS

    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(hf, "config", None)
    if config is None or config.model_type not in ARCHS:
        return None
    decoder = getattr(hf, getattr(hf, "base_model_prefix", "model"), None)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if decoder is None or head is None:
        return None
    return decoder, head


@dataclass(frozen=True)
class StepTotals:
    """Counts over the whole optimizer step (all micro-batches, every rank), for
    normalisers that need them. :meth:`Algorithm.step_totals` counts one rank's batches
    before the first backward pass; the core sums each field over the ranks (so every
    field is an integer)."""

    sequences: int  # rows: completions (not prompts) or examples in the step
    tokens: int  # active completion tokens in the step
    micro_batches: int


def aggregate_token_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    loss_type: TokenLoss,
    totals: StepTotals,
    max_completion_length: int,
) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to this micro-batch's share of the step's loss, so
    that summing the shares over micro-batches gives the normaliser of ``loss_type``:

    - grpo: mean over sequences of (sum_t l / |o_i|) (original, length-biased)
    - bnpo: sum l / active tokens of this micro-batch, averaged over micro-batches
    - dr_grpo: sum l / (sequences * max_completion_length), a constant
    - dapo: sum l / active tokens of the whole step
    - luspo: mean over sequences of sum_t l (each sequence weighted by its length, §2.5)
    """
    mask = mask.to(per_token.dtype)
    summed = per_token * mask
    if loss_type == "grpo":
        per_seq = summed.sum(-1) / mask.sum(-1).clamp(min=1)
        return per_seq.sum() / totals.sequences
    if loss_type == "bnpo":
        return summed.sum() / mask.sum().clamp(min=1) / totals.micro_batches
    if loss_type == "dr_grpo":
        return summed.sum() / (totals.sequences * max_completion_length)
    if loss_type == "dapo":
        return summed.sum() / max(totals.tokens, 1)
    if loss_type == "luspo":
        return summed.sum() / totals.sequences
    raise ValueError(f"loss_type {loss_type!r} is not one of {LOSS_TYPES}")


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi_theta || pi_ref) per token (>= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1
