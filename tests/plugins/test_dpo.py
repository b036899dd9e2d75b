"""DPO: each loss type against a hand computation and against TRL's own code."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gym_core.run import run_job
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
    from gym_core.errors import GymError

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
    from gym_core.data import arithmetic_task, render_prompts
    from gym_core.generation import Sampling
    from gym_core.model import load_policy
    from gym_core.startup import bootstrap

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
