"""The training loop's options end to end on the tiny model (in-process, seconds each)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from gym_core.train.checkpoint import list_checkpoints
from gym_core.train.job import run_job
from tests.conftest import compose


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_every_loss_type_trains(tmp_path, tiny_overrides, loss_type):
    s = run_job(compose([*tiny_overrides, "trainer.max_steps=1", f"algorithm.loss_type={loss_type}",
                         "trainer.eval_before=false"]), run_dir=tmp_path)
    assert s["steps"] == 1 and json.loads((tmp_path / "summary.json").read_text())["steps"] == 1


def test_full_finetune_with_kl_accumulation_and_iterations(tmp_path, tiny_overrides,
                                                          with_digit_reward):
    """Full fine-tuning keeps a frozen reference copy (beta > 0), two micro-batches per
    step, two updates per rollout batch (old log-probs from a separate pass), and the
    quantized delta of the full model. (The digit reward has spread on a random model:
    the update is driven by advantages, not by rounding.)"""
    s = run_job(compose([
        *tiny_overrides, "model.finetune=full", "algorithm.beta=0.1", "trainer.grad_accum=2",
        "algorithm.rewards=[digit_share]",
        "algorithm.num_iterations=2", "algorithm.lr=1e-3", "trainer.max_steps=2",
        "quant=bitdelta",
    ]), run_dir=tmp_path)
    rows = metrics(tmp_path)
    assert len(rows) == 2
    assert rows[0]["advantage_abs_mean"] > 0
    # the step's KL is the mean over its two updates: the first at the reference (0), the
    # second after the first moved the weights; then it keeps away from the frozen copy
    assert 0 < rows[0]["kl"] < 0.05 and rows[1]["kl"] > 0
    q = s["quant_stats"]
    # full fine-tuning changes embeddings and norms too: stored as they are, so > 1 bit
    assert q["bits_per_weight"] > 1.5
    weights = load_file(str(list_checkpoints(tmp_path)[-1][1] / "trainable.safetensors"))
    assert "model.embed_tokens.weight" in weights and not any("lora" in k for k in weights)


def test_jsonl_data_end_to_end(tmp_path, tiny_overrides):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"question": f"{i}+1?", "target": i + 1}) + "\n"
                             for i in range(30)))
    s = run_job(compose([
        *tiny_overrides, "data=jsonl", f"data.train_file={train}", "data.prompt_field=question",
        "data.answer_field=target", "data.test_fraction=0.2", "trainer.max_steps=1",
    ]), run_dir=tmp_path / "run")
    assert s["data"] == "jsonl" and s["eval"]["test_examples"] == 6


def test_kl_metric_and_reference_with_lora(tmp_path, tiny_overrides):
    run_job(compose([*tiny_overrides, "algorithm.beta=0.04", "algorithm.lr=1e-2",
                     "trainer.max_steps=2", "trainer.eval_before=false"]), run_dir=tmp_path)
    rows = metrics(tmp_path)
    assert all("kl" in r for r in rows)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # LoRA B starts at 0: policy == base


def test_tensorboard_events_written(tmp_path, tiny_overrides):
    run_job(compose([*tiny_overrides, "trainer.tensorboard=true", "trainer.max_steps=1",
                     "trainer.eval_before=false"]), run_dir=tmp_path)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100
