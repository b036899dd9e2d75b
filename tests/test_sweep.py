"""Hydra multirun: basic, joblib (parallel) and Optuna; the sweep summary."""

from __future__ import annotations

import json

import pytest
import yaml

from gym_core.train.sweep import collect, table
from tests.conftest import run_cli

FAST = ["model=tiny", "trainer.max_steps=1", "trainer.eval_size=8",
        "algorithm.num_generations=2", "algorithm.max_completion_length=4",
        "trainer.eval_max_new_tokens=4", "trainer.progress=false", "trainer.tensorboard=false"]


def job_dirs(sweep):
    return sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())


def test_joblib_sweep_runs_jobs_in_separate_directories(tmp_path):
    out = run_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                   "algorithm=grpo,dr_grpo", *FAST, "run.name=sw"], cwd=tmp_path,
                  env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = tmp_path / "runs" / "sw"
    dirs = job_dirs(sweep)
    assert [d.name for d in dirs] == ["0", "1"]
    algos = {json.loads((d / "summary.json").read_text())["algorithm"] for d in dirs}
    assert algos == {"grpo", "dr_grpo"}  # each job wrote its own run, none overwritten
    for d in dirs:
        assert (d / "checkpoints" / "step-000001").is_dir() and (d / "metrics.jsonl").is_file()
    rows = json.loads((sweep / "sweep_summary.json").read_text())
    assert len(rows) == 2 and {r["algorithm"] for r in rows} == algos
    assert (sweep / "sweep_summary.csv").read_text().count("\n") == 3
    assert "gym sweep summary (2 jobs" in out.stdout


def test_basic_launcher_grid(tmp_path):
    out = run_cli(["-m", "algorithm=grpo,dr_grpo", "algorithm.lr=1e-5,3e-5", *FAST,
                   "run.name=grid"], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "runs/grid/sweep_summary.json").read_text())
    assert len(rows) == 4
    assert {r["overrides"].split()[:2][1] for r in rows} == {"algorithm.lr=1e-05",
                                                              "algorithm.lr=3e-05"}


def test_optuna_sweep_maximises_the_held_out_score(tmp_path):
    out = run_cli(["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3",
                   "hydra.sweeper.direction=maximize",
                   "algorithm.lr=tag(log,interval(1e-4,1e-1))", *FAST, "run.name=opt"],
                  cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = tmp_path / "runs" / "opt"
    assert len(job_dirs(sweep)) == 3
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert "algorithm.lr" in best["best_params"]
    rows = json.loads((sweep / "sweep_summary.json").read_text())
    assert best["best_value"] == pytest.approx(max(r["objective"] for r in rows))


def test_summary_sorts_best_first(tmp_path):
    for job, after, quant in [("0", 0.2, None), ("1", 0.5, 0.4), ("2", None, None), ("3", 0.3, None)]:
        (tmp_path / job).mkdir()
        (tmp_path / job / "summary.json").write_text(json.dumps(
            {"algorithm": "grpo", "eval": {"after": after, "after_quant": quant},
             "overrides": [f"x={job}", "model=tiny"]}))
    rows = collect(tmp_path)
    # job 1's objective is its quantized score (0.4): after quantization is what ships
    assert [r["job"] for r in rows] == ["1", "3", "0", "2"]
    assert [r["objective"] for r in rows] == [0.4, 0.3, 0.2, None]
    text = table(rows)
    assert "x=1" in text and "model=tiny" not in text  # only what differs between jobs
