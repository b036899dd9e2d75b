"""Running a run's name again continues that run, never silently another: a change of
what it is (algorithm, model, adapter, data) is refused naming each key; any other
change (the learning rate...) is applied and said; a longer schedule continues smoothly."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from gym_core.base.errors import GymError
from tests.conftest import compose
from tests.reliability.conftest import (
    TINY,
    assert_one_line_error,
    final_weights,
    gym,
    metrics,
    tree,
)

# in-process runs: no TensorBoard, no "before" score
QUICK = [a for a in TINY if not a.startswith("trainer.eval_size")] + ["trainer.eval_size=2"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, gym_env):
    """A finished 2-step run and its folder's content."""
    cwd = tmp_path_factory.mktemp("finished")
    proc = gym([*TINY, "trainer.max_steps=2", "run.name=done"], cwd, gym_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd


@pytest.mark.parametrize("change,needles", [
    (["algorithm=dpo"], ["algorithm.name grpo -> dpo"]),
    (["model.lora.r=8", "model.lora.target_modules=[q_proj]"],
     ["model.lora.r 4 -> 8", 'model.lora.target_modules ["q_proj", "k_proj"', '-> ["q_proj"]']),
    (["model.tiny.hidden_size=32"], ["model.tiny.hidden_size 64 -> 32"]),
    (["data.max_value=29"], ["data.max_value 19 -> 29"]),
])
def test_changing_what_a_run_is_is_refused(finished, gym_env, change, needles):
    before = tree(finished / "runs" / "done")
    base = TINY if change != ["algorithm=dpo"] else [  # GRPO's knobs are not DPO's
        a for a in TINY if not a.startswith(("algorithm.num_gen", "algorithm.max_comp",
                                             "algorithm.rewards"))]
    proc = gym([*base, "trainer.max_steps=4", "run.name=done", *change], finished, gym_env,
               timeout=120)
    line = assert_one_line_error(proc, "runs/done is an existing run", *needles)
    assert "another run.name" in line and "model.init=runs/done" in line
    assert tree(finished / "runs" / "done") == before  # nothing written over


def test_a_changed_data_file_is_refused(tmp_path, with_digit_reward):
    """Same data config, other rows: the checkpoint's data position would point into
    different examples."""
    from gym_core.train.job import run_job

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{a} + 1?", "answer": str(a + 1)}) + "\n"
                            for a in range(20)))
    args = [*QUICK, "data=jsonl", f"data.train_file={rows}", "trainer.max_steps=1"]
    run_job(compose(args), run_dir=tmp_path / "run")
    before = tree(tmp_path / "run")
    rows.write_text(rows.read_text().replace('"answer": "7"', '"answer": "8"'))
    with pytest.raises(GymError, match="the data's content"):
        run_job(compose([*args[:-1], "trainer.max_steps=2"]), run_dir=tmp_path / "run")
    assert tree(tmp_path / "run") == before


def test_a_new_learning_rate_is_applied_and_said(tmp_path, with_digit_reward, capsys):
    from gym_core.train.job import run_job

    base = [*QUICK, "trainer.warmup_steps=0", "trainer.save_every=1"]
    run_job(compose([*base, "trainer.max_steps=2"]), run_dir=tmp_path / "run")
    capsys.readouterr()
    run_job(compose([*base, "trainer.max_steps=4", "algorithm.lr=0.02",
                     "algorithm.weight_decay=0.1"]), run_dir=tmp_path / "run")
    out = capsys.readouterr().out
    said = [ln for ln in out.splitlines() if "continues with changed settings" in ln]
    assert len(said) == 1, out
    for change in ("algorithm.lr 0.01 -> 0.02", "algorithm.weight_decay 0.0 -> 0.1",
                   "trainer.max_steps 2 -> 4"):
        assert change in said[0]
    assert [r["lr"] for r in metrics(tmp_path / "run")] == [0.01, 0.01, 0.02, 0.02]
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())["settings"]
    assert recorded["algorithm.lr"] == 0.02 and recorded["algorithm.weight_decay"] == 0.1
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-000004" / "trainer_state.pt",
                       weights_only=True)
    group = state["optimizer"]["param_groups"][0]
    assert group["weight_decay"] == 0.1 and group["initial_lr"] == 0.02


def schedule(kind: str, warmup: int, total: int, update: int) -> float:
    if update < warmup:
        return (update + 1) / (warmup + 1)
    p = min(1.0, (update - warmup) / (total - warmup))
    return 1 - p if kind == "linear" else 0.5 * (1 + math.cos(math.pi * p))


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_extending_a_finished_run_continues_the_schedule_smoothly(tmp_path, with_digit_reward,
                                                                   kind):
    """5 steps, then extended to 10: steps 1-5 followed the 5-step schedule (down to
    near 0); steps 6-7 climb linearly from there (no jump); from step 8 on the rate is
    exactly the 10-step schedule's, as in a run of 10 from the start."""
    from gym_core.train.job import run_job

    lr = 0.01
    base = [*QUICK, f"trainer.lr_scheduler={kind}", "trainer.warmup_steps=2",
            "trainer.save_every=5"]
    run_job(compose([*base, "trainer.max_steps=10"]), run_dir=tmp_path / "straight")
    run_job(compose([*base, "trainer.max_steps=5"]), run_dir=tmp_path / "extended")
    run_job(compose([*base, "trainer.max_steps=10"]), run_dir=tmp_path / "extended")
    straight = [r["lr"] for r in metrics(tmp_path / "straight")]
    got = [r["lr"] for r in metrics(tmp_path / "extended")]
    assert straight == pytest.approx([lr * schedule(kind, 2, 10, u) for u in range(10)])
    assert got[:5] == pytest.approx([lr * schedule(kind, 2, 5, u) for u in range(5)])
    begin, end = got[4], straight[7]  # the last 5-step rate; the 10-step one at step 8
    assert got[5:7] == pytest.approx([begin + (end - begin) * k / 3 for k in (1, 2)])
    assert got[7:] == straight[7:]
    # across the junction (steps 5 -> 8) no step changes the rate more than the 10-step
    # schedule itself does from one step to the next
    junction = [abs(got[i + 1] - got[i]) for i in (4, 5, 6)]
    assert max(junction) <= max(abs(b - a) for a, b in zip(straight, straight[1:]))


def test_an_interrupted_cosine_run_resumes_as_if_uninterrupted(tmp_path, with_digit_reward):
    from gym_core.train.job import run_job

    base = [*QUICK, "trainer.lr_scheduler=cosine", "trainer.save_every=3",
            "trainer.max_steps=6"]
    run_job(compose(base), run_dir=tmp_path / "straight")
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-000006")  # killed at step 5
    run_job(compose(base), run_dir=tmp_path / "resumed")
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    for k, t in final_weights(tmp_path / "straight").items():
        assert torch.equal(t, final_weights(tmp_path / "resumed")[k]), k


def test_the_record_is_the_config_trained_with(finished, gym_env):
    """The .hydra/ record is written by gym after the checks: a refused start leaves
    it, an accepted one records the values it trains with."""
    run_dir = finished / "runs" / "done"
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert cfg.algorithm.lr == 0.01 and cfg.trainer.max_steps == 2
    overrides = OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")
    assert "run.name=done" in list(overrides)
