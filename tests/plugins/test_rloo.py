"""RLOO (docs/algorithms.md §6.1): the leave-one-out advantages, the KL penalty in the
reward and the clipped sequence loss against TRL 1.16's RLOOTrainer (its advantage code
in ``_generate_and_score_completions`` and its ``_compute_loss``, through stubs, to 1e-6)
and against hand computations; end to end on the tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gym_core.api import Rollout, StepTotals, compose
from gym_core.train.job import run_job
from gym_rloo.rloo import RLOO, leave_one_out_advantages, rloo_sequence_loss, sequence_kl

N, T, K = 8, 5, 4
_g = torch.Generator().manual_seed(0)
LENGTHS = torch.tensor([5, 3, 1, 4, 5, 2, 2, 5])
MASK = (torch.arange(T)[None] < LENGTHS[:, None]).float()
OLD = (torch.randn(N, T, generator=_g) * 0.5 - 1.0) * MASK
REF = (OLD + 0.3 * torch.randn(N, T, generator=_g)) * MASK
LP = (OLD + 0.2 * torch.randn(N, T, generator=_g)) * MASK


class StubPolicy:
    def __init__(self, logp, ref_logp):
        self.logp, self.ref_logp = logp, ref_logp

    def logprobs(self, batch, *, reference=False, detached=None, heads=False):
        return self.ref_logp if reference else self.logp


def rollout(rewards, mask=MASK, scorable=None, k=K):
    n, c = mask.shape
    return Rollout(prompt_ids=torch.zeros(n // k, 1, dtype=torch.long),
                   prompt_mask=torch.ones(n // k, 1, dtype=torch.long),
                   completion_ids=torch.zeros(n, c, dtype=torch.long), completion_mask=mask,
                   truncated=torch.zeros(n, dtype=torch.bool), rewards=rewards, group_size=k,
                   examples=[{}] * n, completions=[""] * n, scorable=scorable)


def rloo(overrides, policy):
    cfg = compose(["algorithm=rloo", f"algorithm.num_generations={K}", *overrides])
    return RLOO(cfg.algorithm, policy)


def gym_advantages(rewards_per_func, weights, overrides):
    """What gym's RLOO prepares from the same rewards: the rollout engine's weighted sum
    (None as 0) and its scorable mask, then prepare and prepare_step."""
    batch = rollout((torch.nan_to_num(rewards_per_func) * torch.tensor(weights)).sum(1),
                    scorable=~torch.isnan(rewards_per_func).all(1))
    algo = rloo(overrides, StubPolicy(OLD, REF))
    algo.prepare(batch)
    algo.prepare_step([batch])
    return batch.extras["advantages"]


REWARDS = torch.rand(N, 2, generator=_g)
REWARDS[1, :] = float("nan")  # no function scored completion 1
REWARDS[2, 0] = float("nan")  # only the second scored completion 2
ONE_SCORED = REWARDS.clone()
ONE_SCORED[4:7, :] = float("nan")  # group 2 has a single scorable completion


@pytest.mark.parametrize("rewards,beta,clip,normalize,estimator", [
    (REWARDS, 0.05, None, False, "k1"), (REWARDS, 0.0, None, False, "k1"),
    (REWARDS, 0.3, [0.2, 0.7], False, "k1"), (REWARDS, 0.05, None, True, "k1"),
    (ONE_SCORED, 0.05, None, True, "k1"), (ONE_SCORED, 0.1, [0.0, 0.5], False, "k1"),
])
def test_advantages_match_trl(rewards, beta, clip, normalize, estimator):
    pytest.importorskip("trl")
    from tests.trl_stubs import trl_rloo_advantages

    weights = [1.0, 0.5]
    theirs = trl_rloo_advantages(rewards, weights, OLD, REF, LENGTHS, k=K, beta=beta,
                                 reward_clip_range=clip, normalize_advantages=normalize)
    overrides = [f"algorithm.beta={beta}", f"algorithm.normalize_advantages={normalize}",
                 f"algorithm.kl_estimator={estimator}"]
    if clip is not None:
        overrides.append(f"algorithm.reward_clip_range=[{clip[0]},{clip[1]}]")
    mine = gym_advantages(rewards, weights, overrides)
    assert (mine - theirs).abs().max().item() < 1e-6
    assert mine[1] == 0 and mine.abs().max() > 0


@pytest.mark.parametrize("old", ["off-policy", "on-policy"])
@pytest.mark.parametrize("eps,eps_high", [(0.2, None), (0.2, 0.28), (0.05, 0.05)])
def test_loss_matches_trl(old, eps, eps_high):
    pytest.importorskip("trl")
    from tests.trl_stubs import trl_rloo_loss

    adv = torch.tensor([1.0, -0.5, 0.7, -1.2, 0.0, 0.4, -0.3, 0.9])
    old_lp = OLD if old == "off-policy" else LP
    theirs, g_theirs = trl_rloo_loss(LP, old_lp, adv, MASK, eps=eps, eps_high=eps_high)
    # gym's RLOO.loss on two micro-batches of one step
    lp = LP.clone().requires_grad_(True)
    overrides = [f"algorithm.epsilon={eps}"] + (
        [f"algorithm.epsilon_high={eps_high}"] if eps_high is not None else [])
    total = 0.0
    for half in (slice(0, 4), slice(4, 8)):
        batch = rollout(torch.zeros(4), MASK[half])
        batch.extras.update(advantages=adv[half], loss_mask=MASK[half])
        if old == "off-policy":
            batch.extras["old_logp"] = OLD[half]
        loss, _ = rloo(overrides, StubPolicy(lp[half], None)).loss(
            batch, StepTotals(sequences=N, tokens=int(MASK.sum()), micro_batches=2))
        total = total + loss
    (grad,) = torch.autograd.grad(total, lp)
    assert abs(total.item() - theirs.item()) < 1e-6
    # TRL's stub log-probs are 0 off the mask; compare the completion tokens
    assert ((grad - g_theirs) * MASK).abs().max().item() < 1e-6
    assert grad.abs().max() > 0


def test_leave_one_out_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 5.0, 3.0])
    # group 1: baselines 0, 1/3, 1/3, 1/3; group 2: (2+5+3)/3, (2+5+3)/3, 7/3, 9/3
    expected = [1.0, -1 / 3, -1 / 3, -1 / 3, 2 - 10 / 3, 2 - 10 / 3, 5 - 7 / 3, 3 - 3.0]
    assert leave_one_out_advantages(r, 4).tolist() == pytest.approx(expected)
    # equivalently A_i = k / (k - 1) * (r_i - mean) when all are scorable
    g = r.view(2, 4)
    assert leave_one_out_advantages(r, 4).tolist() == pytest.approx(
        (4 / 3 * (g - g.mean(1, keepdim=True))).reshape(-1).tolist())
    # completion 1 unscorable: the others' baselines average the remaining two; a group
    # with one scorable completion has no baseline (NaN, advantage 0 after prepare)
    scorable = torch.tensor([True, False, True, True, True, False, False, False])
    adv = leave_one_out_advantages(r, 4, scorable)
    assert adv[[0, 2, 3]].tolist() == pytest.approx([1.0, -0.5, -0.5])
    assert torch.isnan(adv[[1, 4, 5, 6, 7]]).all()


def test_kl_estimators_by_hand():
    old = torch.tensor([[-1.0, -2.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert sequence_kl(old, ref, mask, "k1").item() == pytest.approx(0.5 - 1.0)
    k3 = sum(math.exp(x) - x - 1 for x in (-0.5, 1.0))
    assert sequence_kl(old, ref, mask, "k3").item() == pytest.approx(k3)


def test_kl_penalty_enters_the_reward_by_hand():
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    old = torch.tensor([[-1.0, -1.0], [-2.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.5], [-1.0, 0.0]])
    batch = rollout(torch.tensor([1.0, 0.0]), mask, k=2)
    algo = rloo(["algorithm.num_generations=2", "algorithm.beta=0.5"], StubPolicy(old, ref))
    algo.prepare(batch)
    # k1 sums: 1.0 and -1.0; penalised rewards 1 - 0.5 = 0.5 and 0 + 0.5 = 0.5: no signal
    assert batch.extras["kl_sum"].tolist() == [1.0, -1.0]
    assert batch.extras["advantages"].tolist() == [0.0, 0.0]


def test_sequence_loss_by_hand():
    lp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -1.2]])  # rho = e^0.4 ~ 1.49: clipped above for A > 0
    loss, low, high = rloo_sequence_loss(lp, old, torch.tensor([2.0]), torch.ones(1, 2), 0.2, 0.2)
    assert loss.item() == pytest.approx(-1.2 * 2.0) and high.item() == 1.0
    loss.sum().backward()
    assert lp.grad.abs().sum() == 0
    # A < 0 keeps the unclipped ratio (pessimistic): d/dlp_t = -A rho for every token
    lp.grad = None
    loss, low, high = rloo_sequence_loss(lp, old, torch.tensor([-2.0]), torch.ones(1, 2), 0.2, 0.2)
    assert loss.item() == pytest.approx(2.0 * math.exp(0.4), rel=1e-6)
    loss.sum().backward()
    assert lp.grad[0].tolist() == pytest.approx([2.0 * math.exp(0.4)] * 2, rel=1e-6)


def test_rloo_end_to_end(tmp_path, tiny_overrides, with_digit_reward):
    s = run_job(compose([*tiny_overrides, "algorithm=rloo", "algorithm.rewards=[digit_share]",
                         "algorithm.lr=1e-2", "trainer.max_steps=2", "trainer.grad_accum=2",
                         "algorithm.normalize_advantages=true", "algorithm.num_iterations=2"]),
                run_dir=tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert s["steps"] == 2 and s["algorithm"] == "rloo"
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # LoRA starts at the reference
    assert rows[1]["kl"] != 0.0 and rows[1]["advantage_abs_mean"] > 0


def episode_batch():
    """Two episodes of one prompt (k = 2), turns separated by environment tokens (action
    mask 0): episode 0 has turns 0 and 1 with rewards [0.5, 1.0] (G = [1.5, 1.0]),
    episode 1 one turn with reward 0 (G = [0.0])."""
    act = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.float32)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.float32)
    turn = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, -1, -1, -1]])
    returns = torch.tensor([[1.5, 1.5, 0, 0, 1.0, 1.0], [0.0, 0.0, 0.0, 0, 0, 0]])
    b = rollout(torch.tensor([1.5, 0.0]), mask=mask, k=2)
    b.action_mask, b.turn_index, b.token_returns = act, turn, returns
    return b


def test_turn_level_returns_by_hand():
    """Multi-turn episodes (docs/agents.md): turn k's advantage is the episode's
    leave-one-out advantage shifted by G_k - G_0, environment tokens get none, and each
    turn has its own clipped ratio; on-policy the gradient is REINFORCE with each turn's
    return."""
    b = episode_batch()
    lp = torch.tensor([[-1.0, -1.0, -5.0, -5.0, -1.0, -1.0], [-2.0, -2.0, -2.0, 0, 0, 0]])
    old = lp - torch.tensor([[0.05, 0.05, 0.0, 0.0, 0.3, 0.3], [0.0, 0.0, 0.0, 0, 0, 0]])
    algo = RLOO(compose(["algorithm=rloo", "algorithm.num_generations=2",
                         "algorithm.beta=0", "algorithm.num_iterations=2"]).algorithm,
                StubPolicy(old, None))
    algo.prepare(b)
    algo.prepare_step([b])
    # LOO: 1.5 - 0 = 1.5 and 0 - 1.5 = -1.5; turn 1 of episode 0: 1.5 + (1.0 - 1.5) = 1.0
    assert b.extras["token_advantages"].tolist() == [[1.5, 1.5, 0, 0, 1.0, 1.0],
                                                     [-1.5, -1.5, -1.5, 0, 0, 0]]
    lp = lp.clone().requires_grad_(True)
    algo.policy = StubPolicy(lp, None)
    loss, _ = algo.loss(b, StepTotals(sequences=2, tokens=7, micro_batches=1))
    # turn ratios: e^0.1 (inside 1 +- 0.2), e^0.6 (clipped at 1.2, A > 0), 1
    want = (-(math.exp(0.1) * 1.5) - 1.2 * 1.0 + 1.5) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    g = lp.grad
    assert g[0, :2].tolist() == pytest.approx([-math.exp(0.1) * 1.5 / 2] * 2, rel=1e-6)
    assert g[0, 2:].abs().sum() == 0  # environment tokens and the clipped turn: none
    assert g[1, :3].tolist() == pytest.approx([1.5 / 2] * 3)


def test_turn_level_loss_on_policy_is_reinforce_with_turn_returns():
    b = episode_batch()
    algo = RLOO(compose(["algorithm=rloo", "algorithm.num_generations=2",
                         "algorithm.beta=0"]).algorithm, None)
    lp = torch.tensor([[-1.0, -1.0, -5.0, -5.0, -1.0, -1.0], [-2.0, -2.0, -2.0, 0, 0, 0]],
                      requires_grad=True)
    algo.policy = StubPolicy(lp, None)
    algo.prepare(b)
    algo.prepare_step([b])
    loss, _ = algo.loss(b, StepTotals(sequences=2, tokens=7, micro_batches=1))
    loss.backward()
    # d/dlp_t = -A_{turn(t)} / sequences on the model's tokens
    want = -b.extras["token_advantages"] * b.action_mask / 2
    assert torch.allclose(lp.grad, want)


def test_one_turn_episodes_keep_the_sequence_loss():
    """turn_index all 0: the per-turn loss is the sequence loss."""
    adv = torch.tensor([0.7, -0.4, 1.1, 0.0, -2.0, 0.3, 0.5, -0.1])
    seq, low, high = rloo_sequence_loss(LP, OLD, adv, MASK, 0.2, 0.28)
    turns = torch.where(MASK.bool(), 0, -1)
    tok = adv.unsqueeze(1) * MASK
    per_turn, low_t, high_t = rloo_sequence_loss(LP, OLD, tok, MASK, 0.2, 0.28, turn_index=turns)
    assert torch.allclose(seq, per_turn) and torch.equal(low, low_t) and torch.equal(high, high_t)
