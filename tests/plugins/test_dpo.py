"""DPO: each loss type against a hand computation and against TRL's own code."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gym_core.train.job import run_job
from gym_dpo.dpo import dpo_loss
from tests.conftest import compose

LOGPS = dict(chosen=torch.tensor([-10.0, -12.0]), rejected=torch.tensor([-11.0, -9.0]),
             ref_chosen=torch.tensor([-10.5, -11.0]), ref_rejected=torch.tensor([-10.0, -10.0]),
             len_chosen=torch.tensor([4.0, 2.0]), len_rejected=torch.tensor([5.0, 3.0]))


def offline(overrides):
    """The tiny-model overrides without the online methods' rollout settings."""
    return [o for o in overrides if not o.startswith("algorithm.")]


def ours(loss_type, beta=0.1, eps=0.0):
    d = LOGPS
    return dpo_loss(d["chosen"], d["rejected"], d["ref_chosen"], d["ref_rejected"], beta=beta,
                    loss_type=loss_type, label_smoothing=eps, chosen_len=d["len_chosen"],
                    rejected_len=d["len_rejected"])


def logsig(x):
    return -math.log1p(math.exp(-x))


# h = (chosen - ref_chosen) - (rejected - ref_rejected): pair 0: 0.5 - (-1) = 1.5;
# pair 1: -1 - 1 = -2
H = [1.5, -2.0]


@pytest.mark.parametrize(
    "loss_type,eps,expected",
    [
        ("sigmoid", 0.0, [-logsig(0.1 * h) for h in H]),
        ("sigmoid", 0.2, [-0.8 * logsig(0.1 * h) - 0.2 * logsig(-0.1 * h) for h in H]),  # cDPO
        ("robust", 0.2, [(-0.8 * logsig(0.1 * h) + 0.2 * logsig(-0.1 * h)) / 0.6 for h in H]),
        ("hinge", 0.0, [max(0.0, 1 - 0.1 * h) for h in H]),
        # per-token averaged log-ratios: pair 0: 0.5/4 - (-1)/5; pair 1: -1/2 - 1/3
        ("ipo", 0.0, [(0.5 / 4 + 1 / 5 - 5.0) ** 2, (-1 / 2 - 1 / 3 - 5.0) ** 2]),
    ],
)
def test_losses_match_hand_computation(loss_type, eps, expected):
    assert ours(loss_type, eps=eps).tolist() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("robust", 0.1), ("ipo", 0.0),
                                           ("hinge", 0.0)])
def test_losses_match_trl(loss_type, eps):
    pytest.importorskip("trl")
    from tests.trl_stubs import trl_dpo_loss

    g = torch.Generator().manual_seed(3)
    c, r, rc, rr = (torch.randn(6, generator=g) * 4 - 20 for _ in range(4))
    lc = torch.randint(1, 9, (6,), generator=g).float()
    lr = torch.randint(1, 9, (6,), generator=g).float()
    theirs = trl_dpo_loss(c, r, rc, rr, lc, lr, beta=0.2, loss_type=loss_type,
                          label_smoothing=eps)
    mine = dpo_loss(c, r, rc, rr, beta=0.2, loss_type=loss_type, label_smoothing=eps,
                    chosen_len=lc, rejected_len=lr).mean().item()
    assert mine == pytest.approx(theirs, abs=1e-6)


def test_dpo_end_to_end_on_tiny_model(tmp_path, tiny_overrides):
    """Four fixed pairs (also the test split, conversational rows among them): DPO must
    learn to prefer their chosen completions."""
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"What is {a} + 1?", "chosen": f"{a + 1}", "rejected": f"{a + 7}"}
            for a in range(3)]
    rows.append({"prompt": [{"role": "user", "content": "Say hi"}],
                 "chosen": [{"role": "assistant", "content": "hi"}],
                 "rejected": [{"role": "assistant", "content": "no"}]})
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = run_job(compose([*offline(tiny_overrides), "algorithm=dpo", "algorithm.lr=3e-2",
                         "data=jsonl", f"data.train_file={pairs}", f"data.test_file={pairs}",
                         "trainer.max_steps=8", "trainer.batch_size=4", "trainer.warmup_steps=0"]),
                run_dir=tmp_path / "run")
    assert s["eval"]["metric"] is None and s["eval"]["after"] is None  # no answers to verify
    metrics = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    margins = [m["rewards/margins"] for m in metrics]
    assert margins[0] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the start
    assert margins[-1] > 0.1 and metrics[-1]["rewards/accuracies"] == 1.0
    pref = s["eval"]["preference_accuracy"]
    assert pref["after"] == 1.0 and pref["after"] > pref["before"]


def test_dpo_rejects_data_without_pairs(tmp_path, tiny_overrides):
    from gym_core.base.errors import GymError

    train = tmp_path / "t.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"{i}?", "answer": i}) + "\n" for i in range(20)))
    with pytest.raises(GymError, match="needs preference pairs"):
        run_job(compose([*offline(tiny_overrides), "algorithm=dpo", "data=jsonl",
                         f"data.train_file={train}"]), run_dir=tmp_path / "r")


@pytest.mark.parametrize("algorithm", ["dpo", "kto"])
def test_offline_batches_render_the_system_prompt_as_evaluation_does(algorithm):
    """data.system_prompt reaches training batches exactly as it reaches rollouts and the
    held-out evaluation: the policy renders every prompt (before plugin API 2, DPO and KTO
    built their batches without it)."""
    import torch

    from gym_core.api import compose
    from gym_core.data.tasks import arithmetic_task, render_prompts
    from gym_core.model.policy import load_policy
    from gym_core.plugin.startup import bootstrap
    from gym_core.sampling.generation import Sampling

    system = "You are a careful calculator."
    cfg = compose(["model=tiny", f"algorithm={algorithm}", f"data.system_prompt={system}"])
    policy = load_policy(cfg.model, torch.device("cpu"), system_prompt=cfg.data.system_prompt)
    algo = bootstrap().component("algorithm", algorithm).load()(cfg.algorithm, policy)
    examples = arithmetic_task(cfg.data).train[:4]
    batch = algo.collate(examples)
    tok = policy.tokenizer
    shown = [tok.decode(ids[mask.bool()]) for ids, mask in zip(batch.prompt_ids, batch.prompt_mask)]
    expected = render_prompts(tok, [ex["prompt"] for ex in batch.examples], system)
    assert shown == expected
    assert all(system in text for text in shown)
    # and the evaluation's sampling path renders the same text
    out = policy.sample([examples[0]["prompt"]], max_new_tokens=1, sampling=Sampling(False))
    assert tok.decode(out.prompt_ids[0][out.prompt_mask[0].bool()]) == render_prompts(
        tok, [examples[0]["prompt"]], system)[0]


# --------------------------------------------------------------------------------------
# Every TRL 1.16 loss type, their weighted sums, f-divergences and LD-DPO: gym's DPO.loss
# (through a stub policy, two micro-batches) against TRL's DPOTrainer._compute_loss on the
# same per-token log-probs, value and gradient to 1e-6.

ALL_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
             "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
             "sigmoid_norm"]
PAIRS, WIDTH = 8, 6  # two micro-batches of 4 pairs
_g = torch.Generator().manual_seed(1)
# TRL's layout: the chosen rows, then the rejected rows; log-probs are 0 off the mask
TRL_MASK = torch.zeros(2 * PAIRS, WIDTH)
for _i, _n in enumerate(torch.randint(1, WIDTH + 1, (2 * PAIRS,), generator=_g).tolist()):
    TRL_MASK[_i, :_n] = 1
TRL_LP = (torch.randn(2 * PAIRS, WIDTH, generator=_g) * 0.7 - 2.0) * TRL_MASK
TRL_REF = (TRL_LP + 0.3 * torch.randn(2 * PAIRS, WIDTH, generator=_g)) * TRL_MASK


def to_gym(x):
    """TRL's [chosen...; rejected...] rows -> gym's rollout layout (chosen, rejected per pair)."""
    return torch.stack([x[:PAIRS], x[PAIRS:]], dim=1).reshape(2 * PAIRS, -1)


def to_trl(x):
    pairs = x.view(PAIRS, 2, -1)
    return torch.cat([pairs[:, 0], pairs[:, 1]])


class LogprobStub:
    """policy.logprobs for a given batch: fixed per-token log-probs (the leaf) and
    reference log-probs, by micro-batch."""

    device = torch.device("cpu")

    def __init__(self, lp, ref):
        self.lp, self.ref = lp, ref

    def logprobs(self, batch, *, reference=False, detached=None):
        rows = batch.rows
        return self.ref[rows] if reference else self.lp[rows]


def gym_dpo_step(overrides):
    from types import SimpleNamespace

    from gym_core.api import StepTotals, compose
    from gym_dpo.dpo import DPO

    cfg = compose(["algorithm=dpo", *overrides]).algorithm
    lp = to_gym(TRL_LP).clone().requires_grad_(True)
    algo = DPO(cfg, LogprobStub(lp, to_gym(TRL_REF)))
    mask = to_gym(TRL_MASK)
    totals = StepTotals(sequences=PAIRS, tokens=int(mask.sum()), micro_batches=2)
    total = 0.0
    for half in (range(0, 4), range(4, 8)):
        rows = [2 * p + k for p in half for k in (0, 1)]
        examples = [{"prompt": f"p{p}", "chosen": "c", "rejected": "r"} for p in half]
        batch = SimpleNamespace(rows=rows, completion_mask=mask[rows], examples=examples,
                                extras={})
        algo.prepare(batch)
        loss, _ = algo.loss(batch, totals)
        total = total + loss
    (grad,) = torch.autograd.grad(total, lp)
    return total.detach(), to_trl(grad)


def trl_dpo_step(types, weights=None, beta=0.1, eps=0.0, fdiv="reverse_kl", alpha=0.5,
                 tau=0.05, ld=None):
    from tests.trl_stubs import trl_dpo_token_loss

    value, grads = 0.0, torch.zeros_like(TRL_LP)
    for half in (range(0, 4), range(4, 8)):
        rows = [*half, *(PAIRS + p for p in half)]
        v, g = trl_dpo_token_loss(TRL_LP[rows], TRL_REF[rows], TRL_MASK[rows], beta=beta,
                                  loss_types=types, loss_weights=weights, label_smoothing=eps,
                                  f_divergence_type=fdiv, f_alpha_divergence_coef=alpha,
                                  discopop_tau=tau, ld_alpha=ld)
        value += v.item() / 2  # the Trainer divides DPO's loss by GA = 2
        grads[rows] = g / 2
    return value, grads


def overrides_of(types, weights=None, beta=0.1, eps=0.0, fdiv="reverse_kl", alpha=0.5, tau=0.05,
                 ld=None):
    out = [f"algorithm.loss_type=[{','.join(types)}]", f"algorithm.beta={beta}",
           f"algorithm.label_smoothing={eps}", f"algorithm.f_divergence_type={fdiv}",
           f"algorithm.f_alpha_divergence_coef={alpha}", f"algorithm.discopop_tau={tau}"]
    if weights:
        out.append(f"algorithm.loss_weights=[{','.join(map(str, weights))}]")
    if ld is not None:
        out.append(f"algorithm.ld_alpha={ld}")
    return out


# label smoothing 0.1 where a type reads it; sigmoid at 0 (gym's conservative DPO there
# is not TRL 1.16's, docs/algorithms.md §12)
DPO_CASES = [dict(types=[t], eps=0.0 if t == "sigmoid" else 0.1) for t in ALL_TYPES]
DPO_CASES += [dict(types=[t], eps=0.0 if t == "sigmoid" else 0.1, fdiv=f)
              for t in ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust",
                        "discopop", "sft"]
              for f in ["forward_kl", "js_divergence", "alpha_divergence"]]
DPO_CASES += [dict(types=["ipo"], fdiv="alpha_divergence", alpha=1.5),
              dict(types=["sigmoid", "bco_pair", "sft"], weights=[0.8, 0.2, 1.0]),  # MPO
              dict(types=["sigmoid", "sft"], weights=[1.0, 0.5]),  # RPO
              dict(types=["apo_zero", "nca_pair", "aot"], weights=[0.3, 1.5, 2.0], eps=0.1),
              dict(types=["discopop"], tau=0.5, beta=0.5), dict(types=["hinge"], beta=2.0)]
DPO_CASES += [dict(types=[t], eps=0.0 if t == "sigmoid" else 0.1, ld=0.5) for t in ALL_TYPES]


@pytest.mark.parametrize("case", DPO_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_every_loss_type_matches_trl(case):
    pytest.importorskip("trl")
    mine, g_mine = gym_dpo_step(overrides_of(**case))
    theirs, g_theirs = trl_dpo_step(**case)
    assert abs(mine.item() - theirs) < 1e-6 * max(1.0, abs(theirs))  # float32 at sppo's ~50
    # TRL sums every position (its log-probs are 0 off the mask, with no path back to a
    # model), so its stub gradient is non-zero there; compare the completion tokens
    assert ((g_mine - g_theirs) * TRL_MASK).abs().max().item() < 1e-6
    assert (g_mine * (1 - TRL_MASK)).abs().max() == 0
    assert g_mine.abs().max() > 0


def test_every_new_loss_type_by_hand():
    """Each loss type of §4.3 on LOGPS (pair log-ratios c = [0.5, -1], r = [-1, 1]) from
    its formula, written out with math."""
    d = LOGPS
    c = [0.5, -1.0]
    r = [-1.0, 1.0]
    lc, lr = d["len_chosen"].tolist(), d["len_rejected"].tolist()
    b, eps, tau = 0.1, 0.1, 0.05

    def sig(x):
        return 1 / (1 + math.exp(-x))

    aot_policy = sorted((d["chosen"] - d["rejected"]).tolist())
    aot_ref = sorted((d["ref_chosen"] - d["ref_rejected"]).tolist())
    aot_delta = [u - v for u, v in zip(aot_policy, aot_ref)]
    unpaired = [u - v for u, v in zip(sorted(c), sorted(r))]
    expected = {
        "exo_pair": [sig(b * h) * (logsig(b * h) - math.log(1 - eps))
                     + sig(-b * h) * (logsig(-b * h) - math.log(eps)) for h in H],
        "nca_pair": [-logsig(b * x) - 0.5 * logsig(-b * x) - 0.5 * logsig(-b * y)
                     for x, y in zip(c, r)],
        "bco_pair": [-logsig(b * x) - logsig(-b * y) for x, y in zip(c, r)],
        "sppo_hard": [(x - 0.5 / b) ** 2 + (y + 0.5 / b) ** 2 for x, y in zip(c, r)],
        "aot": [-(1 - eps) * logsig(b * x) - eps * logsig(-b * x) for x in aot_delta],
        "aot_unpaired": [-(1 - eps) * logsig(b * x) - eps * logsig(-b * x) for x in unpaired],
        "apo_zero": [(1 - sig(b * x)) + sig(b * y) for x, y in zip(c, r)],
        "apo_down": [sig(b * x) + (1 - sig(b * (x - y))) for x, y in zip(c, r)],
        "discopop": [(1 - sig(b * h / tau)) * -logsig(b * h) + sig(b * h / tau) * math.exp(-b * h)
                     for h in H],
        "sigmoid_norm": [-logsig(b * (x / n - y / m)) for x, y, n, m in zip(c, r, lc, lr)],
    }
    for name, want in expected.items():
        got = dpo_loss(d["chosen"], d["rejected"], d["ref_chosen"], d["ref_rejected"], beta=b,
                       loss_type=name, label_smoothing=eps, chosen_len=d["len_chosen"],
                       rejected_len=d["len_rejected"], discopop_tau=tau)
        assert got.tolist() == pytest.approx(want, rel=1e-6), name
    # sft: the given chosen-token NLL for every pair; weights add the losses
    nll = torch.tensor(2.5)
    got = dpo_loss(d["chosen"], d["rejected"], d["ref_chosen"], d["ref_rejected"], beta=b,
                   loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], sft_nll=nll)
    assert got.tolist() == pytest.approx([-logsig(b * h) + 0.5 * 2.5 for h in H], rel=1e-6)


def test_f_divergence_scores_by_hand():
    from gym_dpo.dpo import f_scores

    x = torch.tensor([0.5, -1.0])
    assert f_scores(x, "forward_kl").tolist() == pytest.approx([1 - math.exp(-0.5), 1 - math.e])
    assert f_scores(x, "js_divergence").tolist() == pytest.approx(
        [math.log(2) + logsig(0.5), math.log(2) + logsig(-1.0)])
    assert f_scores(x, "alpha_divergence", 0.5).tolist() == pytest.approx(
        [(math.exp(-0.25) - 1) / -0.5, (math.exp(0.5) - 1) / -0.5])
    assert f_scores(x, "alpha_divergence", 1.0).tolist() == x.tolist()  # the reverse-KL limit


def test_ld_alpha_by_hand():
    from gym_dpo.dpo import pair_logps

    # pair: chosen 3 tokens, rejected 1: the chosen tokens past the first count by 0.5
    logp = torch.tensor([[-1.0, -2.0, -4.0], [-3.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    chosen, rejected = pair_logps(logp, mask, ld_alpha=0.5)
    assert chosen.item() == pytest.approx(-1.0 + 0.5 * (-2.0 - 4.0))
    assert rejected.item() == pytest.approx(-3.0)  # padding never counts


@pytest.mark.parametrize("overrides,message", [
    (["algorithm.loss_type=[sigmoid,nope]"], r"names 'nope', which is not one of sigmoid"),
    (["algorithm.loss_type=[sigmoid,sft]", "algorithm.loss_weights=[1.0]"], "has 1 values"),
    (["algorithm.loss_type=exo_pair"], "needs 0 < algorithm.label_smoothing"),
    (["algorithm.loss_type=nca_pair", "algorithm.f_divergence_type=forward_kl"],
     "not defined for loss types"),
    (["algorithm.f_divergence_type=kl"], "is not one of"),
])
def test_bad_loss_settings_are_one_line_errors(tmp_path, tiny_overrides, overrides, message):
    from gym_core.base.errors import GymError

    with pytest.raises(GymError, match=message):
        run_job(compose([*offline(tiny_overrides), "algorithm=dpo", *overrides]),
                run_dir=tmp_path)


def test_rpo_trains_on_the_tiny_model(tmp_path, tiny_overrides):
    s = run_job(compose([*offline(tiny_overrides), "algorithm=dpo",
                         "algorithm.loss_type=[sigmoid,sft]", "algorithm.loss_weights=[1.0,0.5]",
                         "algorithm.ld_alpha=0.5", "trainer.max_steps=2", "algorithm.lr=1e-2"]),
                run_dir=tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert s["steps"] == 2 and all(r["nll_loss"] > 0 for r in rows)
