"""Training-Free GRPO on the real SmolLM2-135M-Instruct with llm=local: one short step
where the policy reflects on its own rollouts (slow; about a minute on 2 CPU cores)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_real_model_cl_grpo_local_llm_short_run(tmp_path):
    proc = run_cli(
        ["algorithm=cl_grpo", "experience_store=json", "llm=local", "trainer.max_steps=1",
         "trainer.batch_size=4", "algorithm.num_generations=4",
         "algorithm.max_completion_length=16", "llm.max_new_tokens=64",
         "trainer.eval_size=8", "trainer.eval_max_new_tokens=16", "trainer.progress=false",
         "trainer.tensorboard=false", "run.name=cl"],
        cwd=tmp_path, env={"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "cl"
    s = json.loads((run / "summary.json").read_text())
    assert s["model"] == "SmolLM2-135M-Instruct" and s["steps"] == 1
    assert s["algorithm_stats"]["library_step"] == 1
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert row["groups"] == 4
    # every kept group's trajectories were summarised, every contrasting group reflected on
    assert row["llm_calls"] >= 4 * row["groups_kept"] + row["groups_contrasted"]
    lib = json.loads((run / "experiences" / "library.json").read_text())
    assert lib["step"] == 1 and len(lib["experiences"]) == s["algorithm_stats"]["library_size"]
    assert all("\n" not in e["text"] for e in lib["experiences"])
