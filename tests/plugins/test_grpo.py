"""GRPO's advantages and loss against hand computations (docs/algorithms.md §1)."""

from __future__ import annotations

import math

import pytest
import torch

from gym_core.sampling.rollout import Rollout
from gym_core.train.losses import StepTotals, aggregate_token_loss, k3_kl
from gym_core.train.policy_gradient import group_advantages
from gym_grpo.grpo import grpo_token_loss


def make_rollout(rewards, group_size):
    n = len(rewards)
    return Rollout(
        prompt_ids=torch.zeros(n // group_size, 1, dtype=torch.long),
        prompt_mask=torch.ones(n // group_size, 1, dtype=torch.long),
        completion_ids=torch.zeros(n, 3, dtype=torch.long),
        completion_mask=torch.ones(n, 3, dtype=torch.long),
        truncated=torch.zeros(n, dtype=torch.bool),
        rewards=torch.tensor(rewards, dtype=torch.float32),
        group_size=group_size,
        examples=[{}] * n,
        completions=[""] * n,
    )


REWARDS = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0]  # two groups of 4


def hand_std(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))  # Bessel, as TRL


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_hand_computation(scale):
    adv = group_advantages(make_rollout(REWARDS, 4), scale)
    g1, g2 = REWARDS[:4], REWARDS[4:]
    expected = []
    for group in (g1, g2):
        mean = sum(group) / 4
        for r in group:
            if scale == "group":
                expected.append((r - mean) / (hand_std(group) + 1e-4))
            elif scale == "batch":
                expected.append((r - mean) / (hand_std(REWARDS) + 1e-4))
            else:
                expected.append(r - mean)
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    # group 1: one right of four -> mean 0.25; the right answer gets +0.75 (unscaled)
    if scale == "none":
        assert adv[0].item() == pytest.approx(0.75)


def test_identical_rewards_give_zero_advantage_not_nan():
    adv = group_advantages(make_rollout([1.0, 1.0, 0.0, 0.0], 2), "group")
    assert torch.all(adv == 0)


def test_token_loss_clipping_matches_hand_computation():
    # one sequence with A = +1 and one with A = -1; three tokens each
    logp = torch.log(torch.tensor([[0.5, 0.9, 0.3], [0.5, 0.1, 0.3]]))
    old = torch.log(torch.tensor([[0.5, 0.6, 0.3], [0.5, 0.2, 0.3]]))
    adv = torch.tensor([1.0, -1.0])
    loss, info = grpo_token_loss(logp, old, adv, epsilon_low=0.2, epsilon_high=0.28)
    # ratios: [1, 1.5, 1] and [1, 0.5, 1]
    # A=+1: -min(1.5, 1.28) = -1.28 at t=1 (clipped high)
    # A=-1: -min(-0.5, -0.8) = 0.8 at t=1 (clipped low: 0.5 < 0.8)
    expected = torch.tensor([[-1.0, -1.28, -1.0], [1.0, 0.8, 1.0]])
    assert torch.allclose(loss, expected, atol=1e-6)
    assert info["high_clipped"].tolist() == [[0, 1, 0], [0, 0, 0]]
    assert info["low_clipped"].tolist() == [[0, 0, 0], [0, 1, 0]]


def test_unclipped_side_keeps_ratio():
    # A > 0 and ratio below 1 - eps: min picks the unclipped ratio (pessimistic bound)
    logp, old = torch.log(torch.tensor([[0.1]])), torch.log(torch.tensor([[0.5]]))
    loss, info = grpo_token_loss(logp, old, torch.tensor([2.0]), 0.2, 0.2)
    assert loss.item() == pytest.approx(-0.2 * 2.0)
    assert info["low_clipped"].item() == 0 and info["high_clipped"].item() == 0


def test_k3_kl_matches_formula_and_enters_loss_with_beta():
    logp = torch.log(torch.tensor([[0.5, 0.2]]))
    ref = torch.log(torch.tensor([[0.4, 0.2]]))
    r = 0.4 / 0.5
    assert k3_kl(logp, ref)[0, 0].item() == pytest.approx(r - math.log(r) - 1, abs=1e-7)
    assert k3_kl(logp, ref)[0, 1].item() == pytest.approx(0.0, abs=1e-7)
    loss0, _ = grpo_token_loss(logp, logp, torch.tensor([0.5]), 0.2, 0.2)
    loss1, info = grpo_token_loss(logp, logp, torch.tensor([0.5]), 0.2, 0.2, 0.04, ref)
    assert torch.allclose(loss1 - loss0, 0.04 * info["kl"])


# per-token losses of 3 sequences with masks of length 3, 1 and 2, split over 2 micro-batches
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [5.0, 6.0, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])


@pytest.mark.parametrize(
    "loss_type,expected",
    [
        # mean over sequences of per-sequence token means
        ("grpo", ((1 + 2 + 3) / 3 + 4 / 1 + (5 + 6) / 2) / 3),
        # per micro-batch token mean, averaged over the 2 micro-batches
        ("bnpo", ((1 + 2 + 3 + 4) / 4 + (5 + 6) / 2) / 2),
        # constant budget: 3 sequences x max length 4
        ("dr_grpo", (1 + 2 + 3 + 4 + 5 + 6) / (3 * 4)),
        # all tokens of the step
        ("dapo", (1 + 2 + 3 + 4 + 5 + 6) / 6),
    ],
)
def test_loss_aggregation_over_micro_batches(loss_type, expected):
    totals = StepTotals(sequences=3, tokens=6, micro_batches=2)
    parts = [
        aggregate_token_loss(PER_TOKEN[:2], MASK[:2], loss_type, totals, max_completion_length=4),
        aggregate_token_loss(PER_TOKEN[2:], MASK[2:], loss_type, totals, max_completion_length=4),
    ]
    assert sum(p.item() for p in parts) == pytest.approx(expected)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_grpo_gradient_on_tiny_model_moves_towards_rewarded_completion(seed):
    """Small GRPO steps raise the log-prob of the rewarded completion and lower the other."""
    from omegaconf import OmegaConf

    from gym_core.config.schema import ModelConfig
    from gym_core.model.policy import load_policy
    from gym_grpo import GRPOConfig
    from gym_grpo.grpo import GRPO

    torch.manual_seed(seed)  # the adapter's initialisation
    policy = load_policy(OmegaConf.structured(ModelConfig(source="tiny")), torch.device("cpu"))
    cfg = OmegaConf.structured(GRPOConfig(num_generations=2, lr=1e-2, scale_rewards="none"))
    algo = GRPO(cfg, policy)
    batch = Rollout(
        prompt_ids=torch.tensor([[10, 11]]), prompt_mask=torch.ones(1, 2, dtype=torch.long),
        completion_ids=torch.tensor([[12, 13], [14, 15]]),
        completion_mask=torch.ones(2, 2, dtype=torch.long),
        truncated=torch.zeros(2, dtype=torch.bool), rewards=torch.tensor([1.0, 0.0]),
        group_size=2, examples=[{}, {}], completions=["", ""],
    )
    algo.prepare(batch)
    before = policy.logprobs(batch).sum(1)
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        loss, _ = algo.loss(batch, algo.step_totals([batch]))
        loss.backward()
        opt.step()
    after = policy.logprobs(batch).sum(1)
    assert after[0] > before[0] and after[1] < before[1]


def test_unscorable_completions_leave_the_statistics_and_get_zero_advantage():
    """A completion every reward function returned None for (Rollout.scorable False) is
    left out of its group's mean and std and gets advantage 0, as in TRL (§1.1)."""
    batch = make_rollout([1.0, 0.0, 0.0, 5.0, 1.0, 0.0, 0.0, 0.0], 4)
    batch.scorable = torch.tensor([True, True, True, False, True, False, False, False])
    adv = group_advantages(batch, "group")
    kept = [1.0, 0.0, 0.0]
    mean = sum(kept) / 3
    assert adv[:3].tolist() == pytest.approx([(r - mean) / (hand_std(kept) + 1e-4) for r in kept],
                                             abs=1e-6)
    # the unscorable row, and a group with one scorable row (no std): 0
    assert adv[3:].tolist() == [0.0] * 5


def test_batch_scaling_spans_the_whole_step():
    """scale_rewards=batch divides by the std of every reward of the step (all micro-batches,
    all ranks), not of one micro-batch."""
    from omegaconf import OmegaConf

    from gym_grpo import GRPOConfig
    from gym_grpo.grpo import GRPO

    cfg = OmegaConf.structured(GRPOConfig(num_generations=4, scale_rewards="batch"))
    algo = GRPO(cfg, policy=None)
    batches = [make_rollout(REWARDS[:4], 4), make_rollout(REWARDS[4:], 4)]
    for b in batches:
        algo.prepare(b)
    algo.prepare_step(batches)
    got = torch.cat([b.extras["advantages"] for b in batches])
    assert got.tolist() == pytest.approx(group_advantages(make_rollout(REWARDS, 4), "batch").tolist(),
                                         abs=1e-6)
