"""PPO with a value head for RLHF (docs/algorithms.md §6.2).

Per step (one rollout batch, ``prepare`` / ``prepare_step``, no gradients):

    lp_old, V   = policy log-probs and values of the sampled completions (one pass)
    KL[t]       = lp_old - lp_ref (k1) or k3, per token
    rew[t]      = -kl_coef * KL[t], plus the completion's score at its last token
    A           = GAE(rew, V; gamma, lam);  returns = A + V;  A whitened over the step

then ``num_ppo_epochs`` passes, each ``num_mini_batches`` optimizer updates of

    pg  = token mean of max(-A rho, -A clip(rho, 1 - c, 1 + c)),   rho = exp(lp - lp_old)
    vf  = 0.5 * token mean of max((v - R)^2, (clip(v, V - c_v, V + c_v) - R)^2)
    L   = pg + vf_coef * vf

The value head is a linear layer on the policy's final hidden states (``policy.add_head``),
so one forward pass gives both log-probs and values, and its weights are trained,
checkpointed and all-reduced with the policy's."""

from __future__ import annotations

import torch

from gym_core.api import Algorithm, GymError, StepTotals, sum_over_ranks
from gym_ppo import PPOConfig

WHITEN_EPS = 1e-8  # inside the rsqrt, as TRL's masked_whiten


class ValueHead(torch.nn.Module):
    """V(s_t) from the hidden state that predicts token t: a linear layer, zero at the
    start (values 0: the first returns are the GAE of the rewards alone, and the value
    loss sends no gradient into the shared trunk until the head has learned something)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


def token_rewards(score, kl, mask, kl_coef, turn_rewards=None) -> torch.Tensor:
    """[N, T] per-token rewards: -kl_coef * KL on the completion's tokens, and the
    sequence score added at its last token (the EOS, or the last token of a truncated
    completion). Multi-turn episodes (``turn_rewards`` [N, T], docs/agents.md): each
    turn's reward at its last sampled token instead, and ``score`` (then only what
    the score adds to the turns' rewards: the missing-EOS penalty) at the last one."""
    mask = mask.to(kl.dtype)
    rew = -kl_coef * kl * mask
    if turn_rewards is not None:
        rew = rew + turn_rewards.to(rew.dtype) * mask
        # the mask has gaps (environment tokens): the last sampled token
        positions = torch.arange(mask.shape[1], device=mask.device, dtype=rew.dtype)
        last = (mask * (positions + 1)).argmax(-1)
        has = mask.sum(-1) > 0
        return rew.scatter_add(1, last.unsqueeze(1), (score * has).unsqueeze(1).to(rew.dtype))
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    has = mask.sum(-1) > 0
    return rew.scatter_add(1, last.unsqueeze(1), (score * has).unsqueeze(1).to(rew.dtype))


def gae(rewards, values, mask, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (arXiv 1506.02438), right to left over each
    completion; the value after the last token is 0. Returns (advantages, returns =
    advantages + values), 0 outside the mask."""
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    width = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(running)
    # positions outside the mask (padding; a multi-turn episode's environment tokens,
    # docs/agents.md) are skipped: a token's successor is the next token in the mask
    for t in reversed(range(width)):
        on = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(on, delta + gamma * lam * running, running)
        next_value = torch.where(on, values[:, t], next_value)
        adv[:, t] = running
    adv = adv * mask
    return adv, (adv + values) * mask


def masked_moments(tensors, masks) -> tuple[float, float]:
    """Mean and Bessel-corrected variance of the masked entries of ``tensors``, over
    every rank (TRL's masked_mean / masked_var over its local batch)."""
    device = tensors[0].device
    stats = torch.zeros(3, dtype=torch.float64, device=device)
    for x, m in zip(tensors, masks):
        m = m.to(torch.float64)
        x = x.to(torch.float64)
        stats += torch.stack([m.sum(), (x * m).sum(), (x * x * m).sum()])
    n, total, sq = sum_over_ranks(stats).tolist()
    mean = total / n
    var = (sq / n - mean * mean) * n / (n - 1)
    return mean, var


def whiten(tensors, masks, shift_mean: bool = True) -> list[torch.Tensor]:
    """(x - mean) / sqrt(var + 1e-8) over every masked entry of the step (all ranks);
    ``shift_mean=False`` keeps the mean (TRL's reward whitening). 0 outside the mask."""
    mean, var = masked_moments(tensors, masks)
    scale = (var + WHITEN_EPS) ** -0.5
    out = []
    for x, m in zip(tensors, masks):
        w = (x - mean) * scale
        if not shift_mean:
            w = w + mean
        out.append(w * m.to(w.dtype))
    return out


def ppo_losses(logp, old_logp, values, old_values, advantages, returns, mask, cliprange,
               cliprange_value):
    """Per-token policy loss, value loss (with the 0.5) and clip indicators, [N, T]."""
    ratio = torch.exp(logp - old_logp)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    pg = torch.max(pg1, pg2)
    v_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    vf1 = (values - returns) ** 2
    vf2 = (v_clipped - returns) ** 2
    vf = 0.5 * torch.max(vf1, vf2)
    return pg, vf, (pg2 > pg1).float(), (vf2 > vf1).float()


class PPO(Algorithm):
    Config = PPOConfig
    online = True
    data_types = ("prompt_only",)

    def __init__(self, cfg, policy):
        super().__init__(cfg, policy)  # values checked against PPOConfig's declarations
        if "value" not in policy.heads:
            hidden = policy.model.config.hidden_size
            policy.add_head("value", ValueHead(hidden))

    def setup(self, cfg, run_dir, plugins) -> None:
        if cfg.trainer.grad_accum % self.cfg.num_mini_batches:
            raise GymError(
                f"algorithm.num_mini_batches={self.cfg.num_mini_batches} must divide "
                f"trainer.grad_accum={cfg.trainer.grad_accum}: each mini-batch is a group of "
                "the step's micro-batches")

    @property
    def needs_reference(self) -> bool:
        return self.cfg.kl_coef != 0.0

    @property
    def updates_per_step(self) -> int:
        return self.cfg.num_ppo_epochs * self.cfg.num_mini_batches

    @torch.no_grad()
    def prepare(self, batch) -> None:
        cfg = self.cfg
        # multi-turn episodes: the model's own tokens only (docs/agents.md)
        mask = batch.trained_mask().float() if hasattr(batch, "trained_mask") \
            else batch.completion_mask.float()
        logp, heads = self.policy.logprobs(batch, heads=True)
        values = heads["value"] * mask
        score = batch.rewards.float()
        turns = getattr(batch, "turn_rewards", None)  # multi-turn episodes' turn rewards
        if cfg.missing_eos_penalty is not None:
            score = score - cfg.missing_eos_penalty * batch.truncated.float()
        if self.needs_reference:
            ref = self.policy.logprobs(batch, reference=True)
            if cfg.kl_estimator == "k1":
                kl = logp - ref
            else:
                x = ref - logp
                kl = torch.exp(x) - x - 1
        else:
            kl = torch.zeros_like(logp)
        batch.extras.update(loss_mask=mask, old_logp=logp, old_values=values, kl=kl * mask,
                            score=score,
                            token_rewards=token_rewards(
                                score if turns is None else score - batch.rewards.float(),
                                kl, mask, cfg.kl_coef, turns))

    @torch.no_grad()
    def prepare_step(self, batches) -> None:
        cfg = self.cfg
        masks = [b.extras["loss_mask"] for b in batches]
        rewards = [b.extras["token_rewards"] for b in batches]
        if cfg.whiten_rewards:
            rewards = whiten(rewards, masks, shift_mean=False)
        advantages = []
        for b, rew, m in zip(batches, rewards, masks):
            adv, ret = gae(rew, b.extras["old_values"], m, cfg.gamma, cfg.lam)
            b.extras["returns"] = ret
            advantages.append(adv)
        for b, adv in zip(batches, whiten(advantages, masks)):
            b.extras["advantages"] = adv

    def step(self, batches, totals, updater) -> dict[str, float]:
        cfg = self.cfg
        size = len(batches) // cfg.num_mini_batches
        generator = torch.Generator().manual_seed(updater.step)  # the same on every rank
        rows = []
        for _ in range(cfg.num_ppo_epochs):
            order = torch.randperm(len(batches), generator=generator).tolist()
            for k in range(cfg.num_mini_batches):
                group = [batches[i] for i in order[k * size:(k + 1) * size]]
                tokens = sum_over_ranks(torch.tensor(
                    [float(b.extras["loss_mask"].sum()) for b in group]).sum())
                mini = StepTotals(sequences=totals.sequences, tokens=int(tokens),
                                  micro_batches=len(group))
                rows.append(updater.update(group, lambda b, t=mini: self.loss(b, t)))
        # the last update's loss and norm; the other metrics averaged over the updates
        out = {k: sum(r[k] for r in rows) / len(rows) for k in rows[-1]}
        out.update(loss=rows[-1]["loss"], grad_norm=rows[-1]["grad_norm"], lr=rows[-1]["lr"])
        out["score"] = float(torch.cat([b.extras["score"] for b in batches]).mean())
        return out

    def loss(self, batch, totals):
        cfg = self.cfg
        logp, heads = self.policy.logprobs(batch, heads=True)
        x = batch.extras
        mask = x["loss_mask"]
        pg, vf, pg_clipped, vf_clipped = ppo_losses(
            logp, x["old_logp"], heads["value"], x["old_values"], x["advantages"],
            x["returns"], mask, cfg.cliprange, cfg.cliprange_value)
        n = max(totals.tokens, 1)
        pg_loss = (pg * mask).sum() / n
        vf_loss = (vf * mask).sum() / n
        with torch.no_grad():
            local = mask.sum().clamp(min=1)
            log_ratio = (logp - x["old_logp"]) * mask
            metrics = {
                "pg_loss": (pg * mask).sum().item() / local.item(),
                "vf_loss": (vf * mask).sum().item() / local.item(),
                "clip_fraction": ((pg_clipped * mask).sum() / local).item(),
                "vf_clip_fraction": ((vf_clipped * mask).sum() / local).item(),
                "approx_kl": (0.5 * (log_ratio ** 2).sum() / local).item(),
                "kl": (x["kl"].sum() / local).item(),
                "value_mean": ((x["old_values"] * mask).sum() / local).item(),
                "return_mean": ((x["returns"] * mask).sum() / local).item(),
            }
        return pg_loss + cfg.vf_coef * vf_loss, metrics
