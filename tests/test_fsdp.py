"""``trainer.strategy=fsdp`` (FSDP2 on CPU with gloo) under torchrun with 2 processes: the
same losses and final weights as DDP on the same seed, each rank holding half of the
weights; checkpoints in gym's format that resume as an uninterrupted run would (under FSDP
or in one process) and export like any run's."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.test_distributed import launch, rows


def final_weights(run_dir):
    files = sorted((run_dir / "final").glob("*.safetensors"))
    assert files, f"no final weights in {run_dir}"
    return load_file(str(files[0]))


def same_weights(a, b, tol):
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= tol, k


def same_trajectory(a, b, rel=1e-4):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=rel, abs=1e-6)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-3)


def sft(tiny_overrides):
    common = [o for o in tiny_overrides if not o.startswith("algorithm.")]
    return [*common, "algorithm=sft", "model.finetune=full", "algorithm.lr=1e-2",
            "trainer.eval_size=8", "trainer.eval_before=false", "trainer.batch_size=2"]


def test_fsdp_full_fine_tune_equals_ddp_and_exports(tmp_path, tiny_overrides):
    """SFT, every weight trained: FSDP's losses, gradient norms and final weights are
    DDP's up to float reduction order; each rank holds about half the weights; the
    final model exports to a Hugging Face folder."""
    args = [*sft(tiny_overrides), "trainer.max_steps=2"]
    path = str(REPO)
    ddp = launch([*args, "run.name=ddp"], tmp_path, path, nproc=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    fsdp = launch([*args, "trainer.strategy=fsdp", "run.name=fsdp"], tmp_path, path, nproc=2)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    held = re.findall(r"rank (\d) holds (\d+) of the (\d+) weights", fsdp.stdout)
    assert sorted(r for r, _, _ in held) == ["0", "1"], fsdp.stdout[-2000:]
    for _, mine, total in held:  # half each, up to the padding of odd-sized rows
        assert abs(int(mine) / int(total) - 0.5) < 0.01
    a, b = rows(tmp_path / "runs/ddp"), rows(tmp_path / "runs/fsdp")
    same_trajectory(a, b)
    assert all(r["grad_norm"] > 0 for r in b)
    wa, wb = final_weights(tmp_path / "runs/ddp"), final_weights(tmp_path / "runs/fsdp")
    same_weights(wa, wb, 1e-5)
    ea = json.loads((tmp_path / "runs/ddp/summary.json").read_text())["eval"]["after"]
    eb = json.loads((tmp_path / "runs/fsdp/summary.json").read_text())["eval"]["after"]
    assert ea == pytest.approx(eb)
    out = subprocess.run([sys.executable, "-m", "gym_core.export", "run=runs/fsdp",
                          "out=exported"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "PYTHONPATH": path})
    assert out.returncode == 0, out.stderr[-3000:]
    exported = load_file(str(tmp_path / "exported/model.safetensors"))
    for k, v in wb.items():
        assert (exported[k] - v).abs().max().item() == 0.0, k


@pytest.mark.parametrize("extra", [
    ["algorithm.beta=0.05"],  # LoRA: the frozen base sharded too, the reference is it
    ["algorithm.beta=0.05", "model.finetune=full"],  # a whole frozen reference copy
    ["algorithm=ppo", "algorithm.reward_weights=[1.0]"],  # the value head in the root unit
], ids=["grpo-lora", "grpo-full", "ppo-lora"])
def test_fsdp_online_methods_equal_ddp(tmp_path, digits_plugin_path, tiny_overrides, extra):
    """GRPO and PPO: the sampler gathers the full weights each step, so both strategies
    sample the same completions, and losses and the final weights agree."""
    args = [*tiny_overrides, "algorithm.rewards=[digit_share]", "algorithm.lr=1e-2",
            "trainer.max_steps=2", "trainer.eval_before=false", "trainer.batch_size=2",
            *extra]
    ddp = launch([*args, "run.name=ddp"], tmp_path, digits_plugin_path, nproc=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    fsdp = launch([*args, "trainer.strategy=fsdp", "run.name=fsdp"], tmp_path,
                  digits_plugin_path, nproc=2)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    a, b = rows(tmp_path / "runs/ddp"), rows(tmp_path / "runs/fsdp")
    for ra, rb in zip(a, b):
        assert rb["reward_mean"] == pytest.approx(ra["reward_mean"], rel=1e-6)
        assert rb["completion_length"] == pytest.approx(ra["completion_length"], rel=1e-6)
        if "kl" in ra:
            assert rb["kl"] == pytest.approx(ra["kl"], rel=1e-3, abs=1e-7)
    same_trajectory(a, b)
    assert any(abs(r["loss"]) > 1e-6 for r in a)
    same_weights(final_weights(tmp_path / "runs/ddp"), final_weights(tmp_path / "runs/fsdp"),
                 1e-5)


def test_fsdp_dpo_full_fine_tune_with_its_sharded_reference_equals_ddp(tmp_path,
                                                                       tiny_overrides):
    common = [o for o in tiny_overrides if not o.startswith("algorithm.")]
    args = [*common, "algorithm=dpo", "model.finetune=full", "algorithm.lr=1e-3",
            "trainer.max_steps=2", "trainer.eval_size=8", "trainer.eval_before=false"]
    path = str(REPO)
    ddp = launch([*args, "run.name=ddp"], tmp_path, path, nproc=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    fsdp = launch([*args, "trainer.strategy=fsdp", "run.name=fsdp"], tmp_path, path, nproc=2)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    a, b = rows(tmp_path / "runs/ddp"), rows(tmp_path / "runs/fsdp")
    same_trajectory(a, b)
    for ra, rb in zip(a, b):
        assert rb["rewards/margins"] == pytest.approx(ra["rewards/margins"], rel=1e-3,
                                                      abs=1e-6)
    assert abs(b[-1]["rewards/margins"]) > 1e-6  # the reference and policy differ by then


def test_fsdp_checkpoints_resume_as_an_uninterrupted_run(tmp_path, tiny_overrides):
    """An FSDP run stopped after step 2 and resumed to step 3, under FSDP and (from the
    same checkpoint) in one process with the same global batch, follows the
    uninterrupted FSDP run: the checkpoint holds the full weights and optimizer state."""
    args = [*sft(tiny_overrides), "trainer.save_every=1"]
    path = str(REPO)
    whole = launch([*args, "trainer.max_steps=3", "trainer.strategy=fsdp", "run.name=whole"],
                   tmp_path, path, nproc=2)
    assert whole.returncode == 0, whole.stderr[-3000:]
    part = launch([*args, "trainer.max_steps=2", "trainer.strategy=fsdp", "run.name=part"],
                  tmp_path, path, nproc=2)
    assert part.returncode == 0, part.stderr[-3000:]
    state = (tmp_path / "runs/part/checkpoints/step-000002/trainable.safetensors")
    assert "model.embed_tokens.weight" in load_file(str(state))  # full, plain names
    import shutil

    shutil.copytree(tmp_path / "runs/part", tmp_path / "runs/solo")
    more = launch([*args, "trainer.max_steps=3", "trainer.strategy=fsdp", "run.name=part"],
                  tmp_path, path, nproc=2)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "from step 2" in more.stdout
    same_trajectory(rows(tmp_path / "runs/whole"), rows(tmp_path / "runs/part"), rel=1e-5)
    same_weights(final_weights(tmp_path / "runs/whole"), final_weights(tmp_path / "runs/part"),
                 1e-6)
    # the same checkpoint in one process (batch 4 = 2 ranks x 2): a DDP-format checkpoint
    solo = launch([*[a for a in args if a != "trainer.batch_size=2"], "trainer.batch_size=4",
                   "trainer.max_steps=3", "run.name=solo"], tmp_path, path)
    assert solo.returncode == 0, solo.stderr[-3000:]
    assert "from step 2" in solo.stdout
    same_trajectory(rows(tmp_path / "runs/whole"), rows(tmp_path / "runs/solo"))


def test_fsdp_in_one_process_trains_unsharded_with_a_note(tmp_path, tiny_overrides):
    out = launch([*sft(tiny_overrides), "trainer.max_steps=1", "trainer.strategy=fsdp",
                  "run.name=one"], tmp_path, str(REPO))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "trainer.strategy=fsdp with one process: nothing to shard" in out.stdout


def test_a_model_without_decoder_layers_is_refused_in_one_line():
    import torch

    from gym_core.base.errors import GymError
    from gym_core.model.policy import LogprobScorer
    from gym_core.train.fsdp import Sharded

    with pytest.raises(GymError, match=r"^trainer.strategy=fsdp: Linear names no decoder "
                       r"layers to shard .*use trainer.strategy=ddp$"):
        Sharded.shard(LogprobScorer(torch.nn.Linear(2, 2)), torch.device("cpu"))


def test_the_decoder_layers_are_the_units(tiny_overrides):
    """The tiny Llama's layers (LoRA-wrapped too) are found as FSDP's units."""
    from gym_core.train.fsdp import decoder_layers
    from tests.conftest import tiny_lora_policy

    policy = tiny_lora_policy()
    layers = decoder_layers(policy.model)
    assert layers and all(type(m).__name__ == "LlamaDecoderLayer" for m in layers)
    assert len(layers) == policy.model.get_base_model().config.num_hidden_layers


def test_a_log_prob_pass_outside_the_scorer_is_refused(tmp_path, tiny_overrides):
    """An algorithm that calls completion_logprobs on the sharded model itself (not
    through policy.logprobs) sees shards: refused in one line, not a DTensor traceback."""
    from tests.test_distributed import replica_path

    out = launch([*tiny_overrides, "algorithm=raw_logprobs", "trainer.max_steps=1",
                  "trainer.eval_before=false", "trainer.strategy=fsdp", "run.name=raw"],
                 tmp_path, replica_path(tmp_path), nproc=2)
    assert out.returncode != 0
    assert ("completion_logprobs was called on the FSDP-sharded model outside the scorer"
            in out.stderr), out.stderr[-3000:]
