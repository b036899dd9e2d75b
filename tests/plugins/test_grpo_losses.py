"""Every GRPO-family loss type against TRL 1.16's own loss code (GRPOTrainer._compute_loss,
GMPOTrainer._compute_loss, through stubs, value and gradient to 1e-6) and against hand
computations on small tensors (docs/algorithms.md §1-2)."""

from __future__ import annotations

import math

import pytest
import torch

from gym_core.train.job import run_job
from gym_core.train.losses import StepTotals, aggregate_token_loss, k3_kl
from gym_grpo.grpo import NORMALISER, gmpo_loss, grpo_token_loss
from tests.conftest import compose

pytest.importorskip("trl")
from tests.trl_stubs import trl_gmpo_loss, trl_grpo_loss  # noqa: E402

# two micro-batches of 4 completions, 5 token slots; row 5 has a single token, row 3 none
G = torch.Generator().manual_seed(0)
B, T, LMAX = 8, 5, 7
MASK = torch.ones(B, T)
MASK[1, 3:] = 0
MASK[3, :] = 0
MASK[5, 1:] = 0
MASK[6, 4:] = 0
LP = torch.randn(B, T, generator=G) * 0.5 - 1.5
OLD = LP + 0.3 * torch.randn(B, T, generator=G)
REF = LP + 0.2 * torch.randn(B, T, generator=G)
ADV = torch.tensor([1.0, -0.5, 0.7, -1.2, 0.0, 0.4, -0.3, 0.9])
HALVES = (slice(0, 4), slice(4, 8))


def gym_step(loss_type, *, old=OLD, level="token", beta=0.0, delta=None, eps=0.2,
             eps_high=None, bias=True, sapo=(1.0, 1.05), vespo=(2.0, 3.0, 3.0, 2.0)):
    """gym's loss over a step of two micro-batches and its gradient: the sum of each
    micro-batch's share (grpo_token_loss, then the core's normaliser)."""
    lp = LP.clone().requires_grad_(True)
    eps_high = eps if eps_high is None else eps_high
    totals = StepTotals(sequences=B, tokens=int(MASK.sum()), micro_batches=2)
    total = 0.0
    for h in HALVES:
        o = lp[h].detach() if old is None else old[h]
        if loss_type == "gmpo":
            per_seq, _ = gmpo_loss(lp[h], o, ADV[h], MASK[h], eps, eps_high, beta, REF[h])
            total = total + per_seq.sum() / totals.sequences
            continue
        per_token, _ = grpo_token_loss(
            lp[h], o, ADV[h], eps, eps_high, beta, REF[h], mask=MASK[h], loss_type=loss_type,
            level=level, delta=delta, bias_correction_kl=bias, sapo_temperatures=sapo,
            vespo=vespo)
        total = total + aggregate_token_loss(per_token, MASK[h], NORMALISER[loss_type], totals,
                                             LMAX)
    (grad,) = torch.autograd.grad(total, lp)
    return total.detach(), grad


def trl_step(loss_type, *, old=OLD, level="token", beta=0.0, delta=None, eps=0.2,
             eps_high=None, bias=True, sapo=(1.0, 1.05), vespo=(2.0, 3.0, 3.0, 2.0)):
    """TRL over the same two micro-batches (GA = 2, one generation per step, so
    num_items_in_batch is the step's token count): summed losses, concatenated grads."""
    values, grads = [], []
    for h in HALVES:
        o = None if old is None else old[h]
        if loss_type == "gmpo":
            v, g = trl_gmpo_loss(LP[h], o, REF[h], ADV[h], MASK[h], beta=beta, eps=eps,
                                 eps_high=eps_high, ga=2)
        else:
            v, g = trl_grpo_loss(LP[h], o, REF[h], ADV[h], MASK[h], loss_type=loss_type,
                                 level=level, beta=beta, delta=delta, eps=eps,
                                 eps_high=eps_high, bias_correction_kl=bias, ga=2,
                                 num_items=MASK.sum(), max_completion_length=LMAX, sapo=sapo,
                                 vespo=vespo)
        values.append(v)
        grads.append(g)
    return sum(values), torch.cat(grads)


TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]
CASES = []
for lt in TYPES:
    CASES += [dict(loss_type=lt), dict(loss_type=lt, beta=0.04),
              dict(loss_type=lt, beta=0.04, bias=False), dict(loss_type=lt, old=None, beta=0.1)]
    if lt != "vespo":  # TRL requires token-level ratios for VESPO
        CASES.append(dict(loss_type=lt, level="sequence", beta=0.1, eps=0.1, eps_high=0.12))
    if lt in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        CASES.append(dict(loss_type=lt, delta=1.3, eps_high=0.28))
        CASES.append(dict(loss_type=lt, level="sequence", delta=1.1, eps=0.05,
                          eps_high=0.05))
CASES += [dict(loss_type="cispo", eps_high=5.0), dict(loss_type="cispo", eps_high=1.1),
          dict(loss_type="sapo", sapo=(0.5, 2.0)),
          dict(loss_type="vespo", vespo=(1.0, 0.5, 4.0, 1.5)),
          dict(loss_type="gmpo"), dict(loss_type="gmpo", beta=0.05),
          dict(loss_type="gmpo", eps=0.1, eps_high=0.2), dict(loss_type="gmpo", old=None)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()
                                                                 if k != "old") +
                         (",on-policy" if "old" in c else ""))
def test_matches_trl(case):
    mine, g_mine = gym_step(**case)
    theirs, g_theirs = trl_step(**case)
    assert abs(mine.item() - theirs.item()) < 1e-6
    assert (g_mine - g_theirs).abs().max().item() < 1e-6
    assert g_mine.abs().max() > 0  # a case that moves nothing would prove nothing


# ------------------------------------------------------------------ hand computations

def one(values):
    return torch.tensor([values], dtype=torch.float32)


def test_cispo_by_hand():
    # ratios 2 and 1; the weight is capped at epsilon_high = 1.5 itself (not 1 + 1.5)
    lp = torch.log(one([0.5, 0.2])).requires_grad_(True)
    old = torch.log(one([0.25, 0.2]))
    loss, info = grpo_token_loss(lp, old, torch.tensor([2.0]), 0.2, 1.5, loss_type="cispo")
    expected = [-1.5 * 2 * math.log(0.5), -1.0 * 2 * math.log(0.2)]
    assert loss[0].tolist() == pytest.approx(expected, rel=1e-6)
    loss.sum().backward()  # the weight is detached: d/dlp = -w A
    assert lp.grad[0].tolist() == pytest.approx([-3.0, -2.0])
    assert info["high_clipped"][0].tolist() == [1.0, 0.0]


def test_sapo_by_hand():
    # on-policy (r = 1) the value is -2A/tau and the gradient that of -r A
    lp = torch.log(one([0.5])).requires_grad_(True)
    loss, _ = grpo_token_loss(lp, lp.detach(), torch.tensor([1.5]), 0.2, 0.2, loss_type="sapo")
    assert loss.item() == pytest.approx(-2 * 1.5 / 1.0)
    loss.sum().backward()
    assert lp.grad.item() == pytest.approx(-1.5)
    # negative advantage, r = 2, tau_neg = 1.05: -sigmoid(1.05) * 4 / 1.05 * A
    loss, _ = grpo_token_loss(torch.log(one([0.4])), torch.log(one([0.2])), torch.tensor([-1.0]),
                              0.2, 0.2, loss_type="sapo")
    s = 1 / (1 + math.exp(-1.05))
    assert loss.item() == pytest.approx(s * 4 / 1.05, rel=1e-6)


def test_luspo_normaliser_weights_sequences_by_length():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out = aggregate_token_loss(per_token, mask, "luspo", StepTotals(4, 9, 2), 8)
    assert out.item() == pytest.approx((6.0 + 4.0) / 4)  # sum per sequence, mean over the step's 4


def test_vespo_by_hand():
    # sequence log-ratio S = 0.3 - 0.1 = 0.2, A > 0 (k 2, lambda 3):
    # phi = exp(3 + 2 * 0.2 - 3 * e^0.2), loss -phi A lp per token, phi without gradient
    old = one([-1.0, -2.0])
    lp = (old + one([0.3, -0.1])).requires_grad_(True)
    loss, _ = grpo_token_loss(lp, old, torch.tensor([0.5]), 0.2, 0.2, loss_type="vespo")
    phi = math.exp(3 + 2 * 0.2 - 3 * math.exp(0.2))
    assert loss[0].tolist() == pytest.approx([-phi * 0.5 * -0.7, -phi * 0.5 * -2.1], rel=1e-6)
    loss.sum().backward()
    assert lp.grad[0].tolist() == pytest.approx([-phi * 0.5] * 2, rel=1e-6)
    # on-policy w = 1 gives phi = e^lam e^-lam = 1 for either sign
    loss, _ = grpo_token_loss(old, old, torch.tensor([-2.0]), 0.2, 0.2, loss_type="vespo")
    assert loss[0].tolist() == pytest.approx([2.0 * -1.0, 2.0 * -2.0])


def test_two_sided_clipping_by_hand():
    # A < 0 and r = 2: the clip range alone gives |A| max(r, 1.2) = 2; delta 1.5 caps it
    lp = torch.log(one([0.4])).requires_grad_(True)
    old = torch.log(one([0.2]))
    plain, _ = grpo_token_loss(lp, old, torch.tensor([-1.0]), 0.2, 0.2)
    capped, _ = grpo_token_loss(lp, old, torch.tensor([-1.0]), 0.2, 0.2, delta=1.5)
    assert plain.item() == pytest.approx(2.0) and capped.item() == pytest.approx(1.5)
    capped.sum().backward()
    assert lp.grad.item() == 0.0  # constant once r > delta
    # A > 0: delta never binds above 1 + eps_high
    up, _ = grpo_token_loss(lp.detach(), old, torch.tensor([1.0]), 0.2, 0.2, delta=1.5)
    assert up.item() == pytest.approx(-1.2)


def test_gmpo_by_hand():
    old = one([-1.0, -1.0])
    lp = old + one([0.5, -0.1])  # token log-ratios 0.5 and -0.1; clip to [-0.4, 0.4]
    mask = torch.ones(1, 2)
    pos, _ = gmpo_loss(lp, old, torch.tensor([2.0]), mask, 0.4, 0.4)
    neg, _ = gmpo_loss(lp, old, torch.tensor([-2.0]), mask, 0.4, 0.4)
    # A > 0 keeps min(lr, clip) = [0.4, -0.1]; A < 0 keeps max(lr, clip) = [0.5, -0.1]
    assert pos.item() == pytest.approx(-math.exp(0.15) * 2.0, rel=1e-6)
    assert neg.item() == pytest.approx(math.exp(0.2) * 2.0, rel=1e-6)


def test_bias_corrected_kl_gradient_by_hand():
    """beta k3 r on-policy: the same value as plain k3, gradient d/dlp(k3) + k3 (§1.3)."""
    lp = torch.log(one([0.5])).requires_grad_(True)
    ref = torch.log(one([0.4]))
    adv = torch.tensor([0.0])  # only the KL term remains
    k3 = (0.8 - math.log(0.8) - 1)
    grads = {}
    for bias in (True, False):
        x = lp.detach().clone().requires_grad_(True)
        loss, _ = grpo_token_loss(x, x.detach(), adv, 0.2, 0.2, 1.0, ref, bias_correction_kl=bias)
        assert loss.item() == pytest.approx(k3, rel=1e-6)
        loss.sum().backward()
        grads[bias] = x.grad.item()
    assert grads[False] == pytest.approx(1 - 0.8, rel=1e-6)  # d k3 / d lp = 1 - e^(ref - lp)
    assert grads[True] == pytest.approx(1 - 0.8 + k3, rel=1e-6)
    assert k3_kl(lp, ref).item() == pytest.approx(k3, rel=1e-6)


# ------------------------------------------------------------------ end to end

@pytest.mark.parametrize("overrides", [
    ["algorithm.loss_type=cispo", "algorithm.epsilon_high=5.0"],
    ["algorithm.loss_type=sapo"], ["algorithm.loss_type=luspo"],
    ["algorithm.loss_type=vespo", "algorithm.num_iterations=2"],
    ["algorithm=gmpo", "algorithm.beta=0.04"], ["algorithm=cispo"],
    ["algorithm.delta=1.5", "algorithm.num_iterations=2"],
    ["algorithm.loss_type=luspo", "algorithm.importance_sampling_level=sequence"],
], ids=lambda o: " ".join(o))
def test_loss_types_train_on_the_tiny_model(tmp_path, tiny_overrides, with_digit_reward,
                                             overrides):
    s = run_job(compose([*tiny_overrides, "algorithm.rewards=[digit_share]", "algorithm.lr=1e-2",
                         "trainer.max_steps=2", "trainer.eval_before=false", *overrides]),
                run_dir=tmp_path)
    assert s["steps"] == 2


@pytest.mark.parametrize("overrides,message", [
    (["algorithm.loss_type=cispo"], "set algorithm.epsilon_high"),
    (["algorithm.loss_type=nope"], "algorithm.loss_type='nope' is not one of"),
    (["algorithm.importance_sampling_level=seq"], "importance_sampling_level='seq'"),
])
def test_bad_options_are_one_line_errors(tmp_path, tiny_overrides, overrides, message):
    from gym_core.base.errors import GymError

    with pytest.raises(GymError, match=message):
        run_job(compose([*tiny_overrides, "trainer.max_steps=1", *overrides]), run_dir=tmp_path)


def test_a_delta_inside_the_clip_range_is_warned_about(tmp_path, tiny_overrides):
    with pytest.warns(UserWarning, match=r"delta=1.1 is not above 1 \+ epsilon_high"):
        run_job(compose([*tiny_overrides, "trainer.max_steps=1", "algorithm.delta=1.1",
                         "trainer.eval_before=false"]), run_dir=tmp_path)
