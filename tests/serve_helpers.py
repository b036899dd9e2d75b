"""Variants for the serving tests, made as gym makes them: random deltas quantized by the
real quantizer plugins and written with save_packed, LoRA adapters saved by peft, each in
a run directory with Hydra's record of the config; and their merged models, the
reference a served variant must match."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from gym_core.config.schema import ALL_LINEAR
from gym_core.deltas.delta import apply_delta, read_delta, save_packed
from gym_core.model.policy import load_base
from gym_core.plugin.startup import bootstrap
from gym_core.sampling.generation import Sampling, generate
from tests.conftest import REPO, compose

PROMPTS = ["What is 2 + 3?", "Name a colour.", "Write one word about the sea, please."]


def model_cfg(overrides=()):
    return compose(["model=tiny", *overrides]).model


def random_delta(model, seed: int, scale: float = 0.3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # large enough that the tiny random model answers differently with each variant
    return {n: torch.randn(p.shape, generator=g) * scale
            for n, p in model.named_parameters() if n.endswith("_proj.weight")}


def make_run(root: Path, name: str, kind: str, seed: int, overrides=(), **quant) -> Path:
    """runs/<name>/ with .hydra/config.yaml and either delta/<kind>.safetensors (a
    quantizer's name) or final/ (kind "lora")."""
    cfg = compose(["model=tiny", *overrides] + ([f"quant={kind}"] if kind != "lora" else []))
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    base, tok = load_base(cfg.model)
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR))
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:  # peft starts B at zero: give the adapter an effect
                torch.nn.init.normal_(p, std=0.3)
        peft_model.save_pretrained(run / "final")
        return run
    plugins = bootstrap()
    comp = plugins.component("quant", kind)
    qcfg = OmegaConf.merge(OmegaConf.structured(comp.config), quant)
    packed = comp.load()(qcfg).quantize(random_delta(base, seed))
    save_packed(packed, run / "delta" / f"{kind}.safetensors")
    return run


def merged_model(run: Path, overrides=()):
    """The variant merged into a copy of the base (the reference)."""
    base, tok = load_base(model_cfg(overrides))
    if (run / "final" / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(base, run / "final").merge_and_unload().eval(), tok
    (delta,) = (run / "delta").glob("*.safetensors")
    apply_delta(base, read_delta(delta, bootstrap()))
    return base, tok


def chat_ids(tok, prompt: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    return tok(text, add_special_tokens=False).input_ids


@torch.no_grad()
def greedy(model, tok, ids: list[int], max_new_tokens: int) -> list[int]:
    """The merged model's greedy tokens (gym's KV-cached sampler), cut after EOS."""
    t = torch.tensor([ids])
    out = generate(model, t, torch.ones_like(t), num_samples=1, max_new_tokens=max_new_tokens,
                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                   sampling=Sampling(do_sample=False))[0].tolist()
    return out[: out.index(tok.eos_token_id) + 1] if tok.eos_token_id in out else out


def greedy_text(model, tok, prompt: str, max_new_tokens: int) -> str:
    tokens = greedy(model, tok, chat_ids(tok, prompt), max_new_tokens)
    return tok.decode([t for t in tokens if t != tok.eos_token_id], skip_special_tokens=True)


class ServerProcess:
    """``python -m gym_core.serve ARGS`` on 127.0.0.1, a free port; output collected."""

    def __init__(self, args: list[str], cwd: Path, timeout: float = 300):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gym_core.serve", "--host", "127.0.0.1", "--port", "0",
             "--log-level", "warning", *args],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.url = None
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                m = re.search(r"listening on (http://\S+)/v1", line)
                if m:
                    self.url = m.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.5):
            if time.monotonic() > deadline:
                self.proc.kill()
                raise TimeoutError("the server did not start:\n" + self.output)
        if self.url is None:
            self.proc.wait(10)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise



def http(method: str, url: str, body=None, raw: bytes | None = None, timeout: float = 120):
    """(status, parsed JSON) of one plain HTTP request (stdlib: the admin routes and
    malformed bodies are outside what the openai client sends)."""
    import json
    import urllib.error
    import urllib.request

    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")
