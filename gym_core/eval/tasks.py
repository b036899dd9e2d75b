"""What ``eval.tasks`` names, resolved to examples and a verifier.

- ``data``: the config's own ``data=`` option (``data=jsonl data.train_file=...``, or
  any other data option with its settings);
- a registered data option's name (``arithmetic``, and any option a plugin adds:
  ``reasoning_gym``, ``hf``, ...): its held-out split with that option's default
  settings (or the config's ``data.*`` settings when ``data=`` picks the same option);
  every data option goes through this one path: ``plugins.component("data", name)``
  builds a :class:`gym_core.data.tasks.Task` whose ``test`` split and ``metric`` (a
  registered reward) are what is scored;
- ``jsonl:PATH`` (or a path ending in ``.jsonl``): a JSONL file with a prompt and an
  answer column (``eval.prompt_field`` / ``eval.answer_field``), scored by the reward
  ``eval.verifier``;
- ``lm_eval:NAME``: an lm-evaluation-harness task (or group) whose data is on the
  machine; task YAMLs of your own live in ``eval.lm_eval_include`` folders.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from gym_core.base.errors import GymError

FORMS = ("data", "<data option>", "jsonl:PATH", "lm_eval:NAME")


@dataclass
class EvalTask:
    name: str  # as given (the results store's task name)
    kind: str  # data | jsonl | lm_eval
    option: str | None = None  # data: the data option's name
    path: Path | None = None  # jsonl: the file
    harness: str | None = None  # lm_eval: the harness task name
    # filled by load(): the scored examples and the reward that scores them
    examples: list[dict[str, Any]] = field(default_factory=list)
    metric: str | None = None
    metric_fn: Any = None
    system_prompt: str | None = None
    loaded: bool = False

    def digest(self) -> str:
        """Of the examples scored (the same name over changed data is a new result)."""
        if self.kind == "lm_eval":
            return self.harness or ""
        text = json.dumps(self.examples, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def resolve(spec: str, data_cfg, plugins) -> EvalTask:
    """The task an ``eval.tasks`` entry names; an unknown one is a one-line error listing
    what may be named. Cheap: data is read by :func:`load`."""
    spec = str(spec).strip()
    if spec.startswith("lm_eval:"):
        return EvalTask(spec, "lm_eval", harness=spec.removeprefix("lm_eval:"))
    if spec.startswith("jsonl:") or spec.endswith(".jsonl"):
        return EvalTask(spec, "jsonl", path=Path(spec.removeprefix("jsonl:")).expanduser())
    data = plugins.registry("data")
    option = data_cfg.name if spec == "data" else spec
    if option not in data:
        raise GymError(f"eval.tasks entry {spec!r} is not a task: name a data option "
                       f"({', '.join(data.names())}), data (the config's data=), "
                       "jsonl:PATH or lm_eval:NAME")
    return EvalTask(spec, "data", option=option)


def load(task: EvalTask, data_cfg, plugins, limit: int | None, *,
         prompt_field: str = "prompt", answer_field: str = "answer",
         verifier: str = "accuracy") -> EvalTask:
    """Read the task's held-out examples (the first ``limit``) and its verifier.
    ``data_cfg``: the config's ``data`` section (used when it picks the same option)."""
    if task.loaded or task.kind == "lm_eval":
        task.loaded = True
        return task
    if task.kind == "jsonl":
        from gym_core.data.tasks import read_jsonl

        rows = read_jsonl(task.path, [prompt_field, answer_field])
        task.examples = [{**r, "prompt": r[prompt_field], "answer": str(r[answer_field])}
                         for r in rows]
        task.metric = verifier
    else:
        comp = plugins.component("data", task.option)
        if data_cfg.name == task.option:
            dcfg = data_cfg
        elif comp.config is not None:
            dcfg = OmegaConf.structured(comp.config)
        else:
            dcfg = OmegaConf.create({"name": task.option})
        missing = [k for k in dcfg if OmegaConf.is_missing(dcfg, k)]
        if missing:
            raise GymError(f"task {task.name!r} needs data.{missing[0]}: evaluate it as "
                           f"eval.tasks=[data] data={task.option} data.{missing[0]}=...")
        built = comp.load()(dcfg)
        task.examples = list(built.test)
        task.metric = built.metric
        task.system_prompt = OmegaConf.select(dcfg, "system_prompt")
        if task.metric is None:
            raise GymError(f"task {task.name!r} ({task.option}) has no verifiable answers "
                           "(its metric is none): it cannot be scored by accuracy")
    if not task.examples:
        raise GymError(f"task {task.name!r} has no held-out examples")
    if limit:
        task.examples = task.examples[:limit]
    try:
        task.metric_fn = plugins.component("reward", task.metric).load()
    except GymError as exc:
        raise GymError(f"task {task.name!r}: its verifier {task.metric!r} is not a "
                       f"registered reward ({exc})") from None
    task.loaded = True
    return task
