"""One path for a run's delta (gym_core.deltas.merge): ``run_delta`` builds it, ``rebuild``
makes base + delta without loading or copying the base, ``lora_base`` is the base a LoRA
policy already holds; a run loads its base model once."""

from __future__ import annotations

import copy

import pytest
import torch

import gym_core.model.policy as policy_module
from gym_core.base.errors import GymError
from gym_core.deltas.delta import apply_delta, lora_delta, state_delta
from gym_core.deltas.merge import lora_base, rebuild, run_delta
from gym_core.model.policy import load_base
from tests.conftest import compose, tiny_lora_policy

IDS = torch.tensor([[5, 17, 99, 42, 7, 120, 3, 64]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def policy():
    return tiny_lora_policy()


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return load_base(compose(["model=tiny"]).model)[0]


def test_lora_base_is_the_loaded_base_and_shares_the_policys_weights(policy, base):
    before = {n: p.clone() for n, p in policy.model.named_parameters()}
    view = lora_base(policy.model)
    assert not any("lora_" in n for n, _ in view.named_parameters())
    # the same values as the base model loaded from scratch (tiny: seeded), the same storage
    # as the policy's frozen weights
    torch.testing.assert_close(logits(view), logits(base), rtol=0, atol=0)
    frozen = {p.data_ptr() for n, p in policy.model.named_parameters() if "lora_" not in n}
    assert {p.data_ptr() for p in view.parameters()} <= frozen
    # the policy is untouched: still a LoRA model with its adapter active
    for n, p in policy.model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert any("lora_" in n for n, _ in policy.model.named_parameters())


def test_run_delta_of_a_lora_policy_is_its_adapter_or_the_difference_to_a_base(policy, base):
    exact = run_delta(policy.model)
    assert exact.keys() == lora_delta(policy.model).keys() and exact
    against = run_delta(policy.model, lora_base(policy.model))
    assert against.keys() == exact.keys()
    for key, d in exact.items():
        torch.testing.assert_close(against[key], d, rtol=1e-5, atol=1e-6)


def test_rebuild_shares_what_the_delta_leaves_and_equals_an_in_place_apply(policy, base):
    delta = run_delta(policy.model)
    state = {n: p.clone() for n, p in base.named_parameters()}
    rebuilt = rebuild(base, delta)
    expected = copy.deepcopy(base)
    apply_delta(expected, delta)
    torch.testing.assert_close(logits(rebuilt), logits(expected), rtol=0, atol=0)
    torch.testing.assert_close(logits(rebuilt), logits(policy.model), rtol=1e-5, atol=1e-5)
    mine = dict(rebuilt.named_parameters())
    for name, p in base.named_parameters():
        assert torch.equal(p, state[name]), f"rebuild changed the base's {name}"
        assert (mine[name] is p) == (name not in delta), name  # shared unless changed
    assert not rebuilt.training


def test_rebuild_replaces_a_tied_weight_everywhere(base):
    emb = "model.embed_tokens.weight"
    assert base.lm_head.weight is dict(base.named_parameters())[emb]  # tiny ties them
    d = torch.randn_like(base.lm_head.weight) * 0.1
    rebuilt = rebuild(base, {emb: d})
    assert rebuilt.lm_head.weight is rebuilt.model.embed_tokens.weight
    torch.testing.assert_close(rebuilt.lm_head.weight, base.lm_head.weight + d)


def test_rebuild_refuses_a_delta_that_does_not_fit(base):
    with pytest.raises(GymError, match="which this model does not have"):
        rebuild(base, {"model.nowhere.weight": torch.zeros(2, 2)})
    key = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(GymError, match=f"delta '{key}' has shape"):
        rebuild(base, {key: torch.zeros(3, 3)})


def test_full_fine_tune_delta_is_every_changed_weight(base):
    fine = copy.deepcopy(base)
    with torch.no_grad():
        fine.model.norm.weight.add_(0.5)
    delta = run_delta(fine, base)
    assert delta.keys() == {"model.norm.weight"}
    assert delta.keys() == state_delta(dict(fine.named_parameters()),
                                       dict(base.named_parameters())).keys()


def test_a_quantized_lora_run_loads_its_base_once(tmp_path, monkeypatch, with_digit_reward):
    """A LoRA run with a calibrating quantizer used to load the base four times (the
    policy, calibration's fresh base, the rebuild, the uncalibrated rebuild)."""
    import sys

    from gym_core.train.job import run_job

    calls = []
    real = policy_module.load_base

    def counted(cfg):
        calls.append(cfg)
        return real(cfg)

    monkeypatch.setattr(policy_module, "load_base", counted)
    monkeypatch.setattr(sys.modules["gym_core.train.job"], "load_base", counted)
    summary = run_job(compose([
        "model=tiny", "algorithm=grpo", "quant=bitdelta", "quant.distill_steps=1",
        "algorithm.rewards=[digit_share]", "algorithm.lr=1e-2", "trainer.max_steps=1",
        "trainer.eval_size=4", "trainer.batch_size=2", "algorithm.num_generations=2",
        "algorithm.max_completion_length=4", "trainer.eval_max_new_tokens=4",
        "trainer.eval_before=false", "trainer.progress=false",
        "trainer.tensorboard=false"]), run_dir=tmp_path / "run")
    assert summary["quant_stats"]["delta_params"] > 0
    assert "after_quant_uncalibrated" in summary["quant_stats"]  # calibration ran
    assert len(calls) == 1
