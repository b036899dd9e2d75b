"""PPO (docs/algorithms.md §6.2). TRL 1.16 ships no PPO trainer (removed in
huggingface/trl#7020), so there is no peer code to run: the rewards, GAE, whitening and
losses are checked against the formulas of the PPO and GAE papers (arXiv 1707.06347,
1506.02438) as TRL's PPOTrainer computed them before its removal (§6.2), written out by
hand or as an independent computation; the value head against the model's own hidden
states; the whole method end to end on the tiny model (trained, checkpointed, resumed)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gym_core.api import compose
from gym_core.train.checkpoint import list_checkpoints
from gym_core.train.job import run_job
from gym_ppo.ppo import gae, ppo_losses, token_rewards, whiten


def test_token_rewards_by_hand():
    # the score sits on the last token of each completion; every token pays -kl_coef * KL
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rew = token_rewards(torch.tensor([1.0, -2.0]), kl, mask, kl_coef=0.5)
    expected = [[-0.05, -0.1, -0.15 + 1.0], [-0.2, -0.25 - 2.0, 0.0]]
    assert rew.tolist() == [pytest.approx(row) for row in expected]


def test_gae_by_hand():
    # one completion of 3 tokens, gamma 0.9, lambda 0.5, values 1, 2, 3, reward 1 at the end
    rew = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[1.0, 2.0, 3.0]])
    adv, ret = gae(rew, values, torch.ones(1, 3), gamma=0.9, lam=0.5)
    d2 = 1.0 + 0.9 * 0.0 - 3.0  # the value after the last token is 0
    d1 = 0.0 + 0.9 * 3.0 - 2.0
    d0 = 0.0 + 0.9 * 2.0 - 1.0
    a2 = d2
    a1 = d1 + 0.45 * a2
    a0 = d0 + 0.45 * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, a2])
    assert ret[0].tolist() == pytest.approx([a0 + 1.0, a1 + 2.0, a2 + 3.0])


def test_gae_equals_the_discounted_sum_of_td_errors():
    """A_t = sum_l (gamma lam)^l delta_{t+l} over each completion (arXiv 1506.02438, eq.
    16), computed directly, on random rows of different lengths."""
    g = torch.Generator().manual_seed(0)
    n, width, gamma, lam = 5, 7, 0.97, 0.9
    lengths = [7, 3, 1, 5, 6]
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).float()
    rew = torch.randn(n, width, generator=g)
    values = torch.randn(n, width, generator=g)
    adv, ret = gae(rew, values, mask, gamma, lam)
    for i, length in enumerate(lengths):
        v = values[i, :length].tolist() + [0.0]
        delta = [rew[i, t].item() + gamma * v[t + 1] - v[t] for t in range(length)]
        want = [sum((gamma * lam) ** k * delta[t + k] for k in range(length - t))
                for t in range(length)]
        assert adv[i, :length].tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)
        assert ret[i, :length].tolist() == pytest.approx(
            [a + b for a, b in zip(want, v[:length])], rel=1e-5, abs=1e-6)
        assert adv[i, length:].abs().sum() == 0 and ret[i, length:].abs().sum() == 0


def test_whitening_over_the_step_by_hand():
    # two micro-batches; masked entries of both count, Bessel-corrected variance
    a = torch.tensor([[1.0, 2.0, 100.0]])
    b = torch.tensor([[3.0, 4.0, 5.0]])
    ma = torch.tensor([[1.0, 1.0, 0.0]])
    mb = torch.ones(1, 3)
    out = whiten([a, b], [ma, mb])
    vals = [1.0, 2.0, 3.0, 4.0, 5.0]
    mean = 3.0
    var = sum((x - mean) ** 2 for x in vals) / 4
    scale = 1 / math.sqrt(var + 1e-8)
    assert out[0].tolist()[0] == pytest.approx([(1 - mean) * scale, (2 - mean) * scale, 0.0])
    assert out[1].tolist()[0] == pytest.approx([(x - mean) * scale for x in (3.0, 4.0, 5.0)])
    kept = whiten([a, b], [ma, mb], shift_mean=False)  # reward whitening keeps the mean
    assert kept[1].tolist()[0] == pytest.approx([(x - mean) * scale + mean for x in (3, 4, 5)])


def test_policy_and_value_losses_by_hand():
    logp = torch.log(torch.tensor([[0.6, 0.2]]))
    old = torch.log(torch.tensor([[0.4, 0.4]]))  # ratios 1.5 and 0.5
    adv = torch.tensor([[1.0, -1.0]])
    values = torch.tensor([[0.5, -0.5]])
    old_values = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[1.0, 1.0]])
    pg, vf, pg_clip, vf_clip = ppo_losses(logp, old, values, old_values, adv, returns,
                                          torch.ones(1, 2), cliprange=0.2, cliprange_value=0.2)
    # A = 1, rho 1.5: max(-1.5, -1.2) = -1.2 (clipped); A = -1, rho 0.5: max(0.5, 0.8) = 0.8
    assert pg.tolist()[0] == pytest.approx([-1.2, 0.8])
    assert pg_clip.tolist()[0] == [1.0, 1.0]
    # value 0.5 clipped to 0.2: 0.5 * max(0.25, 0.64); value -0.5 clipped to -0.2:
    # 0.5 * max(2.25, 1.44)
    assert vf.tolist()[0] == pytest.approx([0.5 * 0.64, 0.5 * 2.25])
    assert vf_clip.tolist()[0] == [1.0, 0.0]


def test_the_value_head_reads_the_models_final_hidden_states():
    """policy.logprobs(batch, heads=True) gives each completion token's value from the
    hidden state that predicts it: the same pass as the log-probs, equal to a plain
    forward over prompt + completion."""
    from omegaconf import OmegaConf

    from gym_core.config.schema import ModelConfig
    from gym_core.model.policy import load_policy
    from gym_core.sampling.rollout import Rollout
    from gym_ppo.ppo import ValueHead

    torch.manual_seed(0)
    policy = load_policy(OmegaConf.structured(ModelConfig(source="tiny")), torch.device("cpu"))
    head = ValueHead(policy.model.config.hidden_size)
    torch.nn.init.normal_(head.linear.weight)
    policy.add_head("value", head)
    batch = Rollout(prompt_ids=torch.tensor([[0, 10, 11]]), prompt_mask=torch.tensor([[0, 1, 1]]),
                    completion_ids=torch.tensor([[12, 13, 14], [15, 16, 0]]),
                    completion_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
                    truncated=torch.zeros(2, dtype=torch.bool), rewards=torch.zeros(2),
                    group_size=2, examples=[{}, {}], completions=["", ""])
    logp, heads = policy.logprobs(batch, heads=True)
    assert torch.allclose(logp, policy.logprobs(batch))
    for i in range(2):
        ids = torch.cat([batch.prompt_ids[0, 1:], batch.completion_ids[i]]).unsqueeze(0)
        out = policy.model(input_ids=ids, output_hidden_states=True)
        hidden = out.hidden_states[-1][0, 1:4]  # the positions that predict the 3 tokens
        mask = batch.completion_mask[i].bool()
        assert torch.allclose(heads["value"][i][mask], head(hidden)[mask], atol=1e-5)
    assert list(policy.trainable_parameters())[-2:] == list(head.parameters())


def ppo_overrides(tiny_overrides):
    return [*tiny_overrides, "algorithm=ppo", "algorithm.rewards=[digit_share]",
            "algorithm.lr=1e-2", "trainer.eval_before=false"]


def test_ppo_trains_its_value_head_and_resumes_with_it(tmp_path, tiny_overrides,
                                                        with_digit_reward):
    overrides = [*ppo_overrides(tiny_overrides), "trainer.grad_accum=2",
                 "algorithm.num_mini_batches=2", "algorithm.num_ppo_epochs=2",
                 "trainer.save_every=1"]
    s = run_job(compose([*overrides, "trainer.max_steps=2"]), run_dir=tmp_path)
    assert s["steps"] == 2
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["value_mean"] == 0.0  # the head starts at zero
    assert rows[1]["value_mean"] != 0.0 and rows[1]["vf_loss"] > 0  # and learned
    from safetensors.torch import load_file

    first, last = (load_file(str(p / "trainable.safetensors"))
                   for _, p in list_checkpoints(tmp_path))
    assert "gym_heads.value.linear.weight" in last
    assert not torch.equal(first["gym_heads.value.linear.weight"],
                           last["gym_heads.value.linear.weight"])
    # resuming restores the head (a mismatch would refuse the checkpoint)
    s = run_job(compose([*overrides, "trainer.max_steps=3"]), run_dir=tmp_path)
    assert s["steps"] == 3
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["value_mean"] != 0.0


def test_ppo_updates_per_step_and_options(tmp_path, tiny_overrides, with_digit_reward):
    s = run_job(compose([*ppo_overrides(tiny_overrides), "trainer.max_steps=1",
                         "algorithm.num_ppo_epochs=3", "algorithm.kl_estimator=k3",
                         "algorithm.whiten_rewards=true", "algorithm.missing_eos_penalty=1.0",
                         "algorithm.gamma=0.99"]), run_dir=tmp_path)
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert s["steps"] == 1
    # the random model's completions mostly run to the length cap: each is penalised by 1
    assert row["truncated_fraction"] > 0
    assert row["score"] == pytest.approx(row["reward_mean"] - row["truncated_fraction"], abs=1e-6)


def test_mini_batches_must_divide_the_micro_batches(tmp_path, tiny_overrides):
    from gym_core.base.errors import GymError

    with pytest.raises(GymError, match="num_mini_batches=2 must divide trainer.grad_accum=1"):
        run_job(compose([*tiny_overrides, "algorithm=ppo", "algorithm.num_mini_batches=2"]),
                run_dir=tmp_path)
