"""KTO: the loss and its reference point against hand computations; data errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gym_core.base.errors import GymError
from gym_core.train.job import run_job
from gym_kto.kto import kl_reference_point, kto_loss, rows_of
from tests.conftest import compose


def offline(overrides):
    """The tiny-model overrides without the online methods' rollout settings."""
    return [o for o in overrides if not o.startswith("algorithm.")]


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_loss_matches_hand_computation():
    logps = torch.tensor([-10.0, -12.0, -8.0])
    ref = torch.tensor([-11.0, -11.0, -9.0])
    desirable = torch.tensor([True, False, False])
    z0 = torch.tensor(0.3)
    out = kto_loss(logps, ref, desirable, z0, beta=0.5, desirable_weight=1.0,
                   undesirable_weight=2.0)
    # r = [1, -1, 1]
    expected = [1 - sig(0.5 * (1 - 0.3)), 2 * (1 - sig(0.5 * (0.3 + 1))),
                2 * (1 - sig(0.5 * (0.3 - 1)))]
    assert out.tolist() == pytest.approx(expected, rel=1e-6)


def test_reference_point_is_clamped_and_detached():
    kl = torch.tensor([-1.0, 0.5], requires_grad=True)
    assert kl_reference_point(kl, torch.tensor([0.0, 0.0])).item() == 0.0  # mean -0.25 -> 0
    z = kl_reference_point(kl, torch.tensor([-1.0, -1.0]))
    assert z.item() == pytest.approx(0.75) and not z.requires_grad


def test_pairs_are_unpaired_desirable_first():
    rows = rows_of([{"prompt": "a", "chosen": "x", "rejected": "y"},
                    {"prompt": "b", "chosen": "u", "rejected": "v"}])
    assert [(r["prompt"], r["completion"], r["label"]) for r in rows] == [
        ("a", "x", True), ("b", "u", True), ("a", "y", False), ("b", "v", False)]
    # shifting completions by one pairs every prompt with another prompt's completion
    shifted = [rows[i - 1]["completion"] for i in range(4)]
    assert all(s not in (r["completion"],) for s, r in zip(shifted, rows))


def test_kto_end_to_end_and_errors(tmp_path, tiny_overrides):
    s = run_job(compose([*offline(tiny_overrides), "algorithm=kto", "data=arithmetic_labels",
                         "algorithm.lr=1e-2", "trainer.max_steps=3", "trainer.batch_size=4",
                         "algorithm.max_completion_length=32"]), run_dir=tmp_path / "ok")
    rows = [json.loads(x) for x in (tmp_path / "ok/metrics.jsonl").read_text().splitlines()]
    assert all("kl" in r and "rewards/chosen" in r and "rewards/rejected" in r for r in rows)
    assert s["eval"]["preference_accuracy"]["after"] is not None

    with pytest.raises(GymError, match="at least 2 different prompts"):
        run_job(compose([*offline(tiny_overrides), "algorithm=kto", "trainer.batch_size=1",
                         "trainer.eval_before=false"]), run_dir=tmp_path / "small")
    only_good = tmp_path / "good.jsonl"
    only_good.write_text("".join(json.dumps({"prompt": f"{i}?", "completion": str(i),
                                             "label": True}) + "\n" for i in range(20)))
    with pytest.raises(GymError, match="only desirable"):
        run_job(compose([*offline(tiny_overrides), "algorithm=kto", "data=jsonl",
                         f"data.train_file={only_good}"]), run_dir=tmp_path / "one")


def test_two_pass_step_equals_separate_passes():
    """The step scores own and mismatched completions in one pass (each prompt once); it
    must equal separate passes over (x_i, y_i) and (x_i, y_{i-1}) as TRL does them."""
    from omegaconf import OmegaConf

    from gym_core.config.schema import ModelConfig
    from gym_core.data.batching import encode_completions
    from gym_core.model.policy import load_policy
    from gym_core.train.losses import StepTotals, completion_logprobs
    from gym_kto import KTOConfig
    from gym_kto.kto import KTO

    torch.manual_seed(0)
    policy = load_policy(OmegaConf.structured(ModelConfig(source="tiny")), torch.device("cpu"))
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)  # the policy differs from the reference
    algo = KTO(OmegaConf.structured(KTOConfig(beta=0.5, max_completion_length=32)), policy)
    examples = [{"prompt": f"{a} + 2?", "chosen": f"{a + 2}", "rejected": f"{a + 5}"}
                for a in range(3)]
    batch = algo.collate(examples)
    algo.prepare(batch)
    loss, metrics = algo.loss(batch, StepTotals(6, 0, 1))

    rows = rows_of(examples)
    prompts = [r["prompt"] for r in rows]

    def sums(model, completions):
        b = encode_completions(policy.tokenizer, prompts, [[c] for c in completions],
                               system_prompt=None, max_prompt_length=256,
                               max_completion_length=32, device=torch.device("cpu"))
        lp = completion_logprobs(model, b.prompt_ids, b.prompt_mask, b.completion_ids,
                                 b.completion_mask)
        return (lp * b.completion_mask).sum(-1)

    own = [r["completion"] for r in rows]
    shifted = own[-1:] + own[:-1]
    with torch.no_grad():
        with policy.model.disable_adapter():
            ref, ref_kl = sums(policy.model, own), sums(policy.model, shifted)
        kl = sums(policy.model, shifted)
    logps = sums(policy.model, own)
    z0 = (kl - ref_kl).mean().clamp(min=0)
    desirable = torch.tensor([r["label"] for r in rows])
    expected = kto_loss(logps, ref, desirable, z0, beta=0.5).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["kl"] == pytest.approx(z0.item(), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
def test_loss_matches_trl(weights):
    pytest.importorskip("trl")
    from tests.trl_stubs import trl_kto_loss

    g = torch.Generator().manual_seed(5)
    logps, ref, kl, ref_kl = (torch.randn(8, generator=g) * 3 - 20 for _ in range(4))
    labels = torch.tensor([True, False, True, True, False, False, True, False])
    theirs = trl_kto_loss(logps, ref, kl, ref_kl, labels, beta=0.1,
                          desirable_weight=weights[0], undesirable_weight=weights[1])
    z0 = kl_reference_point(kl, ref_kl)
    mine = kto_loss(logps, ref, labels, z0, beta=0.1, desirable_weight=weights[0],
                    undesirable_weight=weights[1]).mean().item()
    assert mine == pytest.approx(theirs, abs=1e-6)
