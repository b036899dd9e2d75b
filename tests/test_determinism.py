"""trainer.deterministic=true: the same run at 1 and 2 threads, to the bit (README,
"Reproducibility"), and the fixed-order norm it clips with."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from gym_core.train.algorithm import clip_grad_norm_fixed_order, fixed_order_sum_of_squares
from tests.conftest import run_cli


def test_fixed_order_norm_is_the_same_at_every_thread_count():
    g = torch.Generator().manual_seed(0)
    big = torch.randn(3_000_001, generator=g)  # far above torch's grain size
    before = torch.get_num_threads()
    try:
        values = []
        for n in (1, 2):
            torch.set_num_threads(n)
            values.append(fixed_order_sum_of_squares(big).item())
    finally:
        torch.set_num_threads(before)
    assert values[0] == values[1]
    assert values[0] == pytest.approx(float((big.double() ** 2).sum()), rel=1e-12)
    p = torch.nn.Parameter(torch.zeros(5))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0, 0.0])
    assert clip_grad_norm_fixed_order([p], 1.0) == pytest.approx(5.0)
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-5)  # clipped as torch does


@pytest.fixture
def digits_env(digits_plugin_path):
    return {"PYTHONPATH": digits_plugin_path}


def test_deterministic_run_is_identical_at_1_and_2_threads(tmp_path, digits_env):
    """A full fine-tune (every weight, embeddings included: the largest reductions), with
    a reward that moves the weights on a random model."""
    common = ["model=tiny", "model.finetune=full", "trainer.eval_size=4",
              "trainer.batch_size=2", "algorithm.num_generations=4",
              "algorithm.max_completion_length=8", "trainer.eval_max_new_tokens=4",
              "trainer.progress=false", "logger=[]", "trainer.max_steps=2",
              "algorithm.rewards=[digit_share]", "algorithm.lr=1e-2",
              "trainer.deterministic=true"]
    out = {}
    for n in (1, 2):
        done = run_cli([*common, f"trainer.threads={n}", f"run.name=t{n}"], cwd=tmp_path,
                       env=digits_env)
        assert done.returncode == 0, done.stderr[-2000:]
        run = tmp_path / "runs" / f"t{n}"
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        numbers = [{k: v for k, v in r.items() if "seconds" not in k and "per_second" not in k}
                   for r in rows]
        weights = hashlib.sha256((run / "final" / "model.safetensors").read_bytes()).hexdigest()
        out[n] = (numbers, weights)
    assert out[1][0][0]["grad_norm"] > 0  # the weights did move
    assert out[1] == out[2]
