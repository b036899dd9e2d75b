"""The real embedded default, SmolLM2-135M-Instruct: a short end-to-end run (slow)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_real_model_grpo_bitdelta_short_run(tmp_path):
    proc = run_cli(
        ["algorithm=grpo", "quant=bitdelta", "trainer.max_steps=2", "trainer.eval_size=24",
         "trainer.batch_size=2", "trainer.progress=false", "run.name=real"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # no library warning a user cannot act on (transformers' and peft's deprecations are
    # avoided at the source: README, "What the main job does")
    assert "warn" not in (proc.stdout + proc.stderr).lower(), proc.stdout + proc.stderr
    s = json.loads((tmp_path / "runs" / "real" / "summary.json").read_text())
    assert s["model"] == "SmolLM2-135M-Instruct" and s["steps"] == 2
    ev = s["eval"]
    # the instruct model already answers some additions: the task is neither 0 nor 1
    assert 0.05 < ev["before"] < 0.95
    assert 0.0 <= ev["after"] <= 1.0 and 0.0 <= ev["after_quant"] <= 1.0
    q = s["quant_stats"]
    # LoRA touches only the 7 projections of 30 layers: sign-packed, ~1 bit per weight
    assert q["bits_per_weight"] == pytest.approx(1.0, abs=0.01)
    assert q["compression_ratio"] == pytest.approx(16.0, rel=0.01)
    assert q["delta_params"] > 100_000_000 * 0.6
    rows = [json.loads(x) for x in
            (tmp_path / "runs" / "real" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["tokens_per_second"] > 0 for r in rows)


def test_real_model_dpo_short_run(tmp_path):
    proc = run_cli(
        ["algorithm=dpo", "trainer.max_steps=2", "trainer.batch_size=4", "trainer.eval_size=24",
         "trainer.progress=false", "run.name=dpo"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "runs" / "dpo" / "summary.json").read_text())
    assert s["algorithm"] == "dpo" and s["steps"] == 2
    pref = s["eval"]["preference_accuracy"]
    assert 0.0 < pref["before"] < 1.0  # the instruct model prefers some right answers already
    rows = [json.loads(x) for x in
            (tmp_path / "runs" / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)  # policy == reference
    assert all("rewards/accuracies" in r for r in rows)


def _four_additions(path):
    rows = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b),
             "completion": f"{a} + {b} = {a + b}"}
            for a, b in [(13, 8), (6, 17), (19, 4), (11, 9)]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_real_model_sft_learns_the_answers(tmp_path):
    """Four additions, the same four rows every step: SFT's NLL of their answers falls at
    every step (the answers' log-probability rises), from where the instruct model starts."""
    data = _four_additions(tmp_path / "add.jsonl")
    proc = run_cli(
        ["algorithm=sft", "data=jsonl", f"data.train_file={data}", f"data.test_file={data}",
         "trainer.max_steps=4", "trainer.batch_size=4", "trainer.warmup_steps=0",
         "trainer.eval_before=false", "trainer.progress=false", "run.name=sft"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in
            (tmp_path / "runs" / "sft" / "metrics.jsonl").read_text().splitlines()]
    nll = [r["nll"] for r in rows]
    assert nll[0] > 0.3  # the instruct model does not already write these answers
    assert all(b < a for a, b in zip(nll, nll[1:])) and nll[-1] < 0.5 * nll[0]
    s = json.loads((tmp_path / "runs" / "sft" / "summary.json").read_text())
    assert s["eval"]["metric"] == "accuracy" and s["eval"]["after"] == 1.0


def test_real_model_orpo_prefers_the_right_answers(tmp_path):
    """Four additions with a wrong answer each: ORPO raises the right answers' odds over
    the wrong ones' at every step and the NLL of the right answers falls."""
    rows = [{"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}",
             "rejected": f"{a} + {b} = {a + b + 1}"}
            for a, b in [(13, 8), (6, 17), (19, 4), (11, 9)]]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_cli(
        ["algorithm=orpo", "data=jsonl", f"data.train_file={data}", f"data.test_file={data}",
         "trainer.max_steps=4", "trainer.batch_size=4", "trainer.warmup_steps=0",
         "trainer.progress=false", "run.name=orpo"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(x) for x in
               (tmp_path / "runs" / "orpo" / "metrics.jsonl").read_text().splitlines()]
    odds = [m["log_odds_chosen"] for m in metrics]
    assert all(b > a for a, b in zip(odds, odds[1:]))
    assert metrics[-1]["nll_loss"] < metrics[0]["nll_loss"]
    pref = json.loads((tmp_path / "runs" / "orpo" / "summary.json").read_text())["eval"][
        "preference_accuracy"]
    assert pref["after"] >= pref["before"] and pref["after"] == 1.0


@pytest.mark.parametrize("algorithm", ["rloo", "ppo"])
def test_real_model_rloo_and_ppo_short_runs(tmp_path, algorithm):
    """RLOO (its KL reward: an old and a reference pass) and PPO (a value head on the
    real model's 576-wide hidden states, tempered log-probs at its default T 0.7) run
    on SmolLM2 with their defaults, on a small batch."""
    proc = run_cli(
        [f"algorithm={algorithm}", "trainer.max_steps=2", "trainer.batch_size=2",
         "algorithm.num_generations=4", "algorithm.max_completion_length=16",
         "trainer.eval_size=8", "trainer.eval_before=false", "trainer.progress=false",
         f"run.name={algorithm}"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / algorithm
    s = json.loads((run / "summary.json").read_text())
    assert s["algorithm"] == algorithm and s["steps"] == 2
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # LoRA starts at the reference
    if algorithm == "ppo":
        assert rows[0]["value_mean"] == 0.0  # the head starts at zero
        if rows[0]["reward_mean"] > 0:  # non-zero returns: the value loss moved the head
            assert rows[1]["value_mean"] != 0.0


def test_converting_the_gguf_leaves_the_seeded_generator_alone(tmp_path, capsys):
    """The first run on a machine converts SmolLM2's GGUF; a run seeds torch's generator
    before loading its model (the adapter's initialisation draws from it), so the
    conversion must not draw from that generator: the first run would otherwise differ
    from every later one with the same seed (it did: seed 0's adapter, a 2% different
    first gradient)."""
    import torch

    from gym_core.model.policy import smollm2_folder

    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    folder = smollm2_folder(str(tmp_path / "cache"))  # converts: the cache is empty
    assert (folder / "model.safetensors").is_file()
    assert torch.equal(torch.rand(4), expected)
    # the conversion says what the wait is, once
    assert f"gym: converting SmolLM2-135M-Instruct.Q4_1.gguf to a Hugging Face folder, " \
        f"once: {folder}" in capsys.readouterr().out
    torch.manual_seed(0)
    assert smollm2_folder(str(tmp_path / "cache")) == folder  # cached: nothing drawn
    assert torch.equal(torch.rand(4), expected)
    assert "converting" not in capsys.readouterr().out
