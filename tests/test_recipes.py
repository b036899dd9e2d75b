"""The ready recipes of conf/recipe/, each run as a user would (`gym train +recipe=...`,
through `python -m gym_core`), on the tiny model with the fewest steps."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import yaml

from tests.conftest import REPO, run_cli

TINY = ["model=tiny", "trainer.eval_size=8", "trainer.batch_size=2",
        "trainer.eval_max_new_tokens=4", "trainer.progress=false", "logger=[]",
        "trainer.max_steps=1"]
ONLINE = ["algorithm.num_generations=2", "algorithm.max_completion_length=4"]


def test_every_recipe_is_tested_here():
    shipped = {f.name.removesuffix(".yaml")
               for f in resources.files("gym_core.conf").joinpath("recipe").iterdir()
               if f.name.endswith(".yaml")}
    assert shipped == {"sft_then_grpo", "dpo_pairs", "grpo_loss_sweep", "tfgrpo_api"}
    # tfgrpo_api runs against a model gym_core.serve serves, beside that test's fixtures
    api_tests = (REPO / "tests" / "plugins" / "test_cl_grpo_api.py").read_text()
    assert "def test_the_tfgrpo_api_recipe_against_gym_serve(" in api_tests
    assert '"+recipe=tfgrpo_api"' in api_tests


def test_sft_then_grpo_runs_both_stages_each_in_its_folder(tmp_path):
    out = run_cli(["+recipe=sft_then_grpo", *TINY, *ONLINE, "run.name=pipe"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    home = tmp_path / "runs" / "pipe"
    sft = json.loads((home / "sft" / "summary.json").read_text())
    grpo = json.loads((home / "grpo" / "summary.json").read_text())
    assert sft["algorithm"] == "sft" and grpo["algorithm"] == "grpo"
    assert sft["init"] is None  # the first stage starts from the base model
    assert grpo["init"]["run"] == str((home / "sft").resolve())
    # the GRPO stage's online settings did not reach the SFT stage, and say so
    assert "pipeline stage sft: algorithm.num_generations=2 left out" in out.stdout
    record = json.loads((home / "pipeline.json").read_text())["stages"]
    assert [r["stage"] for r in record] == ["sft", "grpo"]
    assert "gym pipeline: held-out score per stage" in out.stdout

    again = run_cli(["+recipe=sft_then_grpo", *TINY, *ONLINE, "run.name=pipe"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already finished") == 2  # nothing trained twice


def test_a_setting_no_stage_has_is_refused(tmp_path):
    out = run_cli(["+recipe=sft_then_grpo", *TINY, "algorithm.nope=1", "run.name=p2"],
                  cwd=tmp_path)
    assert out.returncode == 2
    assert "algorithm.nope" in out.stderr and "gym: error:" in out.stderr
    assert not (tmp_path / "runs" / "p2").exists()


def test_dpo_on_a_jsonl_preference_file(tmp_path):
    rows = [{"prompt": f"What is {a} + {b}?", "chosen": str(a + b), "rejected": str(a + b + 1)}
            for a in range(6) for b in range(5)]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    missing = run_cli(["+recipe=dpo_pairs", *TINY, "run.name=nofile"], cwd=tmp_path)
    assert missing.returncode == 2 and "data.train_file=PATH" in missing.stderr
    out = run_cli(["+recipe=dpo_pairs", *TINY, "data.train_file=prefs.jsonl", "run.name=dpo"],
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "dpo" / "summary.json").read_text())
    assert summary["algorithm"] == "dpo" and summary["data"] == "jsonl"
    assert summary["eval"]["preference_accuracy"]["after"] is not None
    assert summary["eval"]["test_examples"] == 3  # data.test_fraction 0.1 of 30 rows


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_grpo_loss_sweep_with_optuna(tmp_path):
    out = run_cli(["+recipe=grpo_loss_sweep", *TINY, *ONLINE, "hydra.sweeper.n_trials=2",
                   "run.name=lsweep"], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = tmp_path / "runs" / "lsweep"
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert jobs == ["0", "1"]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert {"algorithm.loss_type", "algorithm.lr"} <= set(best["best_params"])
    rows = json.loads((sweep / "sweep_summary.json").read_text())
    assert len(rows) == 2 and all(r["algorithm"] == "grpo" for r in rows)
    assert all("algorithm.loss_type=" in r["overrides"] for r in rows)
