"""Pipelines as one command: a recipe whose config holds ``pipeline.stages`` runs each
stage as its own run, the next starting from the previous one's result (``model.init``,
gym_core/model/stages.py; docs/guide.md, "Recipes").

    gym train +recipe=sft_then_grpo                 # runs/<run.name>/sft, then .../grpo

A stage is ``{name, overrides}``. Each stage composes the command's own overrides (the
recipe's selection included, so its other settings apply) followed by the stage's, and
runs in
``<run.root>/<run.name>/<stage>``; every stage after the first gets
``model.init=<the previous stage's folder>``. ``<run.root>/<run.name>/pipeline.json``
lists the stages and their scores. Running the same ``run.name`` again skips the stages
that finished and continues the first that did not.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from gym_core.base.errors import GymError
from gym_core.base.files import write_json


def is_pipeline(cfg) -> bool:
    return bool((cfg.get("pipeline") or {}).get("stages"))


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def stage_overrides(overrides: list[str], stage: dict[str, Any], folder: Path,
                    previous: Path | None, compose=None) -> tuple[list[str], list[str]]:
    """The overrides one stage composes, and the command's overrides left out of it.

    Order: the command's group selections (``model=tiny``, ``+recipe=...``), the stage's
    own overrides, the command's ``key=value`` overrides, then the stage's folder and
    starting point (``model.init``: the command's for the first stage). A group the stage
    selects itself (``algorithm=sft``) is the stage's; a ``key=value`` override whose key
    the stage's config does not have (``algorithm.num_generations`` for an SFT stage) is
    left out of that stage."""
    from omegaconf import OmegaConf

    if compose is None:
        from gym_core.plugin.startup import compose
    placed = ("run.name", "run.root", *(("model.init",) if previous is not None else ()))
    own = [o for o in overrides if _key(o) not in placed]
    mine = [str(o) for o in stage.get("overrides") or []]
    stage_groups = {_key(o) for o in mine if "." not in _key(o)}
    place = [f"run.name={folder.name}", f"run.root={folder.parent}"]
    if previous is not None:
        place.append(f"model.init={previous}")
    selections, values, left_out = [], [], []
    for o in own:
        key = _key(o)
        if "." in key and not o.startswith(("+", "~")):
            values.append(o)
        elif key in stage_groups:
            left_out.append(o)
        else:
            selections.append(o)
    base = compose([*selections, *mine, *place])
    missing = object()
    for o in values:
        if OmegaConf.select(base, _key(o), default=missing) is missing:
            left_out.append(o)
    values = [o for o in values if o not in left_out]
    return [*selections, *mine, *values, *place], left_out


def finished(folder: Path, cfg) -> bool:
    """The stage's run ended (summary.json) at the steps its config asks for."""
    import json

    file = folder / "summary.json"
    if not file.is_file() or not (folder / "final" / "gym.json").is_file():
        return False
    try:
        return json.loads(file.read_text()).get("steps") == cfg.trainer.max_steps
    except ValueError:
        return False


def run_pipeline(cfg, overrides: list[str], run_one=None) -> list[dict[str, Any]]:
    """Run every stage of ``cfg.pipeline`` (``cfg``: composed from ``overrides``, which
    select the recipe). ``run_one(stage_cfg, folder) -> summary`` runs one stage (default
    :func:`gym_core.train.job.run_job`). Returns the stages' summaries, in order."""
    from omegaconf import OmegaConf

    from gym_core.plugin.startup import compose

    stages = OmegaConf.to_container(cfg.pipeline.stages, resolve=True)
    names = [s.get("name") if isinstance(s, dict) else None for s in stages]
    if not all(isinstance(n, str) and n.isidentifier() for n in names) or len(set(names)) \
            != len(names):
        raise GymError(f"pipeline.stages must be a list of {{name, overrides}} with distinct "
                       f"identifier names; got names {names}")
    home = Path(cfg.run.root) / str(cfg.run.name)
    if run_one is None:
        from gym_core.train.job import run_job

        def run_one(stage_cfg, folder):
            return run_job(stage_cfg, run_dir=folder)

    print(f"gym: pipeline {cfg.pipeline.get('name') or home.name}: "
          f"{' -> '.join(names)} in {home}/")
    composed, unused = [], None
    for i, s in enumerate(stages):  # every stage's config composed and checked first
        stage_list, left_out = stage_overrides(overrides, s, home / s["name"],
                                               home / names[i - 1] if i else None, compose)
        composed.append(compose(stage_list))
        if left_out:
            print(f"gym: pipeline stage {s['name']}: {' '.join(left_out)} left out (not "
                  "settings of this stage)")
        unused = set(left_out) if unused is None else unused & set(left_out)
    if unused:
        raise GymError(f"{' '.join(sorted(unused))}: not a setting of any stage of the "
                       f"pipeline ({', '.join(names)})")
    summaries, record = [], []
    for i, (stage, stage_cfg) in enumerate(zip(stages, composed)):
        folder = home / stage["name"]
        t0 = time.perf_counter()
        if finished(folder, stage_cfg):
            import json

            print(f"gym: pipeline stage {i + 1}/{len(stages)} {stage['name']}: already "
                  f"finished in {folder}, kept")
            summary = json.loads((folder / "summary.json").read_text())
        else:
            print(f"gym: pipeline stage {i + 1}/{len(stages)} {stage['name']}: "
                  f"algorithm={stage_cfg.algorithm.name} in {folder}")
            summary = run_one(stage_cfg, folder)
        summaries.append(summary)
        ev = summary.get("eval") or {}
        record.append({"stage": stage["name"], "run_dir": str(folder),
                       "algorithm": summary.get("algorithm"), "steps": summary.get("steps"),
                       "before": ev.get("before"), "after": ev.get("after"),
                       "after_quant": ev.get("after_quant"),
                       "seconds": round(time.perf_counter() - t0, 2)})
        write_json(home / "pipeline.json", {"stages": record})
    print(table(record, home))
    return summaries


def table(record: list[dict[str, Any]], home: Path) -> str:
    def fmt(x):
        return "n/a" if x is None else f"{x:.3f}"

    rows = [f"  {r['stage']:<12} {r['algorithm'] or '?':<10} {fmt(r['before'])} -> "
            f"{fmt(r['after'])}" + (f" (quantized {fmt(r['after_quant'])})"
                                   if r["after_quant"] is not None else "") for r in record]
    return "\n".join(["gym pipeline: held-out score per stage", *rows,
                      f"  {home}/pipeline.json"])
