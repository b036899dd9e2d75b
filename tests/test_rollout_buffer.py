"""The rollout buffer: each step's rollouts in <run dir>/rollouts/ as Parquet, read back by
pandas and datasets, agreeing with the step's logged metrics; a continued run appends."""

from __future__ import annotations

import json

import pytest

from gym_core.plugin.startup import compose
from gym_core.sampling.buffer import read_buffer, step_file
from gym_core.train.job import run_job


def test_every_step_is_kept_and_readable(tmp_path, tiny_overrides):
    run_dir = tmp_path / "runs" / "buf"
    overrides = [*tiny_overrides, "trainer.max_steps=2", "trainer.eval_before=false",
                 "run.name=buf", f"run.root={tmp_path / 'runs'}"]
    run_job(compose(overrides), run_dir=run_dir)
    rows = read_buffer(run_dir)
    cfg = compose(overrides)
    per_step = cfg.trainer.batch_size * cfg.algorithm.num_generations
    assert [r["step"] for r in rows] == [1] * per_step + [2] * per_step
    assert all(r["staleness"] == 0 and r["policy_version"] == r["step"] - 1 for r in rows)
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        mine = [r for r in rows if r["step"] == m["step"]]
        assert sum(r["reward"] for r in mine) / len(mine) == pytest.approx(m["reward_mean"])
        lengths = [len(r["completion_ids"]) for r in mine]
        assert sum(lengths) / len(lengths) == pytest.approx(m["completion_length"])
    for r in rows:
        assert len(r["behaviour_logprobs"]) == len(r["completion_ids"]) > 0
        assert all(lp <= 0 for lp in r["behaviour_logprobs"])
        assert r["answer"] is not None and r["prompt"]

    pd = pytest.importorskip("pandas")
    frame = pd.read_parquet(run_dir / "rollouts")
    assert len(frame) == 2 * per_step
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("parquet", data_dir=str(run_dir / "rollouts"), split="train")
    assert len(ds) == 2 * per_step and "behaviour_logprobs" in ds.column_names

    # a continued run appends its new step; the earlier files are not rewritten
    before = step_file(run_dir, 1).stat().st_mtime_ns
    run_job(compose([*overrides, "trainer.max_steps=3"]), run_dir=run_dir)
    assert sorted(p.name for p in (run_dir / "rollouts").iterdir()) == [
        "step-000001.parquet", "step-000002.parquet", "step-000003.parquet"]
    assert step_file(run_dir, 1).stat().st_mtime_ns == before


def test_a_damaged_step_file_is_one_line(tmp_path):
    from gym_core.base.errors import GymError

    folder = tmp_path / "rollouts"
    folder.mkdir()
    (folder / "step-000001.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(GymError, match="step-000001.parquet is not a readable Parquet file"):
        read_buffer(tmp_path)
