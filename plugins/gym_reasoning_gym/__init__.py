"""reasoning-gym's procedurally generated, verifiable tasks as ``data=reasoning_gym``
(docs/guide.md "Your own data"; needs the ``reasoning`` extra:
``pip install 'gym-core[reasoning]'``).

``data.tasks`` maps generator names (any of ``reasoning_gym.factory.DATASETS``) to a
weight and the generator's own settings (its difficulty), e.g.
``data.tasks={leg_counting:{weight:2,min_animals:1,max_animals:4},basic_arithmetic:{weight:1}}``.
The training stream (``data.train_size`` rows, seeded by ``data.seed``) and the held-out
set (``data.test_size`` rows, another seed) never share a question. The reward and the
held-out metric ``reasoning_gym`` is each task's own ``score_answer`` on the answer the
completion gives in ``<answer>`` tags. Rows also carry ``chosen`` (the generator's
answer, written as ``data.answer_format``) and ``rejected`` (another row's answer that
the task's scorer marks wrong), so SFT and ORPO train on the same tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gym_core.api import DataConfig, bounded, hookimpl

DEFAULT_TASKS = {"leg_counting": {"weight": 1.0}, "chain_sum": {"weight": 1.0}}
SYSTEM_PROMPT = ("Answer the question. Give your final answer within <answer> </answer> "
                 "tags, for example <answer>42</answer>.")


@dataclass
class ReasoningGymConfig(DataConfig):
    name: str = "reasoning_gym"
    system_prompt: str | None = SYSTEM_PROMPT
    # generator name -> {weight: ..., <the generator's settings>: ...}; None: DEFAULT_TASKS.
    # (Typed Any so that data.tasks={...} replaces the whole map, settings and all.)
    tasks: Any = None
    train_size: int = bounded(10000, ge=1)  # rows in the training stream (generated when read)
    test_size: int = bounded(100, ge=1)  # held-out rows
    answer_format: str = "<answer>{answer}</answer>"  # how SFT / ORPO rows write an answer


@hookimpl
def gym_add_datasets(registry):
    registry.add("reasoning_gym", ReasoningGymConfig, "gym_reasoning_gym.tasks:reasoning_gym_task")


@hookimpl
def gym_add_rewards(registry):
    registry.add("reasoning_gym", None, "gym_reasoning_gym.tasks:score")
