"""RLOO's advantages by hand, its loss on a real rollout of gym's tiny model, and the
number_only reward."""

from __future__ import annotations

import pytest
import torch
from gym_core.config import compose
from gym_core.data import arithmetic_task
from gym_core.losses import StepTotals
from gym_core.model import load_policy
from gym_core.rollout import RolloutEngine

from gym_example_plugin.rewards import number_only
from gym_example_plugin.rloo import RLOO, leave_one_out_advantages


def test_leave_one_out_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 5.0, 3.0])
    # group 1: baselines 0, 1/3, 1/3, 1/3; group 2: (2+5+3)/3, (2+5+3)/3, 7/3, 9/3
    expected = [1.0, -1 / 3, -1 / 3, -1 / 3, 2 - 10 / 3, 2 - 10 / 3, 5 - 7 / 3, 3 - 3.0]
    assert torch.allclose(leave_one_out_advantages(r, 4), torch.tensor(expected))
    # ALGORITHMS.md §3: A_i = k / (k - 1) * (r_i - mean)
    g = r.view(2, 4)
    assert torch.allclose(leave_one_out_advantages(r, 4),
                          (4 / 3 * (g - g.mean(1, keepdim=True))).reshape(-1))


def test_number_only():
    got = number_only([""] * 5, ["42", " -7. ", "42 apples", "4.5", "forty-two"], [{}] * 5)
    assert got == [1.0, 1.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_loss_is_token_mean_of_minus_advantage_times_logprob(beta):
    cfg = compose(["model=tiny", "algorithm=rloo", f"algorithm.beta={beta}",
                   "algorithm.max_completion_length=6"])
    torch.manual_seed(0)
    policy = load_policy(cfg.model, torch.device("cpu"))
    algo = RLOO(cfg.algorithm, policy)
    task = arithmetic_task(cfg.data)
    rewards = [("ones", lambda p, c, e: [float(i % 3) for i in range(len(c))], 1.0)]
    batch = RolloutEngine(policy, cfg.algorithm, rewards).generate(task.train[:2])
    algo.prepare(batch)
    mask = batch.completion_mask.float()
    totals = StepTotals(len(batch), int(mask.sum()), 1)
    loss, metrics = algo.loss(batch, totals)

    with torch.no_grad():
        logp = RLOO.logprobs(policy.model, batch)
        r = batch.rewards.clone()
        if beta:
            with policy.reference() as ref:
                r -= beta * ((logp - RLOO.logprobs(ref, batch)) * mask).sum(1)
        adv = leave_one_out_advantages(r, 4)
        expected = (-(adv[:, None] * logp) * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert ("kl" in metrics) == (beta != 0)
    loss.backward()  # gradients reach the adapter
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in policy.trainable_parameters())


def test_more_than_one_update_per_rollout_is_refused():
    cfg = compose(["model=tiny", "algorithm=rloo", "algorithm.num_iterations=2"])
    with pytest.raises(Exception, match="num_iterations=2: rloo is on-policy"):
        RLOO(cfg.algorithm, policy=None)
