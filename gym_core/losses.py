"""The token math every method shares: log-prob gathering, masking and loss
normalisation (ALGORITHMS.md §1.2). Method formulas live in the plugins."""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def selective_log_softmax(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[ids] without materialising the full log-softmax tensor."""
    picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def completion_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int
) -> torch.Tensor:
    """Per-token log-probs of the last ``n_completion`` tokens of each row.

    Only the completion positions go through the LM head (``logits_to_keep``): on a
    49k-token vocabulary the head is a large share of the forward pass.
    """
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        logits_to_keep=n_completion + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1, :].float()
    return selective_log_softmax(logits, input_ids[:, -n_completion:])


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


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
    raise ValueError(f"loss_type {loss_type!r} is not one of {LOSS_TYPES}")


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi_theta || pi_ref) per token (>= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1
