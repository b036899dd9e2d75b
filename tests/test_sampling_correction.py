"""The sampler/trainer mismatch correction (docs/algorithms.md §3): TRL 1.16's four
importance-sampling modes against hand computations, the corrected loss equal to the
uncorrected one when sampler and trainer agree, and the mismatch gym's own sampler has."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from gym_core.base.errors import GymError
from gym_core.sampling.generation import Sampling
from gym_core.sampling.rollout import RolloutEngine
from gym_core.train.policy_gradient import importance_weights
from tests.conftest import tiny_lora_policy

OLD = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -3.0]])
SMP = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, -0.9, -9.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the second row ended after two tokens


def test_token_modes_match_hand_computation():
    # d = (old - smp) * mask = [[0.5, -1, 0], [0, -0.1, 0]]
    rho, m = importance_weights(OLD, SMP, MASK, "token_truncate", None, 1.5)
    expected = [[min(math.exp(0.5), 1.5), math.exp(-1), 1.0], [1.0, math.exp(-0.1), 1.0]]
    torch.testing.assert_close(rho, torch.tensor(expected))
    rho, _ = importance_weights(OLD, SMP, MASK, "token_truncate", 0.5, 1.5)
    assert rho[0, 1].item() == pytest.approx(0.5)  # exp(-1) = 0.37 raised to clip_min
    rho, _ = importance_weights(OLD, SMP, MASK, "token_mask", 0.5, 1.5)
    # masking: outside [0.5, 1.5] the weight is 0, inside it is rho itself (not 1)
    torch.testing.assert_close(rho, torch.tensor([[0.0, 0.0, 1.0], [1.0, math.exp(-0.1), 1.0]]))
    # metrics over completion tokens only (the masked 6.0 difference is not counted)
    assert m["sampling/sampling_logp_difference/max"] == pytest.approx(1.0)
    assert m["sampling/sampling_logp_difference/mean"] == pytest.approx(1.6 / 5)


def test_sequence_modes_use_the_product_of_token_ratios():
    rho, m = importance_weights(OLD, SMP, MASK, "sequence_truncate", None, 3.0)
    assert rho.shape == (2, 1)
    assert rho.flatten().tolist() == pytest.approx([math.exp(-0.5), math.exp(-0.1)], rel=1e-6)
    rho, _ = importance_weights(OLD, SMP, MASK, "sequence_mask", 0.7, 3.0)
    assert rho.flatten().tolist() == pytest.approx([0.0, math.exp(-0.1)], rel=1e-6)
    assert m["sampling/importance_sampling_ratio/min"] == pytest.approx(math.exp(-0.5))


@pytest.fixture(scope="module")
def policy():
    return tiny_lora_policy()


def _algorithm(name, policy, **overrides):
    from gym_grpo import GRPOConfig, GSPOConfig
    from gym_grpo.grpo import GRPO

    Config = GRPOConfig if name == "grpo" else GSPOConfig
    return GRPO(OmegaConf.structured(Config(num_generations=4, beta=0.04, **overrides)), policy)


def _rollout(policy, algo):
    def reward(prompts, completions, examples):
        return [float(len(c) % 3) for c in completions]

    engine = RolloutEngine(policy, algo.cfg, [("len", reward, 1.0)])
    batch = engine.generate([{"prompt": "What is 2 + 3?"}, {"prompt": "Hi"}], seeds=[5, 6])
    algo.prepare(batch)
    return batch


def _loss_and_grads(algo, batch):
    params = algo.policy.trainable_parameters()
    loss, metrics = algo.loss(batch, algo.step_totals([batch]))
    return loss, torch.autograd.grad(loss, params), metrics


@pytest.mark.parametrize("name", ["grpo", "gspo"])
@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate",
                                  "sequence_mask"])
def test_corrected_loss_equals_uncorrected_when_sampler_and_trainer_agree(policy, name, mode):
    on = _algorithm(name, policy, importance_sampling_mode=mode)
    off = _algorithm(name, policy, importance_sampling_correction=False)
    batch = _rollout(policy, on)
    assert batch.sampler_logp is not None and batch.sampler_logp.shape == batch.completion_ids.shape
    with torch.no_grad():
        batch.sampler_logp = policy.logprobs(batch)  # the trainer's own: rho = 1
    loss_on, grads_on, metrics = _loss_and_grads(on, batch)
    loss_off, grads_off, _ = _loss_and_grads(off, batch)
    assert metrics["sampling/importance_sampling_ratio/min"] == 1.0
    assert metrics["sampling/importance_sampling_ratio/max"] == 1.0
    assert loss_on.item() == loss_off.item()
    for a, b in zip(grads_on, grads_off):
        assert torch.equal(a, b)


def test_the_correction_weights_the_surrogate_and_not_the_kl(policy):
    """With every sequence masked out (rho = 0), only the KL term is left of the loss."""
    algo = _algorithm("grpo", policy, importance_sampling_mode="sequence_mask",
                      importance_sampling_clip_max=3.0)
    batch = _rollout(policy, algo)
    batch.sampler_logp = batch.sampler_logp - 5.0  # rho = exp(5 * length) > 3: masked
    loss, _, metrics = _loss_and_grads(algo, batch)
    assert metrics["sampling/importance_sampling_ratio/max"] == 0.0
    mask = batch.extras["loss_mask"]
    with torch.no_grad():
        kl = ((torch.exp(batch.extras["ref_logp"] - policy.logprobs(batch))
               - (batch.extras["ref_logp"] - policy.logprobs(batch)) - 1) * mask).sum()
    assert loss.item() == pytest.approx(0.04 * kl.item() / mask.sum().item(), rel=1e-5)


def test_gyms_sampler_and_trainer_agree_to_rounding(policy):
    """gym's sampler (fused decode step, adapter merged) is the policy up to float32
    rounding: the weights stay within 1e-3 of 1."""
    algo = _algorithm("grpo", policy)
    batch = _rollout(policy, algo)
    _, _, metrics = _loss_and_grads(algo, batch)
    assert metrics["sampling/sampling_logp_difference/max"] < 1e-4
    assert abs(metrics["sampling/importance_sampling_ratio/min"] - 1) < 1e-3
    assert abs(metrics["sampling/importance_sampling_ratio/max"] - 1) < 1e-3


@pytest.mark.parametrize("overrides, message", [
    ({"importance_sampling_mode": "tis"}, "importance_sampling_mode='tis'"),
    ({"importance_sampling_clip_min": 2.0, "importance_sampling_clip_max": 1.0},
     "must be below"),
    ({"importance_sampling_mode": "token_truncate", "importance_sampling_clip_max": None},
     "needs algorithm.importance_sampling_clip_max"),
])
def test_bad_correction_settings_are_one_line_errors(overrides, message):
    """Refused by the config check every job runs first (GroupPolicyConfig's
    declarations and validate), in one line."""
    from gym_core.config.fields import check_values
    from gym_grpo import GRPOConfig

    with pytest.raises(GymError, match=message):
        check_values(OmegaConf.structured(GRPOConfig(**overrides)), "algorithm")


def test_sampling_stays_reproducible_per_row(policy):
    """Rows keep their own noise: a prompt's completions do not depend on which other
    prompts share the batch (1 and N processes sample alike)."""
    kw = dict(max_new_tokens=8, sampling=Sampling(), num_samples=4)
    both = policy.sample(["What is 2 + 3?", "Hi"], row_seeds=list(range(8)), **kw)
    alone = policy.sample(["Hi"], row_seeds=list(range(4, 8)), **kw)
    assert both.texts[4:] == alone.texts
