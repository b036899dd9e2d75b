"""ORPO: L = NLL(chosen) - lambda * mean_pairs log sigma(log_odds), log_odds =
log[P_w / (1 - P_w)] - log[P_l / (1 - P_l)] with P the per-token mean log-prob of a
completion (docs/algorithms.md §5.2). No reference model. Chosen and rejected share
their prompt: one forward pass scores both (the prompt once)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gym_core.api import Algorithm, GymError, StepTotals
from gym_orpo import ORPOConfig

_LN_HALF = -math.log(2.0)
# P at most this (a probability of 1 - 1e-6 per token): at P = 0 exactly, log(1 - e^P) is
# -inf and its gradient is not a number (docs/algorithms.md §5.2, gym)
_MAX_LOGP = -1e-6


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, stable on both sides of -ln 2 (as TRL computes it). Each
    branch sees only inputs it is finite on, so neither puts a NaN in the gradient."""
    low = x < _LN_HALF
    a = torch.log1p(-torch.exp(torch.where(low, x, torch.full_like(x, _LN_HALF))))
    b = torch.log(-torch.expm1(torch.where(low, torch.full_like(x, _LN_HALF), x)))
    return torch.where(low, a, b)


def odds_ratio(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor):
    """log_odds [B] of per-token mean log-probs [B] (computed in fp32)."""
    c = chosen_avg.float().clamp(max=_MAX_LOGP)
    r = rejected_avg.float().clamp(max=_MAX_LOGP)
    return (c - r) - (log1mexp(c) - log1mexp(r))


def orpo_losses(chosen_avg, rejected_avg, *, beta: float):
    """Per-pair odds-ratio losses -beta * log sigma(log_odds) [B], and log_odds."""
    log_odds = odds_ratio(chosen_avg, rejected_avg)
    return -beta * F.logsigmoid(log_odds), log_odds


@dataclass(frozen=True)
class ORPOTotals(StepTotals):
    chosen_tokens: int  # the NLL term's normaliser: the chosen answers' tokens in the step


class ORPO(Algorithm):
    Config = ORPOConfig
    online = False
    data_types = ("preference",)

    def check_data(self, train):
        for ex in train:
            if "chosen" not in ex or "rejected" not in ex:
                raise GymError(
                    "algorithm=orpo needs preference pairs (prompt, chosen, rejected): use "
                    "data=arithmetic or data=jsonl with such rows; a training example has "
                    f"{', '.join(sorted(ex))}")

    def collate(self, examples):
        return self.policy.encode(
            [ex["prompt"] for ex in examples], [[ex["chosen"], ex["rejected"]] for ex in examples],
            max_prompt_length=self.cfg.max_prompt_length,
            max_completion_length=self.cfg.max_completion_length, examples=examples)

    def step_totals(self, batches):
        # sequences: pairs (the odds-ratio term's mean); tokens: every completion token
        return ORPOTotals(sequences=sum(len(b.examples) for b in batches),
                          tokens=sum(int(b.completion_mask.sum()) for b in batches),
                          micro_batches=len(batches),
                          chosen_tokens=sum(int(b.completion_mask[0::2].sum()) for b in batches))

    def loss(self, batch, totals):
        logp = self.policy.logprobs(batch)
        mask = batch.completion_mask
        sums = (logp * mask).sum(-1).view(-1, 2)
        lengths = mask.sum(-1).view(-1, 2)
        avg = sums / lengths.clamp(min=1)
        or_losses, log_odds = orpo_losses(avg[:, 0], avg[:, 1], beta=self.cfg.beta)
        nll = -sums[:, 0].sum()
        loss = nll / max(totals.chosen_tokens, 1) + or_losses.sum() / totals.sequences
        with torch.no_grad():
            r_c, r_r = self.cfg.beta * avg[:, 0], self.cfg.beta * avg[:, 1]
            metrics = {
                "nll_loss": float(nll) / max(int(lengths[:, 0].sum()), 1),  # this micro-batch
                "log_odds_ratio": F.logsigmoid(log_odds).mean().item(),
                "log_odds_chosen": log_odds.mean().item(),
                "rewards/chosen": r_c.mean().item(),
                "rewards/rejected": r_r.mean().item(),
                "rewards/margins": (r_c - r_r).mean().item(),
                "rewards/accuracies": (r_c > r_r).float().mean().item(),
                "logps/chosen": avg[:, 0].mean().item(),
                "logps/rejected": avg[:, 1].mean().item(),
            }
        return loss, metrics
