"""data=reasoning_gym: reasoning-gym's generators, seeded and disjoint splits, the task's
own scorer as reward and metric, SFT / ORPO rows from the generator's answers."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

rg = pytest.importorskip("reasoning_gym")

from gym_core.base.errors import GymError  # noqa: E402
from gym_reasoning_gym import ReasoningGymConfig  # noqa: E402
from gym_reasoning_gym.tasks import extract, reasoning_gym_task, score  # noqa: E402

TASKS = {"leg_counting": {"weight": 2.0, "max_animals": 3},
         "chain_sum": {"weight": 1.0, "min_terms": 2, "max_terms": 3}}


def make(**kw):
    kw.setdefault("tasks", TASKS)
    kw.setdefault("train_size", 60)
    kw.setdefault("test_size", 20)
    return reasoning_gym_task(OmegaConf.structured(ReasoningGymConfig(**kw)))


def test_streams_are_seeded_weighted_and_disjoint():
    task = make()
    again = make()
    assert [r["prompt"] for r in task.train] == [r["prompt"] for r in again.train]
    assert [r["prompt"] for r in make(seed=1).train] != [r["prompt"] for r in task.train]
    held_out = {r["prompt"] for r in task.test}
    assert not held_out & {r["prompt"] for r in task.train}
    names = [r["rg_task"] for r in task.train]
    assert set(names) == set(TASKS) and names.count("leg_counting") > names.count("chain_sum")
    assert task.metric == "reasoning_gym"
    # the generator's difficulty settings are applied
    legs = [r for r in task.train if r["rg_task"] == "leg_counting"]
    assert all(sum(r["entry"]["metadata"]["animals"].values()) >= 1 for r in legs)
    assert all(len(r["entry"]["metadata"]["animals"]) <= 3 for r in legs)


def test_reward_is_the_tasks_own_scorer():
    task = make()
    rows = task.train[:12]
    completions = []
    for i, r in enumerate(rows):
        completions.append([f"<answer>{r['answer']}</answer>", "<answer>7</answer>",
                            "I think\n" + r["answer"], "no idea"][i % 4])
    got = score(None, completions, rows)
    for c, r, s in zip(completions, rows, got):
        ds = rg.create_dataset(r["rg_task"], size=1, seed=0,
                               **json.loads(r["rg_settings"]))
        assert s == float(ds.score_answer(extract(c), entry=r["entry"]))
    assert got[0] == 1.0 and min(got) < 1.0


def test_sft_and_orpo_rows_from_the_generators_answers():
    task = make()
    for r in task.train[:10]:
        assert r["chosen"] == f"<answer>{r['answer']}</answer>"
        assert r["rejected"] != r["chosen"]
        wrong = r["rejected"][len("<answer>"):-len("</answer>")]
        ds = rg.create_dataset(r["rg_task"], size=1, seed=0, **json.loads(r["rg_settings"]))
        assert ds.score_answer(wrong, entry=r["entry"]) < 1.0


def test_runs_grpo_and_orpo(tmp_path, tiny_overrides):
    from gym_core.plugin.startup import compose
    from gym_core.train.job import run_job

    tasks = "{leg_counting:{weight:1,min_animals:1,max_animals:2},chain_sum:{weight:1}}"
    base = [*tiny_overrides, "data=reasoning_gym", f"data.tasks={tasks}", "data.train_size=40",
            "data.test_size=4", "trainer.max_steps=1", "trainer.eval_before=false",
            "trainer.eval_size=2"]
    s = run_job(compose([*base, "algorithm=grpo", "algorithm.rewards=[reasoning_gym]"]),
                run_dir=tmp_path / "grpo")
    assert s["eval"]["metric"] == "reasoning_gym" and s["eval"]["after"] is not None
    metrics = json.loads((tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert "rewards/reasoning_gym" in json.dumps(metrics)
    assert metrics["data/rows_leg_counting"] + metrics["data/rows_chain_sum"] == 2
    offline = [o for o in base if not o.startswith("algorithm.")]
    s = run_job(compose([*offline, "algorithm=orpo"]), run_dir=tmp_path / "orpo")
    assert s["steps"] == 1


def test_unknown_task_is_one_line():
    with pytest.raises(GymError, match="reasoning-gym has no task 'leg_countin'") as err:
        make(tasks={"leg_countin": {}})
    assert "\n" not in str(err.value)
    with pytest.raises(GymError, match="weight=0 must be a number above 0"):
        make(tasks={"leg_counting": {"weight": 0}})
    with pytest.raises(GymError, match="data.tasks.leg_counting: reasoning-gym refuses"):
        make(tasks={"leg_counting": {"no_such_setting": 3}})
