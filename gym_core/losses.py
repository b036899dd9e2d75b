"""The token math every method shares: log-prob gathering, masking and loss
normalisation (docs/algorithms.md §1.4). Method formulas live in the plugins."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.distributed

from gym_core.errors import GymError

# Set while the DDP-wrapped scorer (gym_core.model.LogprobScorer) runs: a log-prob pass
# with gradients anywhere else would skip DDP's gradient all-reduce.
_through_ddp = threading.local()

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


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
    completion positions go through the LM head. The result equals one forward pass over
    the concatenated sequences.

    ``detached=(ids, mask)``: more completions of the same prompts ([N, C'] in the same
    row layout), scored without gradients from the same prompt pass; returns
    ``(logprobs, detached_logprobs)``. Their activations are not kept for backward.

    Plugins call ``policy.logprobs(batch)`` instead: on a distributed run this pass with
    gradients must go through the DDP-wrapped scorer, or the ranks' weights drift apart;
    called directly there, it raises.
    """
    if (torch.is_grad_enabled() and not getattr(_through_ddp, "active", False)
            and torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
            and any(p.requires_grad for p in model.parameters())):
        raise GymError(
            "completion_logprobs was called with gradients on a distributed run, outside "
            "the DDP-wrapped scorer: the ranks would train on unsynchronised gradients and "
            "drift apart. Compute log-probs with self.policy.logprobs(batch) (or call this "
            "under torch.no_grad() for values without gradients)."
        )
    g = completion_ids.shape[0] // prompt_ids.shape[0]
    captured: list[torch.Tensor] = []
    hook = None
    if hidden:  # the LM head's input is the final representation, whatever the architecture
        head = model.get_output_embeddings()
        if head is None:
            raise GymError(f"{type(model).__name__} has no output embeddings to read hidden "
                           "states from")
        hook = head.register_forward_hook(lambda mod, args, out: captured.append(args[0]))
    try:
        out = model(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True,
                    logits_to_keep=1)
        first = out.logits[:, -1:, :]
        cache = out.past_key_values
        prompt_len = prompt_ids.shape[1]
        if g > 1:
            cache.batch_repeat_interleave(g)
            first = first.repeat_interleave(g, dim=0)
            prompt_mask = prompt_mask.repeat_interleave(g, dim=0)

        def score(ids, mask):
            logits = first
            if ids.shape[1] > 1:
                full_mask = torch.cat([prompt_mask, mask[:, :-1]], dim=1)
                rest = model(input_ids=ids[:, :-1], attention_mask=full_mask,
                             past_key_values=cache, use_cache=True).logits
                logits = torch.cat([first, rest], dim=1)
            logits = logits.float()
            if temperature != 1.0:
                logits = logits / temperature
            return selective_log_softmax(logits, ids)

        logp = score(completion_ids, completion_mask)
    finally:
        if hook is not None:
            hook.remove()
    outputs = [logp]
    if detached is not None:
        extra = cache.get_seq_length() - prompt_len
        if extra > 0:  # back to the prompt (new views: the graph above stays intact)
            cache.crop(-extra)
        with torch.no_grad():
            outputs.append(score(*detached))
    if hidden:
        # captured: the prompt's last position [B, 1, H] (once per prompt), then the
        # completion positions [N, C - 1, H]
        states = captured[0][:, -1:, :]
        if g > 1:
            states = states.repeat_interleave(g, dim=0)
        if len(captured) > 1:
            states = torch.cat([states, captured[1]], dim=1)
        outputs.append(states)
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


@dataclass(frozen=True)
class StepTotals:
    """Counts over the whole optimizer step (all micro-batches), for normalisers that
    need them. Computed by the core before the first backward pass."""

    sequences: int  # completions / examples in the step
    tokens: int  # active completion tokens in the step
    micro_batches: int


def aggregate_token_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
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
