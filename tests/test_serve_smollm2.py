"""The server on the real SmolLM2-135M-Instruct: a BitDelta and a LoRA variant answer
greedily exactly as their merged models do."""

from __future__ import annotations

import openai
import pytest
import torch
from omegaconf import OmegaConf

from gym_core.config.schema import ALL_LINEAR
from gym_core.deltas.delta import apply_delta, read_delta, save_packed
from gym_core.model.policy import load_base
from gym_core.plugin.startup import bootstrap
from tests.conftest import compose
from tests.serve_helpers import ServerProcess, greedy_text

PROMPTS = ["What is 12 + 7?", "Name the largest planet of the solar system."]


@pytest.mark.slow
def test_smollm2_variants_answer_like_their_merged_models(tmp_path):
    cfg = compose(["model=smollm2", "quant=bitdelta"])
    base, tok = load_base(cfg.model)
    bd = tmp_path / "runs" / "bd"
    (bd / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, bd / ".hydra" / "config.yaml")
    g = torch.Generator().manual_seed(0)
    delta = {n: torch.randn(p.shape, generator=g) * 2e-2 for n, p in base.named_parameters()
             if n.endswith("_proj.weight")}
    comp = bootstrap().component("quant", "bitdelta")
    save_packed(comp.load()(cfg.quant).quantize(delta), bd / "delta" / "bitdelta.safetensors")
    del delta

    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR))
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    base = peft_model.unload()

    srv = ServerProcess(["--base", "smollm2", "--variants", f"bd={bd}",
                         f"lora={tmp_path / 'adapter'}"], cwd=tmp_path)
    try:
        assert srv.url, srv.output
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0,
                               timeout=300)

        def served(model, prompt):
            r = client.chat.completions.create(model=model, temperature=0, max_tokens=16,
                                               messages=[{"role": "user", "content": prompt}])
            return r.choices[0].message.content

        answers = {m: [served(m, p) for p in PROMPTS] for m in ("smollm2", "bd", "lora")}
    finally:
        assert srv.stop() == 0, srv.output
    assert answers["smollm2"] == [greedy_text(base, tok, p, 16) for p in PROMPTS]
    bd_model, _ = load_base(cfg.model)
    apply_delta(bd_model, read_delta(bd / "delta" / "bitdelta.safetensors", bootstrap()))
    assert answers["bd"] == [greedy_text(bd_model, tok, p, 16) for p in PROMPTS]
    del bd_model
    lora_model = PeftModel.from_pretrained(load_base(cfg.model)[0], tmp_path / "adapter")
    lora_model = lora_model.merge_and_unload().eval()
    assert answers["lora"] == [greedy_text(lora_model, tok, p, 16) for p in PROMPTS]
    assert answers["bd"] != answers["smollm2"] and answers["lora"] != answers["smollm2"]
