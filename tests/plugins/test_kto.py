"""KTO: the loss and its reference point against hand computations; data errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gym_core.errors import GymError
from gym_core.run import run_job
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
