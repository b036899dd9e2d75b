"""DPO: L = -log sigma(beta h), h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) -
log pi_ref(y_l)] (token sums), and the robust, IPO and hinge variants (docs/algorithms.md §4).
Chosen and rejected share their prompt: one forward pass scores both (the prompt once)."""

from __future__ import annotations

import hashlib
import json

import torch
import torch.nn.functional as F

from gym_core.api import Algorithm, GymError, StepTotals
from gym_dpo import DPOConfig

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge")


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta,
             loss_type="sigmoid", label_smoothing=0.0, chosen_len=None, rejected_len=None):
    """Per-pair losses [B] from summed log-probs [B] (IPO needs the token counts: it
    compares per-token averaged log-ratios, as TRL does with the IPO authors' consent)."""
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":  # DPO; cDPO when eps > 0
        return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    if loss_type == "robust":  # unbiased under eps label noise (arXiv 2403.00409)
        if not 0 <= eps < 0.5:
            raise GymError(f"algorithm.label_smoothing={eps} must be in [0, 0.5) for robust")
        return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    if loss_type == "ipo":
        h_avg = chosen_ratio / chosen_len.clamp(min=1) - rejected_ratio / rejected_len.clamp(min=1)
        return (h_avg - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    raise GymError(f"algorithm.loss_type={loss_type!r} is not one of {LOSS_TYPES}")


class DPO(Algorithm):
    Config = DPOConfig
    online = False

    def __init__(self, cfg, policy):
        super().__init__(cfg, policy)
        if cfg.loss_type not in LOSS_TYPES:
            raise GymError(f"algorithm.loss_type={cfg.loss_type!r} is not one of {LOSS_TYPES}")
        self._ref_cache: dict[str, tuple[float, float]] = {}

    @property
    def needs_reference(self) -> bool:
        return True

    def check_data(self, train):
        for ex in train:
            if "chosen" not in ex or "rejected" not in ex:
                raise GymError(
                    "algorithm=dpo needs preference pairs (prompt, chosen, rejected): use "
                    "data=arithmetic or data=jsonl with such rows; a training example has "
                    f"{', '.join(sorted(ex))}"
                )

    def collate(self, examples):
        return self.policy.encode(
            [ex["prompt"] for ex in examples], [[ex["chosen"], ex["rejected"]] for ex in examples],
            max_prompt_length=self.cfg.max_prompt_length,
            max_completion_length=self.cfg.max_completion_length, examples=examples,
        )

    def step_totals(self, batches):
        # a pair is one sequence of the loss's mean (len(batch) counts both completions)
        return StepTotals(sequences=sum(len(b.examples) for b in batches),
                          tokens=sum(int(b.completion_mask.sum()) for b in batches),
                          micro_batches=len(batches))

    def _logps(self, batch, reference=False):
        logp = self.policy.logprobs(batch, reference=reference)
        sums = (logp * batch.completion_mask).sum(-1).view(-1, 2)
        return sums[:, 0], sums[:, 1]

    @torch.no_grad()
    def prepare(self, batch) -> None:
        keys = [_key(ex) for ex in batch.examples]
        if self.cfg.cache_ref_logprobs and all(k in self._ref_cache for k in keys):
            ref = torch.tensor([self._ref_cache[k] for k in keys], device=self.policy.device)
            batch.extras["ref_chosen"], batch.extras["ref_rejected"] = ref[:, 0], ref[:, 1]
            return
        chosen, rejected = self._logps(batch, reference=True)
        batch.extras["ref_chosen"], batch.extras["ref_rejected"] = chosen, rejected
        if self.cfg.cache_ref_logprobs:
            for k, c, r in zip(keys, chosen.tolist(), rejected.tolist()):
                self._ref_cache[k] = (c, r)

    def loss(self, batch, totals):
        chosen, rejected = self._logps(batch)
        lengths = batch.completion_mask.sum(-1).view(-1, 2).float()
        ref_c, ref_r = batch.extras["ref_chosen"], batch.extras["ref_rejected"]
        losses = dpo_loss(chosen, rejected, ref_c, ref_r, beta=self.cfg.beta,
                          loss_type=self.cfg.loss_type, label_smoothing=self.cfg.label_smoothing,
                          chosen_len=lengths[:, 0], rejected_len=lengths[:, 1])
        with torch.no_grad():
            r_c = self.cfg.beta * (chosen - ref_c)
            r_r = self.cfg.beta * (rejected - ref_r)
            metrics = {
                "rewards/chosen": r_c.mean().item(),
                "rewards/rejected": r_r.mean().item(),
                "rewards/margins": (r_c - r_r).mean().item(),
                "rewards/accuracies": (r_c > r_r).float().mean().item(),
                "logps/chosen": chosen.mean().item(),
                "logps/rejected": rejected.mean().item(),
            }
        return losses.sum() / totals.sequences, metrics


def _key(ex) -> str:
    raw = json.dumps([ex["prompt"], ex["chosen"], ex["rejected"]], sort_keys=True)
    return hashlib.sha1(raw.encode()).hexdigest()
