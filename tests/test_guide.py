"""docs/guide.md's commands run: every ```bash block, in order, in one shell, in an empty
directory. Commands that start a job must use the page's $FAST flags (the tiny model), so
the page stays cheap to check (exports read a run the page trained that way)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

GUIDE = REPO / "docs" / "guide.md"
CHEAP = ("$FAST", "--help", "--cfg", "--plugins", "python -m gym_core.export ",
         "gym_core.serve --base tiny", "gym_core.ui --runs", "gym_core.eval model=tiny")


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```$", text, flags=re.M | re.S)


def test_every_job_in_the_guide_uses_the_fast_flags():
    blocks = bash_blocks(GUIDE.read_text(encoding="utf-8"))
    assert len(blocks) >= 8
    jobs = [ln for b in blocks for ln in b.splitlines() if "python -m gym_core" in ln]
    slow = [ln for ln in jobs if not any(flag in ln for flag in CHEAP)]
    assert not slow, f"these guide commands would train the real model: {slow}"


def test_the_guides_commands_run(tmp_path):
    script = "\n".join(bash_blocks(GUIDE.read_text(encoding="utf-8")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           # `python` is this interpreter, as after `. .venv/bin/activate`
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + "\n" + out.stderr[-3000:]
    runs = tmp_path / "runs"
    assert (runs / "first" / "delta" / "bitdelta.safetensors").is_file()
    assert (runs / "doubles" / "summary.json").is_file()
    chain = json.loads((runs / "sft-grpo" / "summary.json").read_text())["init"]["chain"]
    assert [(Path(c["run"]).resolve(), c["algorithm"]) for c in chain] == [
        ((runs / "sft").resolve(), "sft")]
    assert (runs / "sweep" / "sweep_summary.csv").is_file()
    assert "resuming" in out.stdout
    assert "epsilon_high: 0.3" in out.stdout and "lr_scheduler: cosine" in out.stdout
    export = runs / "chat" / "export"
    for path in ("hf/model.safetensors", "chat-q8_0.gguf", "lora/adapter_config.json",
                 "hf-bitdelta/model.safetensors"):
        assert (export / path).is_file(), path
        assert f"wrote {Path('runs/chat/export') / path}" in out.stdout, path
    assert "LlamaForCausalLM chat template: True" in out.stdout  # the GGUF, read back
    assert f"base: {(export / 'lora' / 'base').resolve()}" in out.stdout
    # the served variants answered, through curl and the openai client
    assert '"object":"chat.completion"' in out.stdout
    assert "['tiny', 'first', 'second', 'doubles']" in out.stdout and "'sweep0'" in out.stdout
    assert "<title>gym · Runs</title>" in out.stdout  # the web UI answered
    # training-free GRPO with the served tiny model as the API policy: the library
    # exported in the paper's format, the run's API cost in its summary
    assert isinstance(json.loads((tmp_path / "library.json").read_text()), dict)
    assert re.search(r"^[0-9.e-]+ USD$", out.stdout, re.M)
    usage = json.loads((runs / "tfgrpo-api" / "api_usage.json").read_text())
    assert usage["total"]["calls"] > 0 and "local-secret" not in json.dumps(usage)
    # "Your own data": a parquet file, a refused type (nothing written), a mixture, reasoning-gym
    assert (runs / "pairs" / "summary.json").is_file()
    assert "gym: error: algorithm=dpo needs preference pairs" in out.stderr
    assert {p.name for p in (runs / "wrong-type").rglob("*") if p.is_file()} <= {
        "__main__.log", ".gym.lock"}  # no record, checkpoint or summary
    assert '"data/rows_flat": ' in out.stdout and '"data/rows_pairs_folder": ' in out.stdout
    rg = json.loads((runs / "rg" / "summary.json").read_text())["eval"]
    assert rg["metric"] == "reasoning_gym" and rg["after"] is not None
    assert "<title>gym · Compare</title>" in out.stdout
    assert "['avg@4', 'pass@1', 'pass@4']" in out.stdout  # python -m gym_core.eval --json
    assert (runs / "results.sqlite").is_file() and "(cached)" in out.stdout
