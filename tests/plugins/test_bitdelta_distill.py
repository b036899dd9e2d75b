"""BitDelta scale distillation: only the scales move, and the logits get closer to the
fine-tuned model's; the run reports accuracy with and without it."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf

from gym_bitdelta import BitDeltaConfig
from gym_bitdelta.bitdelta import BitDeltaQuantizer
from gym_core.config.schema import TinyModelConfig
from gym_core.deltas.delta import CalibrationContext, apply_delta
from gym_core.model.policy import CHATML_TEMPLATE, tiny_model, tiny_tokenizer
from gym_core.train.job import run_job
from tests.conftest import compose


def tiny_pair():
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    base = tiny_model(TinyModelConfig(), len(tok), tok.pad_token_id, tok.eos_token_id).eval()
    g = torch.Generator().manual_seed(0)
    delta = {name: torch.randn(p.shape, generator=g) * 0.02 * p.abs().mean()
             * torch.linspace(0.2, 3.0, p.shape[1])  # column-dependent: one scale is off
             for name, p in base.named_parameters() if name.endswith("_proj.weight")}
    fine = copy.deepcopy(base)
    apply_delta(fine, delta)
    return tok, base, fine, delta


def logit_mse(model, teacher, enc):
    with torch.no_grad():
        return float((model(**enc).logits - teacher(**enc).logits).square().mean())


def test_distillation_moves_only_scales_and_gets_closer_to_the_fine_tune():
    tok, base, fine, delta = tiny_pair()
    assert tok.chat_template == CHATML_TEMPLATE
    prompts = [f"<|im_start|>user\nWhat is {a} + {b}?<|im_end|>\n<|im_start|>assistant\n"
               for a in range(6) for b in range(6)]
    q = BitDeltaQuantizer(OmegaConf.structured(BitDeltaConfig(
        distill_steps=30, distill_lr=1e-3, distill_batch_size=4)))
    packed = q.quantize(delta)
    ctx = CalibrationContext(teacher=fine, load_base=lambda: copy.deepcopy(base),
                             tokenizer=tok, prompts=prompts, device=torch.device("cpu"))
    distilled = q.calibrate(packed, ctx)
    for key in delta:  # signs are frozen, bit for bit
        assert torch.equal(distilled.tensors[f"{key}.signs"], packed.tensors[f"{key}.signs"])
    moved = [k for k in delta if not torch.equal(distilled.tensors[f"{k}.scale"],
                                                 packed.tensors[f"{k}.scale"])]
    assert len(moved) == len(delta)
    assert q.stats()["distill_loss_last"] < q.stats()["distill_loss_first"]

    enc = tok(prompts[-8:], return_tensors="pt", padding=True, add_special_tokens=False)
    enc = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    plain, tuned = copy.deepcopy(base), copy.deepcopy(base)
    apply_delta(plain, q.dequantize(packed))
    apply_delta(tuned, q.dequantize(distilled))
    assert logit_mse(tuned, fine, enc) < logit_mse(plain, fine, enc)
    # base untouched by the training (it was a fresh copy; the teacher too)
    assert all(p.grad is None for p in base.parameters())


def test_no_distillation_means_no_calibration():
    q = BitDeltaQuantizer(OmegaConf.structured(BitDeltaConfig()))
    assert q.calibrate(q.quantize({"a.q_proj.weight": torch.ones(2, 2)}), None) is None


def test_run_reports_accuracy_with_and_without_distillation(tmp_path, tiny_overrides):
    cfg = compose([*tiny_overrides, "trainer.max_steps=1", "run.name=distill",
                   "quant=bitdelta", "quant.distill_steps=3"])
    summary = run_job(cfg, run_dir=tmp_path / "distill")
    q = summary["quant_stats"]
    assert 0.0 <= summary["eval"]["after_quant"] <= 1.0
    assert 0.0 <= q["after_quant_uncalibrated"] <= 1.0
    assert q["distill_steps"] == 3
    # (the tiny model's rewards are all 0, so GRPO's delta may be exactly zero here: the
    # unit test above checks the distillation itself)
    assert set(q["error"]["total"]) == {"rel_fro_error", "snr_db", "cosine"}
    on_disk = json.loads((tmp_path / "distill" / "summary.json").read_text())
    assert on_disk["quant_stats"]["after_quant_uncalibrated"] == q["after_quant_uncalibrated"]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
