"""RLOO's advantages and loss by hand, the number_only reward, and a real run on gym's
tiny model. The loss is checked against a stub policy: an algorithm gets its log-probs
only from ``policy.logprobs(batch, reference=...)``, so a stub that returns fixed tensors
is all a unit test of the math needs."""

from __future__ import annotations

import pytest
import torch
from gym_core.api import Rollout, StepTotals, compose, run_job

from gym_example_plugin.rewards import number_only
from gym_example_plugin.rloo import RLOO, leave_one_out_advantages


def test_leave_one_out_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 5.0, 3.0])
    # group 1: baselines 0, 1/3, 1/3, 1/3; group 2: (2+5+3)/3, (2+5+3)/3, 7/3, 9/3
    expected = [1.0, -1 / 3, -1 / 3, -1 / 3, 2 - 10 / 3, 2 - 10 / 3, 5 - 7 / 3, 3 - 3.0]
    assert torch.allclose(leave_one_out_advantages(r, 4), torch.tensor(expected))
    # equivalently A_i = k / (k - 1) * (r_i - mean)
    g = r.view(2, 4)
    assert torch.allclose(leave_one_out_advantages(r, 4),
                          (4 / 3 * (g - g.mean(1, keepdim=True))).reshape(-1))


def test_number_only():
    got = number_only([""] * 5, ["42", " -7. ", "42 apples", "4.5", "forty-two"], [{}] * 5)
    assert got == [1.0, 1.0, 0.0, 1.0, 0.0]


class StubPolicy:
    """Fixed per-token log-probs for the policy (with gradients) and the reference."""

    def __init__(self, logp, ref_logp):
        self.logp, self.ref_logp = logp, ref_logp

    def logprobs(self, batch, *, reference=False, detached=None):
        return self.ref_logp if reference else self.logp


def rollout(rewards, mask):
    n, c = mask.shape
    ids = torch.zeros(n, c, dtype=torch.long)
    return Rollout(prompt_ids=ids[:1], prompt_mask=ids[:1], completion_ids=ids,
                   completion_mask=mask, truncated=torch.zeros(n, dtype=torch.bool),
                   rewards=torch.tensor(rewards), group_size=n, examples=[{}] * n,
                   completions=[""] * n)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_loss_is_token_mean_of_minus_advantage_times_logprob(beta):
    cfg = compose(["algorithm=rloo", f"algorithm.beta={beta}", "algorithm.num_generations=2"])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -1.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0, 0.0], [-0.5, -1.0, -1.0]])
    batch = rollout([1.0, 0.0], mask)
    algo = RLOO(cfg.algorithm, StubPolicy(logp, ref))
    algo.prepare(batch)
    loss, metrics = algo.loss(batch, StepTotals(sequences=2, tokens=5, micro_batches=1))
    # by hand: k1 KL per sequence = sum (logp - ref) = 0.5 and 0.5; penalised rewards
    # 1 - 0.5 beta and 0 - 0.5 beta; with k = 2 the leave-one-out advantages are
    # r_i - r_j = +1 and -1; loss = -(1 * (-3) + (-1) * (-2)) / 5 tokens (dapo) = 0.2
    assert batch.extras["advantages"].tolist() == [1.0, -1.0]
    assert loss.item() == pytest.approx(0.2)
    assert ("kl" in metrics) == (beta != 0)
    loss.backward()  # d loss / d logp = -A_i / 5 on each kept token
    assert torch.allclose(logp.grad, torch.tensor([[-0.2, -0.2, 0.0], [0.2, 0.2, 0.2]]))


def test_it_trains_on_the_tiny_model(tmp_path):
    summary = run_job(compose(["model=tiny", "algorithm=rloo", "trainer.max_steps=2",
                               "trainer.batch_size=2", "algorithm.max_completion_length=8",
                               "trainer.eval_size=8", "trainer.eval_max_new_tokens=8",
                               "trainer.progress=false", "trainer.tensorboard=false"]),
                      run_dir=tmp_path / "run")
    assert summary["steps"] == 2 and summary["algorithm"] == "rloo"
