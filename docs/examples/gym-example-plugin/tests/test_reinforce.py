"""REINFORCE's baseline, advantages and loss by hand, its state across a resume, the
number_only reward, and a real run on gym's tiny model. The loss is checked against a
stub policy: an algorithm gets its log-probs only from ``policy.logprobs(batch,
reference=...)``, so a stub that returns fixed tensors is all a unit test of the math
needs."""

from __future__ import annotations

import json

import pytest
import torch
from gym_core.api import Rollout, StepTotals, compose, run_job

from gym_example_plugin.reinforce import Reinforce, moving_average
from gym_example_plugin.rewards import number_only


def test_moving_average_by_hand():
    assert moving_average(None, 0.4, 0.9) == 0.4  # the first step starts the baseline
    assert moving_average(0.4, 1.0, 0.9) == pytest.approx(0.9 * 0.4 + 0.1 * 1.0)


def test_number_only():
    got = number_only([""] * 5, ["42", " -7. ", "42 apples", "4.5", "forty-two"], [{}] * 5)
    assert got == [1.0, 1.0, 0.0, 1.0, 0.0]


class StubPolicy:
    """Fixed per-token log-probs for the policy (with gradients) and the reference."""

    def __init__(self, logp, ref_logp):
        self.logp, self.ref_logp = logp, ref_logp

    def logprobs(self, batch, *, reference=False, detached=None):
        return self.ref_logp if reference else self.logp


def rollout(rewards, mask):
    n, c = mask.shape
    ids = torch.zeros(n, c, dtype=torch.long)
    return Rollout(prompt_ids=ids[:1], prompt_mask=ids[:1], completion_ids=ids,
                   completion_mask=mask, truncated=torch.zeros(n, dtype=torch.bool),
                   rewards=torch.tensor(rewards), group_size=n, examples=[{}] * n,
                   completions=[""] * n)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_advantages_and_loss_by_hand(beta):
    cfg = compose(["algorithm=reinforce", f"algorithm.beta={beta}",
                   "algorithm.num_generations=2", "algorithm.baseline_decay=0.5"])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -1.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0, 0.0], [-0.5, -1.0, -1.0]])
    algo = Reinforce(cfg.algorithm, StubPolicy(logp, ref))
    algo.baseline = 0.25  # from earlier steps
    batch = rollout([1.0, 0.0], mask)
    algo.prepare(batch)
    algo.prepare_step([batch])
    # by hand: k1 KL per sequence = sum (logp - ref) = 0.5 and 0.5, so the returns are
    # 1 - 0.5 beta and -0.5 beta; the advantages use the baseline from before this step
    returns = [1 - 0.5 * beta, -0.5 * beta]
    assert batch.extras["advantages"].tolist() == pytest.approx([r - 0.25 for r in returns])
    # then the baseline moves halfway to this step's mean return
    assert algo.baseline == pytest.approx(0.5 * 0.25 + 0.5 * sum(returns) / 2)
    loss, metrics = algo.loss(batch, StepTotals(sequences=2, tokens=5, micro_batches=1))
    a0, a1 = (r - 0.25 for r in returns)
    # dapo: -(A_0 * (-1 - 2) + A_1 * (-0.5 - 0.5 - 1)) / 5 tokens
    assert loss.item() == pytest.approx(-(a0 * -3.0 + a1 * -2.0) / 5)
    assert ("kl" in metrics) == (beta != 0)
    loss.backward()  # d loss / d logp = -A_i / 5 on each kept token
    expected = torch.tensor([[-a0 / 5, -a0 / 5, 0.0], [-a1 / 5, -a1 / 5, -a1 / 5]])
    assert torch.allclose(logp.grad, expected)


def test_the_baseline_is_kept_in_checkpoints(tmp_path):
    cfg = compose(["algorithm=reinforce"])
    algo = Reinforce(cfg.algorithm, StubPolicy(None, None))
    assert algo.state_dict() == {}  # nothing learned yet
    algo.baseline = 0.3
    again = Reinforce(cfg.algorithm, StubPolicy(None, None))
    again.load_state_dict(algo.state_dict())
    assert again.baseline == 0.3


def test_it_trains_and_resumes_on_the_tiny_model(tmp_path):
    common = ["model=tiny", "algorithm=reinforce", "algorithm.beta=0", "trainer.batch_size=2",
              "algorithm.max_completion_length=8", "trainer.eval_size=8",
              "trainer.eval_max_new_tokens=8", "trainer.progress=false",
              "trainer.tensorboard=false", "trainer.save_every=1"]
    run_job(compose([*common, "trainer.max_steps=2"]), run_dir=tmp_path / "run")
    last = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    saved = torch.load(last / "trainer_state.pt", weights_only=True)["algorithm"]["baseline"]
    summary = run_job(compose([*common, "trainer.max_steps=3"]), run_dir=tmp_path / "run")
    assert summary["steps"] == 3 and summary["algorithm"] == "reinforce"
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["baseline"] == pytest.approx(saved)
    # the resumed step moved on from the checkpoint's baseline (beta 0: return = reward)
    assert rows[2]["baseline"] == pytest.approx(0.9 * saved + 0.1 * rows[2]["reward_mean"])
