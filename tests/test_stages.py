"""Pipelines: model.init=runs/<name> starts a run from an earlier run's result, which is
also its reference; summary.json records the chain; the delta stays against the base;
bad starting points are refused with one line, nothing written over."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from gym_core.deltas.delta import FullPrecision
from gym_core.model.policy import load_base, load_policy
from gym_core.train.job import quantize_and_score, run_job
from tests.conftest import compose, run_cli

FAST = ["model=tiny", "trainer.eval_size=8", "trainer.batch_size=2",
        "trainer.eval_max_new_tokens=8", "trainer.progress=false", "trainer.tensorboard=false"]
ONLINE = ["algorithm.num_generations=4", "algorithm.max_completion_length=8"]
IDS = torch.tensor([[5, 17, 99, 42, 7, 120, 3, 64]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def stage_one(tmp_path, *extra):
    """SFT for 2 steps at a large learning rate: weights far from the base."""
    run = tmp_path / "runs" / "sft"
    summary = run_job(compose([*FAST, "algorithm=sft", "algorithm.lr=5e-2",
                               "trainer.max_steps=2", "trainer.warmup_steps=0", *extra]),
                      run_dir=run)
    return run, summary


@pytest.fixture(scope="module")
def sft_stage(tmp_path_factory):
    """Stage 1 with LoRA, trained once for this module: the tests only read it (each
    writes its own later stages elsewhere)."""
    return stage_one(tmp_path_factory.mktemp("stage1"))


def stage_one_result(run, full=False):
    """Stage 1's final model, rebuilt independently of gym.stages (peft / transformers)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if full:
        return AutoModelForCausalLM.from_pretrained(run / "final").eval()
    base, _ = load_base(compose(["model=tiny"]).model)
    return PeftModel.from_pretrained(base, str(run / "final")).eval()


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_the_second_stage_starts_from_and_refers_to_the_first_stages_result(tmp_path, full,
                                                                           request):
    run, _ = stage_one(tmp_path, "model.finetune=full") if full else \
        request.getfixturevalue("sft_stage")
    cfg = compose([*FAST, "algorithm=grpo", f"model.init={run}"])
    policy = load_policy(cfg.model, torch.device("cpu"))
    expected = logits(stage_one_result(run, full))
    base = logits(load_base(cfg.model)[0])
    assert (expected - base).abs().max() > 1e-3  # stage 1 did move the weights
    torch.testing.assert_close(logits(policy.model), expected, rtol=1e-5, atol=1e-5)
    policy.keep_reference()
    with policy.reference() as ref:  # the reference is stage 1's result, not the base
        torch.testing.assert_close(logits(ref), expected, rtol=1e-5, atol=1e-5)


def test_sft_then_grpo_records_the_chain(tmp_path, sft_stage):
    run, first = sft_stage
    second = run_job(compose([*FAST, *ONLINE, "algorithm=grpo", f"model.init={run}",
                              "trainer.max_steps=2", "run.name=grpo"]),
                     run_dir=tmp_path / "runs" / "grpo")
    assert second["init"]["run"] == str(run.resolve()) and second["init"]["algorithm"] == "sft"
    # the starting policy is stage 1's: the held-out preference accuracy it starts from is
    # the one stage 1 ended with
    pref1, pref2 = first["eval"]["preference_accuracy"], second["eval"]["preference_accuracy"]
    assert pref2["before"] == pref1["after"]
    # a third stage from the second: the whole chain, oldest first
    third = run_job(compose([*FAST, *ONLINE, "algorithm=grpo",
                             f"model.init={tmp_path / 'runs' / 'grpo'}", "trainer.max_steps=1"]),
                    run_dir=tmp_path / "runs" / "third")
    assert [s["algorithm"] for s in third["init"]["chain"]] == ["sft", "grpo"]
    assert third["eval"]["preference_accuracy"]["before"] == pref2["after"]
    record = json.loads((tmp_path / "runs" / "third" / "final" / "gym.json").read_text())
    assert record["base"]["source"] == "tiny" and len(record["chain"]) == 2


def test_the_delta_of_a_later_stage_is_against_the_original_base(tmp_path, sft_stage):
    """Stage 2's quantized delta rebuilds stage 2's model from the *base* model: stage 1's
    change is in it (one delta file per variant on the shared base)."""
    run, _ = sft_stage
    cfg = compose([*FAST, "algorithm=grpo", f"model.init={run}"])
    policy = load_policy(cfg.model, torch.device("cpu"))
    torch.manual_seed(0)
    for n, p in policy.model.named_parameters():  # stage 2's own training, simulated
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    seen = {}

    def score(model, desc):
        seen["rebuilt"] = logits(model)
        return 0.0

    quantize_and_score(cfg, policy, FullPrecision(), tmp_path / "q", score)
    torch.testing.assert_close(seen["rebuilt"], logits(policy.model), rtol=1e-5, atol=1e-5)
    assert (seen["rebuilt"] - logits(stage_one_result(run))).abs().max() > 1e-3


def digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and ".hydra" not in p.parts}


def test_bad_starting_points_are_refused_in_one_line(tmp_path):
    args = [*FAST, "algorithm=sft", "trainer.max_steps=1"]
    run_job(compose(args), run_dir=tmp_path / "runs" / "done")  # in-process: no start-up
    # a run that stopped before its end: checkpoints, no final weights
    half = tmp_path / "runs" / "half"
    (half / "checkpoints" / "step-000001").mkdir(parents=True)
    before = digest(tmp_path / "runs" / "done")
    cases = [
        (["model.init=runs/nowhere"], "model.init='runs/nowhere': no such run directory"),
        (["model.init=runs/half"], "holds no final weights (it has checkpoints but did not "
                                   "finish"),
        (["model.init=runs/done", "model.tiny.hidden_size=32"],
         "model.init='runs/done' was trained on another base model"),
    ]
    for extra, message in cases:
        # the bad run is pointed at the finished run's directory: nothing there may change
        proc = run_cli([*args, "run.name=done", *extra], cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("gym: error")]
        assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert digest(tmp_path / "runs" / "done") == before
    (tmp_path / "runs" / "done" / "final" / "adapter_model.safetensors").unlink()
    proc = run_cli([*args, "run.name=other", "model.init=runs/done"], cwd=tmp_path)
    assert proc.returncode == 2 and "adapter_model.safetensors is missing" in proc.stderr


def test_export_rebuilds_a_later_stage_on_the_stages_before_it(tmp_path, sft_stage):
    """python -m gym_core.export of a stage-2 run merges its adapter into stage 1's result
    (not into the bare base), and its exact delta is against the original base."""
    from omegaconf import OmegaConf
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from gym_core.deltas.delta import apply_delta
    from gym_core.deltas.merge import TrainedRun, exact_delta
    from gym_core.export import ExportAppConfig, export
    from gym_core.plugin.startup import bootstrap

    first, _ = sft_stage
    cfg = compose([*FAST, "algorithm=sft", "algorithm.lr=5e-2", "trainer.max_steps=2",
                   "trainer.warmup_steps=0", "trainer.eval_before=false", f"model.init={first}"])
    second = tmp_path / "runs" / "second"
    run_job(cfg, run_dir=second)
    (second / ".hydra").mkdir()
    OmegaConf.save(cfg, second / ".hydra" / "config.yaml")  # as Hydra writes it
    out = tmp_path / "exported"
    export(OmegaConf.merge(OmegaConf.structured(ExportAppConfig(run=str(second))),
                           {"format": "hf", "out": str(out)}), bootstrap())
    exported = logits(AutoModelForCausalLM.from_pretrained(out).eval())
    with torch.no_grad():  # stage 2 as it trained: stage 1's result + stage 2's adapter
        start = stage_one_result(first).merge_and_unload()
        expected = logits(PeftModel.from_pretrained(start, str(second / "final")).eval())
    torch.testing.assert_close(exported, expected, rtol=1e-5, atol=1e-5)
    base, _ = load_base(cfg.model)
    apply_delta(base, exact_delta(TrainedRun.open(second)))
    torch.testing.assert_close(logits(base), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init,extra", [
    (False, ["model.finetune=full"]),
    (False, ["model.finetune=full", "algorithm.beta=0.1"]),
    (True, []),
    (True, ["model.finetune=full", "algorithm.beta=0.1"]),
], ids=["full", "full-kl", "init-lora", "init-full-kl"])
def test_a_run_loads_its_base_once(tmp_path, sft_stage, monkeypatch, with_digit_reward, init,
                                   extra):
    """A run that quantizes its delta loads the base model once: the base its delta is
    against and rebuilt on is the one kept from that load (a full fine-tune's reference
    copy, or after model.init a copy taken before stage 1 was applied: not the start
    that the reference is), the base's very weights."""
    from gym_core.model import policy as model_policy
    from gym_core.train import job

    cfg = compose([*FAST, *ONLINE, "trainer.max_steps=1", "trainer.eval_before=false",
                   "quant=bitdelta", "algorithm.rewards=[digit_share]", "algorithm.lr=1e-2",
                   *extra, *([f"model.init={sft_stage[0]}"] if init else [])])
    want = {k: v.clone() for k, v in load_base(cfg.model)[0].state_dict().items()}
    loads, bases = [], []
    build, rebuild = model_policy.tiny_model, job.rebuild
    monkeypatch.setattr(model_policy, "tiny_model", lambda *a: loads.append(1) or build(*a))
    monkeypatch.setattr(job, "rebuild", lambda base, delta: bases.append(
        {k: v.clone() for k, v in base.state_dict().items()}) or rebuild(base, delta))
    summary = run_job(cfg, run_dir=tmp_path / "run")
    assert summary["steps"] == 1 and summary["quant_stats"]["delta_params"] > 0
    assert len(loads) == 1 and len(bases) == 1
    assert bases[0].keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(bases[0][k], v), k
