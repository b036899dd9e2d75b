"""DPO and every loss type of TRL 1.16 (docs/algorithms.md §4): sigmoid, hinge, ipo,
exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down,
discopop, sft, sigmoid_norm, their weighted sums (``loss_weights``), f-divergence scores
and LD-DPO's length weighting. Chosen and rejected share their prompt: one forward pass
scores both (the prompt once)."""

from __future__ import annotations

import hashlib
import json
import math

import torch
import torch.nn.functional as F

from gym_core.api import Algorithm, GymError, StepTotals
from gym_dpo import DPO_LOSS_TYPES, F_DIVERGENCES, DPOConfig

# kept for plugins written against the four-type DPO
LOSS_TYPES = DPO_LOSS_TYPES


def loss_types_of(loss_type) -> list[str]:
    """``algorithm.loss_type`` as a list of names (a single name or a list; the config's
    are checked against DPOConfig's declaration before a job starts)."""
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    bad = [n for n in names if n not in DPO_LOSS_TYPES]
    if not names or bad:
        raise ValueError(f"loss_type {names} names {bad or 'nothing'}; each must be one of "
                         f"{', '.join(DPO_LOSS_TYPES)}")
    return names


def check_config(cfg) -> tuple[list[str], list[float]]:
    """The loss types and their weights (DPOConfig.validate has refused what TRL
    refuses, §4.2-4.4)."""
    names = loss_types_of(cfg.loss_type)
    weights = [1.0] * len(names) if cfg.loss_weights is None else [float(w) for w in cfg.loss_weights]
    return names, weights


def f_scores(logratios: torch.Tensor, f_type: str, alpha: float = 0.5) -> torch.Tensor:
    """f'(pi / pi_ref) of f-DPO (§4.2): the log-ratio itself for reverse KL."""
    if f_type == "reverse_kl" or (f_type == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return logratios
    if f_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_type == "alpha_divergence":
        t = (alpha - 1.0) * logratios
        clamp_max = 11.0 if t.dtype == torch.float16 else 80.0  # exp must stay representable
        return (torch.exp(torch.clamp(t.float(), max=clamp_max)) - 1.0).to(t.dtype) / (alpha - 1.0)
    raise ValueError(f"f_type {f_type!r} is not one of {F_DIVERGENCES}")


def pair_loss(name, *, beta, c, r, sc, sr, chosen_logps, rejected_logps, ref_chosen_logps,
              ref_rejected_logps, chosen_len, rejected_len, eps, discopop_tau, sft_nll):
    """One loss type's per-pair loss [B] (§4.3): c, r the chosen / rejected log-ratios,
    sc, sr their f-scores."""
    d = sc - sr
    ls = F.logsigmoid
    if name == "sigmoid":  # DPO; conservative DPO when eps > 0 (gym; TRL 1.16 ignores eps)
        return -(1 - eps) * ls(beta * d) - eps * ls(-beta * d)
    if name == "hinge":  # SLiC: beta is 1 / margin
        return torch.relu(1 - beta * d)
    if name in ("ipo", "sigmoid_norm"):  # per-token averaged scores (IPO's authors agree)
        avg = sc / chosen_len.clamp(min=1) - sr / rejected_len.clamp(min=1)
        return (avg - 1 / (2 * beta)) ** 2 if name == "ipo" else -ls(beta * avg)
    if name == "exo_pair":  # KL(model's 2-way preference || smoothed label)
        z = beta * d
        return (torch.sigmoid(z) * (ls(z) - math.log1p(-eps))
                + torch.sigmoid(-z) * (ls(-z) - math.log(eps)))
    if name == "nca_pair":
        return -ls(beta * c) - 0.5 * ls(-beta * c) - 0.5 * ls(-beta * r)
    if name == "robust":  # unbiased under eps label noise
        return (-(1 - eps) * ls(beta * d) + eps * ls(-beta * d)) / (1 - 2 * eps)
    if name == "bco_pair":  # TRL 1.16: no running reward shift
        return -ls(beta * c) - ls(-beta * r)
    if name == "sppo_hard":
        return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    if name in ("aot", "aot_unpaired"):  # sorting couples the micro-batch's pairs
        if name == "aot":
            delta = (torch.sort(chosen_logps - rejected_logps).values
                     - torch.sort(ref_chosen_logps - ref_rejected_logps).values)
        else:
            delta = torch.sort(c).values - torch.sort(r).values
        return -(1 - eps) * ls(beta * delta) - eps * ls(-beta * delta)
    if name == "apo_zero":
        return (1 - torch.sigmoid(beta * c)) + torch.sigmoid(beta * r)
    if name == "apo_down":
        return torch.sigmoid(beta * c) + (1 - torch.sigmoid(beta * (c - r)))
    if name == "discopop":
        z = beta * d
        w = torch.sigmoid(z / discopop_tau)
        return (1 - w) * (-ls(z)) + w * torch.exp(-z)
    if name == "sft":  # the micro-batch's chosen-token NLL, the same for every pair
        if sft_nll is None:
            raise ValueError("loss type sft needs sft_nll, the chosen tokens' mean NLL")
        return sft_nll.expand(c.shape[0])
    raise ValueError(f"loss type {name!r} is not one of {DPO_LOSS_TYPES}")


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta,
             loss_type="sigmoid", loss_weights=None, label_smoothing=0.0, chosen_len=None,
             rejected_len=None, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
             discopop_tau=0.05, sft_nll=None):
    """Per-pair losses [B] from summed log-probs [B]: sum_k weight_k * loss_k (§4.4; the
    mean over pairs is TRL's ``sum_k w_k mean(PL_k)``). ``chosen_len``/``rejected_len``
    (token counts) feed ipo and sigmoid_norm; ``sft_nll`` (a 0-d tensor) feeds sft."""
    names = loss_types_of(loss_type)
    weights = [1.0] * len(names) if loss_weights is None else list(loss_weights)
    c = chosen_logps - ref_chosen_logps
    r = rejected_logps - ref_rejected_logps
    sc = f_scores(c, f_divergence_type, f_alpha_divergence_coef)
    sr = f_scores(r, f_divergence_type, f_alpha_divergence_coef)
    total = 0.0
    for name, weight in zip(names, weights):
        total = total + weight * pair_loss(
            name, beta=beta, c=c, r=r, sc=sc, sr=sr, chosen_logps=chosen_logps,
            rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
            ref_rejected_logps=ref_rejected_logps, chosen_len=chosen_len,
            rejected_len=rejected_len, eps=label_smoothing, discopop_tau=discopop_tau,
            sft_nll=sft_nll)
    return total


def pair_logps(logp: torch.Tensor, mask: torch.Tensor, ld_alpha: float | None = None):
    """Summed completion log-probs of each pair's chosen and rejected rows ([2B, T] in the
    rollout layout: chosen, rejected, chosen, ...). With ``ld_alpha`` (LD-DPO, §4.6) the
    tokens past the pair's shorter completion count by ld_alpha."""
    mask = mask.to(logp.dtype)
    if ld_alpha is None:
        sums = (logp * mask).sum(-1).view(-1, 2)
        return sums[:, 0], sums[:, 1]
    pos = mask.cumsum(-1)
    lengths = mask.sum(-1).view(-1, 2)
    shared = lengths.min(dim=1).values.repeat_interleave(2).unsqueeze(1)
    weight = torch.where(pos <= shared, 1.0, ld_alpha) * mask
    sums = (logp * weight).sum(-1).view(-1, 2)
    return sums[:, 0], sums[:, 1]


class DPO(Algorithm):
    Config = DPOConfig
    online = False
    data_types = ("preference",)

    def __init__(self, cfg, policy):
        super().__init__(cfg, policy)
        self.loss_names, self.loss_weights = check_config(cfg)
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

    @torch.no_grad()
    def prepare(self, batch) -> None:
        keys = [_key(ex) for ex in batch.examples]
        if self.cfg.cache_ref_logprobs and all(k in self._ref_cache for k in keys):
            ref = torch.tensor([self._ref_cache[k] for k in keys], device=self.policy.device)
            batch.extras["ref_chosen"], batch.extras["ref_rejected"] = ref[:, 0], ref[:, 1]
            return
        ref_logp = self.policy.logprobs(batch, reference=True)
        chosen, rejected = pair_logps(ref_logp, batch.completion_mask, self.cfg.ld_alpha)
        batch.extras["ref_chosen"], batch.extras["ref_rejected"] = chosen, rejected
        if self.cfg.cache_ref_logprobs:
            for k, c, r in zip(keys, chosen.tolist(), rejected.tolist()):
                self._ref_cache[k] = (c, r)

    def loss(self, batch, totals):
        cfg = self.cfg
        logp = self.policy.logprobs(batch)
        mask = batch.completion_mask.to(logp.dtype)
        chosen, rejected = pair_logps(logp, mask, cfg.ld_alpha)
        lengths = mask.sum(-1).view(-1, 2)
        sft_nll = None
        if "sft" in self.loss_names:  # the chosen tokens' mean NLL over the micro-batch
            width = logp.shape[1]
            lp_c, m_c = logp.view(-1, 2, width)[:, 0], mask.view(-1, 2, width)[:, 0]
            sft_nll = -(lp_c * m_c).sum() / m_c.sum().clamp(min=1)
        ref_c, ref_r = batch.extras["ref_chosen"], batch.extras["ref_rejected"]
        losses = dpo_loss(chosen, rejected, ref_c, ref_r, beta=cfg.beta,
                          loss_type=self.loss_names, loss_weights=self.loss_weights,
                          label_smoothing=cfg.label_smoothing, chosen_len=lengths[:, 0],
                          rejected_len=lengths[:, 1], f_divergence_type=cfg.f_divergence_type,
                          f_alpha_divergence_coef=cfg.f_alpha_divergence_coef,
                          discopop_tau=cfg.discopop_tau, sft_nll=sft_nll)
        with torch.no_grad():
            r_c = cfg.beta * (chosen - ref_c)
            r_r = cfg.beta * (rejected - ref_r)
            metrics = {
                "rewards/chosen": r_c.mean().item(),
                "rewards/rejected": r_r.mean().item(),
                "rewards/margins": (r_c - r_r).mean().item(),
                "rewards/accuracies": (r_c > r_r).float().mean().item(),
                "logps/chosen": chosen.mean().item(),
                "logps/rejected": rejected.mean().item(),
            }
            if sft_nll is not None:
                metrics["nll_loss"] = sft_nll.item()
        # mean over the step's pairs: this micro-batch's share
        return losses.sum() / totals.sequences, metrics


def _key(ex) -> str:
    raw = json.dumps([ex["prompt"], ex["chosen"], ex["rejected"]], sort_keys=True)
    return hashlib.sha1(raw.encode()).hexdigest()
