"""End-to-end runs on the tiny model: outputs on disk, checkpoints, resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from gym_core.train.checkpoint import list_checkpoints
from tests.conftest import compose, run_cli


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_cli_tiny_run_writes_outputs_and_resumes(tmp_path, tiny_overrides):
    args = [*tiny_overrides, "trainer.max_steps=2", "run.name=smoke", "quant=bitdelta"]
    first = run_cli(args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "runs" / "smoke"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["algorithm"] == "grpo"
    assert summary["model"] == "tiny-llama" and summary["quant"] == "bitdelta"
    for key in ("before", "after", "after_quant"):
        assert 0.0 <= summary["eval"][key] <= 1.0
    assert summary["quant_stats"]["bits_per_weight"] == pytest.approx(1.0, abs=0.05)
    assert summary["quant_stats"]["delta_bytes"] == (run_dir / "delta/bitdelta.safetensors").stat().st_size
    assert summary["train_seconds"] > 0 and summary["tokens_per_second"] > 0
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "reward_mean", "reward_std", "clip_fraction", "completion_length",
                "tokens_per_second", "grad_norm", "lr"):
        assert key in rows[0], key
    assert [s for s, _ in list_checkpoints(run_dir)] == [2]
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()

    second = run_cli([*args[:-3], "trainer.max_steps=4", "run.name=smoke"], cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "from step 2" in second.stdout
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4
    assert [s for s, _ in list_checkpoints(run_dir)] == [2, 4]  # keep_last=2


def test_every_phase_shows_a_bar_and_no_library_warns(tmp_path, tiny_overrides):
    """The main job's phases, progress on (the default): each evaluation, the preference
    scoring and training has its progress bar, the start says what runs where, and no
    library prints a warning the user cannot act on (README, "What the main job does")."""
    args = [o for o in tiny_overrides if o != "trainer.progress=false"]
    out = run_cli([*args, "trainer.max_steps=1", "quant=bitdelta", "run.name=shown"],
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    for bar in ("eval before:", "preference before:", "train:", "eval after:",
                "preference after:", "eval after quant:"):
        assert f"{bar} 100%" in out.stderr, (bar, out.stderr[-3000:])
    first = out.stdout.splitlines()[0]
    assert first.startswith("gym: grpo on arithmetic, tiny-llama") and "runs/shown" in first
    assert "warn" not in (out.stdout + out.stderr).lower(), out.stdout + out.stderr


def test_resumed_run_matches_uninterrupted_one(tmp_path, tiny_overrides, with_digit_reward):
    from gym_core.train.job import run_job

    base = [*tiny_overrides, "algorithm.rewards=[digit_share]", "algorithm.lr=1e-2",
            "trainer.save_every=2", "trainer.eval_before=false"]
    straight = run_job(compose([*base, "trainer.max_steps=4"]), run_dir=tmp_path / "straight")
    run_job(compose([*base, "trainer.max_steps=2"]), run_dir=tmp_path / "split")
    resumed = run_job(compose([*base, "trainer.max_steps=4"]), run_dir=tmp_path / "split")
    assert straight["steps"] == resumed["steps"] == 4

    a = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    b = read_jsonl(tmp_path / "split" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("loss", "reward_mean", "grad_norm", "completion_length"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    # the run learnt something (weights moved) and both ended at the same weights
    wa = load_file(str(list_checkpoints(tmp_path / "straight")[-1][1] / "trainable.safetensors"))
    wb = load_file(str(list_checkpoints(tmp_path / "split")[-1][1] / "trainable.safetensors"))
    assert any(t.abs().sum() > 0 for k, t in wa.items() if "lora_B" in k)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
