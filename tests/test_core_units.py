"""Small pieces of the core: answer reading, completion masks, the LR schedule, data."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from gym_core.base.errors import GymError
from gym_core.config.schema import ArithmeticConfig, TrainerConfig
from gym_core.data.rewards import accuracy, extract_answer
from gym_core.data.tasks import Sampler, arithmetic_task
from gym_core.deltas.delta import map_tensors
from gym_core.sampling.generation import completion_masks
from gym_core.train.loop import lr_lambda


@pytest.mark.parametrize(
    "text,answer",
    [
        ("12 + 7 = 19", "19"),
        ("The answer is 19.", "19"),
        ("12 + 7 = 19\n\nThis is a classic example: 12 + 7 is", "19"),  # rambles on
        ("We get \\boxed{19} since 12 and 7", "19"),
        ("The sum of 1,200 and 34 is 1,234", "1234"),
        ("I think it's 19", "19"),
        ("no number here", None),
        ("-3 + 1 = -2", "-2"),
    ],
)
def test_extract_answer_reads_answers_as_models_write_them(text, answer):
    assert extract_answer(text) == answer


def test_accuracy_reward_compares_numbers():
    out = accuracy(["q"] * 3, ["12 + 7 = 19", "19.0", "The answer is 18."],
                   [{"answer": "19"}] * 3)
    assert out == [1.0, 1.0, 0.0]


def test_completion_masks_include_first_eos_and_flag_truncation():
    eos = 2
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 9, 9, 9, 9]])
    mask, truncated = completion_masks(ids, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_schedule_warms_up_then_decays(schedule):
    f = lr_lambda(OmegaConf.structured(TrainerConfig(warmup_steps=2, lr_scheduler=schedule)), 10)
    assert [f(0), f(1)] == pytest.approx([1 / 3, 2 / 3])
    assert f(2) == pytest.approx(1.0)
    end = {"constant": 1.0, "linear": 1 / 8, "cosine": 0.5 * (1 + torch.cos(torch.tensor(
        7 / 8 * torch.pi)).item())}[schedule]
    assert f(9) == pytest.approx(end, abs=1e-6)


def test_unknown_schedule_is_a_clear_error():
    """Refused by the config check (TrainerConfig declares the schedules), not by the loop."""
    from gym_core.config.fields import check_values

    with pytest.raises(GymError, match="trainer.lr_scheduler='step' is not one of constant"):
        check_values(OmegaConf.structured(TrainerConfig(lr_scheduler="step")), "trainer")


def test_arithmetic_splits_are_seeded_and_disjoint():
    cfg = OmegaConf.structured(ArithmeticConfig(max_value=9, test_size=20, seed=3))
    a, b = arithmetic_task(cfg), arithmetic_task(cfg)
    assert a.test == b.test and len(a.test) == 20 and len(a.train) == 80
    assert not {e["prompt"] for e in a.test} & {e["prompt"] for e in a.train}
    ex = a.train[0]
    x, y = (int(v) for v in ex["prompt"].removeprefix("What is ").rstrip("?").split(" + "))
    assert ex["answer"] == str(x + y)
    from gym_core.config.fields import check_values

    with pytest.raises(GymError, match="data.test_size=4 must be between 1 and 3"):
        check_values(OmegaConf.structured(ArithmeticConfig(max_value=1, test_size=4)), "data")


def test_sampler_resumes_where_it_stopped():
    whole = Sampler(7, seed=1).take(20)
    s = Sampler(7, seed=1)
    first = s.take(9)
    resumed = Sampler(7, seed=1, position=s.position)
    assert first + resumed.take(11) == whole
    assert sorted(whole[:7]) == list(range(7))  # each epoch is a permutation


def test_map_tensors_keeps_order_and_raises_a_worker_error():
    delta = {f"t{i}": torch.full((2,), float(i)) for i in range(9)}

    def fn(key, t):
        return key, float(t.sum())

    assert map_tensors(fn, delta) == [(f"t{i}", 2.0 * i) for i in range(9)]

    def bad(key, t):
        if key == "t4":
            raise GymError(f"delta tensor '{key}' is bad")
        return key

    with pytest.raises(GymError, match="'t4' is bad"):
        map_tensors(bad, delta)
