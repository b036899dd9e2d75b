"""KTO: r = log pi_theta(y|x) - log pi_ref(y|x) (token sums); the reference point
z0 = max(0, mean r over mismatched pairs (x_i, y_{i-1})), detached and averaged across
ranks; desirable loss lambda_D (1 - sigma(beta (r - z0))), undesirable
lambda_U (1 - sigma(beta (z0 - r))) (docs/algorithms.md §5.1)."""

from __future__ import annotations

import warnings

import torch

from gym_core.api import Algorithm, GymError, mean_over_ranks, unpair
from gym_kto import KTOConfig


def kto_loss(logps, ref_logps, desirable, z0, *, beta, desirable_weight=1.0,
             undesirable_weight=1.0):
    """Per-row losses [N]: ``desirable`` is a bool [N] label, ``z0`` a detached scalar."""
    r = logps - ref_logps
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    return torch.where(desirable, good, bad)


def kl_reference_point(kl_logps, kl_ref_logps):
    """z0 = max(0, mean of the mismatched pairs' log-ratios), averaged across ranks."""
    return mean_over_ranks((kl_logps - kl_ref_logps).mean().detach()).clamp(min=0)


def rows_of(examples):
    """Labelled rows: as given, or each preference pair unpaired (all desirable rows
    first, so that shifting completions by one pairs every prompt with another's)."""
    rows = []
    for ex in examples:
        if "completion" in ex and "label" in ex:
            rows.append(ex)
        elif "chosen" in ex and "rejected" in ex:
            rows.extend(unpair(ex))
        else:
            raise GymError(
                "algorithm=kto needs labelled completions (prompt, completion, label) or "
                f"preference pairs; this example has {', '.join(sorted(ex))}"
            )
    return sorted(rows, key=lambda r: not r["label"])


class KTO(Algorithm):
    Config = KTOConfig
    online = False
    data_types = ("unpaired_preference", "preference")

    @property
    def needs_reference(self) -> bool:
        return True

    def check_data(self, train):
        rows = rows_of(train)
        n_d = sum(1 for r in rows if r["label"])
        n_u = len(rows) - n_d
        if n_d == 0 or n_u == 0:
            raise GymError(
                f"algorithm=kto needs both desirable and undesirable examples; the training "
                f"data hold only {'desirable' if n_u == 0 else 'undesirable'} ones ({len(rows)})"
            )
        ratio = self.cfg.desirable_weight * n_d / (self.cfg.undesirable_weight * n_u)
        if not 1.0 <= ratio <= 4 / 3:
            warnings.warn(
                f"KTO: desirable_weight*n_desirable / (undesirable_weight*n_undesirable) = "
                f"{ratio:.2f} ({n_d} desirable, {n_u} undesirable); the paper advises [1, 4/3]: "
                "adjust algorithm.desirable_weight / undesirable_weight", stacklevel=2)

    def collate(self, examples):
        rows = rows_of(examples)
        if len({str(r["prompt"]) for r in rows}) < 2:
            raise GymError(
                "KTO estimates its reference point from mismatched prompt/completion pairs "
                "within a batch, which needs at least 2 different prompts: raise "
                f"trainer.batch_size (now {len(examples)}; 4 or more is advised)"
            )
        # Each prompt with its own completion, plus the previous row's (the mismatched
        # pair z0 is estimated from, TRL's choice) scored from the same prompt pass.
        own = [r["completion"] for r in rows]
        lengths = dict(max_prompt_length=self.cfg.max_prompt_length,
                       max_completion_length=self.cfg.max_completion_length)
        prompts = [r["prompt"] for r in rows]
        batch = self.policy.encode(prompts, [[c] for c in own], examples=rows, **lengths)
        shifted = self.policy.encode(prompts, [[own[i - 1]] for i in range(len(rows))],
                                     **lengths)
        batch.extras["kl_ids"] = shifted.completion_ids
        batch.extras["kl_mask"] = shifted.completion_mask
        batch.extras["desirable"] = torch.tensor([bool(r["label"]) for r in rows],
                                                 device=self.policy.device)
        return batch

    def _logps(self, batch, reference=False):
        """Summed log-probs of each row's own completion (with gradients unless under
        no_grad) and of its mismatched one (never with gradients): one prompt pass."""
        kl_mask = batch.extras["kl_mask"]
        own, kl = self.policy.logprobs(batch, reference=reference,
                                       detached=(batch.extras["kl_ids"], kl_mask))
        return (own * batch.completion_mask).sum(-1), (kl * kl_mask).sum(-1)

    @torch.no_grad()
    def prepare(self, batch) -> None:
        batch.extras["ref_logps"], batch.extras["ref_kl_logps"] = self._logps(batch, reference=True)

    def loss(self, batch, totals):
        # the mismatched pairs' policy log-probs come from this pass's prompt, without
        # gradients: the value TRL's separate no-grad pass computes
        logps, kl_logps = self._logps(batch)
        z0 = kl_reference_point(kl_logps, batch.extras["ref_kl_logps"])
        ref, desirable = batch.extras["ref_logps"], batch.extras["desirable"]
        losses = kto_loss(logps, ref, desirable, z0, beta=self.cfg.beta,
                          desirable_weight=self.cfg.desirable_weight,
                          undesirable_weight=self.cfg.undesirable_weight)
        with torch.no_grad():
            rewards = self.cfg.beta * (logps - ref)
            metrics = {"kl": float(z0), "count/desirable": float(desirable.sum()),
                       "count/undesirable": float((~desirable).sum())}
            if desirable.any():
                metrics["rewards/chosen"] = rewards[desirable].mean().item()
            if (~desirable).any():
                metrics["rewards/rejected"] = rewards[~desirable].mean().item()
        return losses.sum() / totals.sequences, metrics
