"""GSPO: sequence ratios, clipping and the GSPO-token variant (docs/algorithms.md §2.1-2.2),
a preset of the GRPO family (importance_sampling_level sequence / sequence_token)."""

from __future__ import annotations

import math

import pytest
import torch

from gym_core.train.job import run_job
from gym_grpo.grpo import grpo_token_loss, log_importance_weights
from tests.conftest import compose


def per_sequence(logp, old, adv, mask, eps_low, eps_high, level="sequence"):
    """GSPO's per-sequence loss (the grpo normaliser's per-sequence token mean) and the
    clip indicator of each sequence."""
    per_token, info = grpo_token_loss(logp, old, adv, eps_low, eps_high, mask=mask,
                                      loss_type="grpo", level=level)
    n = mask.sum(-1).clamp(min=1)
    clipped = (info["low_clipped"] + info["high_clipped"])[:, 0]
    return (per_token * mask).sum(-1) / n, clipped


def test_sequence_ratio_is_the_geometric_mean_of_token_ratios():
    logp = torch.log(torch.tensor([[0.5, 0.4, 0.9]]))
    old = torch.log(torch.tensor([[0.25, 0.5, 0.9]]))
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding
    s = torch.exp(log_importance_weights(logp, old, mask, "sequence")).item()
    assert s == pytest.approx(math.sqrt(2.0 * 0.8))


def test_clipping_removes_whole_sequences():
    # s = exp(0.01) ~ 1.01 > 1 + 4e-4 with A > 0: clipped (constant loss, no gradient)
    logp = torch.full((2, 3), -1.0, requires_grad=True)
    old = torch.full((2, 3), -1.01)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 3)
    loss, clipped = per_sequence(logp, old, adv, mask, 3e-4, 4e-4)
    assert clipped.tolist() == [1.0, 0.0]
    assert loss[0].item() == pytest.approx(-(1 + 4e-4))
    assert loss[1].item() == pytest.approx(math.exp(0.01))
    loss.sum().backward()
    assert torch.all(logp.grad[0] == 0)  # the clipped sequence contributes nothing
    # the unclipped one: d/dlogp_t of -(s * A) = s * 1/|o| for each token
    assert logp.grad[1].tolist() == pytest.approx([math.exp(0.01) / 3] * 3, rel=1e-5)


def test_gspo_token_has_gspos_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 4, generator=g) * 0.01 - 1
    old = base + torch.randn(3, 4, generator=g) * 1e-3
    adv = torch.tensor([0.5, -1.0, 2.0])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    grads, values = [], []
    for level in ("sequence", "sequence_token"):
        logp = base.clone().requires_grad_(True)
        loss, _ = per_sequence(logp, old, adv, mask, 0.2, 0.2, level)
        loss.sum().backward()
        values.append(loss.detach())
        grads.append(logp.grad * mask)
    torch.testing.assert_close(values[0], values[1])
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("level", ["sequence", "sequence_token"])
def test_gspo_end_to_end_with_off_policy_updates(tmp_path, tiny_overrides, level):
    s = run_job(compose([*tiny_overrides, "algorithm=gspo", "algorithm.num_iterations=2",
                         f"algorithm.importance_sampling_level={level}",
                         "trainer.max_steps=2", "algorithm.lr=1e-2"]), run_dir=tmp_path)
    assert s["algorithm"] == "gspo" and s["steps"] == 2
