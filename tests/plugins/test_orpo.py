"""ORPO: the odds-ratio loss by hand and against TRL's own code (trl.experimental.orpo),
and an end-to-end run on the tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gym_core.api import GymError
from gym_core.data.batching import CompletionBatch
from gym_core.train.job import run_job
from gym_orpo import ORPOConfig
from gym_orpo.orpo import ORPO, ORPOTotals, log1mexp, orpo_losses
from tests.conftest import compose


def offline(overrides):
    return [o for o in overrides if not o.startswith("algorithm.")]


class StubPolicy:
    def __init__(self, logp):
        self.logp = logp

    def logprobs(self, batch, *, reference=False, detached=None):
        assert not reference  # ORPO has no reference model
        return self.logp


def test_odds_ratio_by_hand():
    # chosen tokens at probability 1/2 each (P_w = log 1/2: odds 1), rejected at 1/4
    # (odds 1/3): log_odds = log 3, and the loss -beta log sigma(log 3) = beta log(4/3)
    c = torch.tensor([math.log(0.5)])
    r = torch.tensor([math.log(0.25)])
    losses, log_odds = orpo_losses(c, r, beta=0.1)
    assert log_odds.item() == pytest.approx(math.log(3), rel=1e-6)
    assert losses.item() == pytest.approx(0.1 * math.log(4 / 3), rel=1e-6)


def test_log1mexp_is_stable_on_both_branches_and_has_finite_gradients():
    x = torch.tensor([-50.0, -1.0, -0.6931, -0.5, -1e-4, -1e-7], dtype=torch.float64)
    assert log1mexp(x).tolist() == pytest.approx(torch.log(1 - torch.exp(x)).tolist(), rel=1e-6)
    # a completion the model is certain of (P = 0): finite loss and gradient
    p = torch.tensor([0.0, -0.3], requires_grad=True)
    losses, _ = orpo_losses(p[:1], p[1:], beta=0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(p.grad).all()


def trl_inputs(seed, b=3, prompt_len=4, width=9, vocab=13):
    """Chosen and rejected sequences for TRL's ORPO (prompt, then completion, then
    padding) and logits for them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (2 * b, width), generator=g)
    att = torch.ones(2 * b, width, dtype=torch.long)
    ends = torch.randint(prompt_len + 2, width + 1, (2 * b,), generator=g)
    for i, e in enumerate(ends.tolist()):
        att[i, e:] = 0
    ids = ids * att
    labels = torch.where(att.bool(), ids, -100)
    labels[:, :prompt_len] = -100
    logits = torch.randn(2 * b, width, vocab, generator=g) * 2
    return logits, ids, att, labels


def token_logps(logits, ids):
    """log p(token t | < t) at positions 1.., as TRL's get_batch_logps computes them."""
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]


def test_loss_formula_matches_trl():
    """The same logits through TRL's ORPOTrainer and through gym's formula, with TRL's
    NLL mask (prompt tokens included, docs/algorithms.md §5.2): equal to 1e-6."""
    pytest.importorskip("trl")
    from tests.trl_stubs import trl_orpo_loss

    for seed, beta in [(0, 0.1), (1, 0.5), (2, 0.05)]:
        logits, ids, att, labels = trl_inputs(seed)
        theirs, metrics = trl_orpo_loss(logits, ids, att, labels, beta=beta)
        lp = token_logps(logits, ids)
        completion = (labels[:, 1:] != -100).float()
        avg = (lp * completion).sum(-1) / completion.sum(-1)
        b = logits.shape[0] // 2
        nll_mask = att[:b, 1:].float()  # TRL: every non-padding chosen token after the first
        nll = -(lp[:b] * nll_mask).sum() / nll_mask.sum()
        losses, log_odds = orpo_losses(avg[:b], avg[b:], beta=beta)
        assert (nll + losses.mean()).item() == pytest.approx(theirs, abs=1e-6)
        assert log_odds.mean().item() == pytest.approx(metrics["log_odds_chosen"], abs=1e-6)


def test_plugin_loss_matches_trl_when_the_nll_masks_agree():
    """gym's ORPO takes the NLL over the chosen completion (the paper's SFT term); TRL over
    prompt and completion. With a one-token prompt (never predicted) the two agree, and
    gym's step loss (through a stub policy, in gym's batch layout) equals TRL's."""
    pytest.importorskip("trl")
    from tests.trl_stubs import trl_orpo_loss

    logits, ids, att, labels = trl_inputs(3, prompt_len=1)
    theirs, metrics = trl_orpo_loss(logits, ids, att, labels, beta=0.1)
    lp = token_logps(logits, ids)  # [2B, L-1]: the completion starts at position 1
    mask = att[:, 1:]
    b = logits.shape[0] // 2
    # gym's layout: chosen and rejected of a prompt in adjacent rows
    order = torch.stack([torch.arange(b), torch.arange(b) + b], 1).flatten()
    batch = CompletionBatch(ids[:b, :1], att[:b, :1], ids[order, 1:], mask[order], 2,
                            [{} for _ in range(b)])
    algo = ORPO.__new__(ORPO)
    algo.cfg, algo.policy = ORPOConfig(), StubPolicy(lp[order])
    totals = algo.step_totals([batch])
    assert isinstance(totals, ORPOTotals) and totals.chosen_tokens == int(mask[:b].sum())
    loss, ours = algo.loss(batch, totals)
    assert loss.item() == pytest.approx(theirs, abs=1e-6)
    for key in ("nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/chosen",
                "rewards/rejected", "rewards/accuracies", "logps/chosen"):
        assert ours[key] == pytest.approx(metrics[key], abs=1e-6), key


def test_step_normalisers_over_micro_batches():
    """Two micro-batches: the NLL is a token mean over the whole step's chosen answers, the
    odds-ratio term a mean over its pairs (docs/algorithms.md §5.2, gym)."""
    lp = [torch.tensor([[-1.0, -1.0], [-2.0, 0.0]]), torch.tensor([[-3.0, 0.0], [-0.5, -0.5]])]
    masks = [torch.tensor([[1, 1], [1, 0]]), torch.tensor([[1, 0], [1, 1]])]
    batches = [CompletionBatch(torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(2, 2), m, 2,
                               [{}]) for m in masks]
    algo = ORPO.__new__(ORPO)
    algo.cfg = ORPOConfig(beta=0.2)
    totals = algo.step_totals(batches)
    assert (totals.sequences, totals.chosen_tokens) == (2, 3)
    total = 0.0
    for logp, batch in zip(lp, batches):
        algo.policy = StubPolicy(logp)
        total += algo.loss(batch, totals)[0].item()
    nll = (1 + 1 + 3) / 3
    pairs = orpo_losses(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -0.5]), beta=0.2)[0]
    assert total == pytest.approx(nll + pairs.mean().item(), rel=1e-6)


def test_orpo_end_to_end_on_tiny_model(tmp_path, tiny_overrides):
    """Four fixed pairs (also the test split): ORPO raises the chosen answers' odds over
    the rejected ones' and the chosen NLL falls."""
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"What is {a} + 1?", "chosen": f"{a + 1}", "rejected": f"{a + 7}"}
            for a in range(3)]
    rows.append({"prompt": [{"role": "user", "content": "Say hi"}],
                 "chosen": [{"role": "assistant", "content": "hi"}],
                 "rejected": [{"role": "assistant", "content": "no"}]})
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = run_job(compose([*offline(tiny_overrides), "algorithm=orpo", "algorithm.lr=3e-3",
                         "algorithm.beta=1.0", "model.finetune=full", "data=jsonl",
                         f"data.train_file={pairs}", f"data.test_file={pairs}",
                         "trainer.max_steps=8", "trainer.batch_size=4", "trainer.warmup_steps=0"]),
                run_dir=tmp_path / "run")
    metrics = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["log_odds_chosen"] > metrics[0]["log_odds_chosen"] + 0.5
    assert metrics[-1]["nll_loss"] < 0.7 * metrics[0]["nll_loss"]
    pref = s["eval"]["preference_accuracy"]
    assert pref["after"] == 1.0 and pref["after"] > pref["before"]


def test_orpo_rejects_data_without_pairs(tmp_path, tiny_overrides):
    train = tmp_path / "t.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"{i}?", "answer": i}) + "\n"
                             for i in range(20)))
    with pytest.raises(GymError, match="algorithm=orpo needs preference pairs"):
        run_job(compose([*offline(tiny_overrides), "algorithm=orpo", "data=jsonl",
                         f"data.train_file={train}"]), run_dir=tmp_path / "r")
