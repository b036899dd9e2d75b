"""``python -m gym_core.eval [overrides] [--json]``: score models on tasks.

    python -m gym_core.eval model=tiny eval.models=[base,runs/first] eval.tasks=[data]
    python -m gym_core.eval eval.models=[runs/first/checkpoints] eval.tasks=[arithmetic]
    python -m gym_core.eval eval.models=[served:first] eval.server=http://127.0.0.1:8000
    python -m gym_core.eval eval.tasks=[lm_eval:my_task] eval.lm_eval_include=[tasks/]
    python -m gym_core.eval eval.n=8 eval.k=[1,4,8] eval.temperature=0.8   # pass@k, avg@8

Prints a table (``--json``: JSON) of (model, step, task, metric, value); every result is
kept in ``<eval.root>/results.sqlite`` and read back instead of recomputed unless
``eval.force=true``. A bad name, or a model of another base than ``model=``'s, is one
line and exit 2 before anything loads; a task that fails later is listed after the
others' results, and the exit status is 2.
"""

from __future__ import annotations

import sys


def main(args: list[str]) -> int:
    from hydra.core.config_store import ConfigStore

    from gym_core.eval.config import EvalConfig
    from gym_core.plugin.startup import bootstrap, check_overrides

    as_json = "--json" in args
    args = [a for a in args if a != "--json"]
    if "--help" in args or "-h" in args:
        print(__doc__)
        return 0
    bad = [a for a in args if a.startswith("-")]
    if bad:
        from gym_core.base.errors import GymError

        raise GymError(f"unknown flag {bad[0]}: python -m gym_core.eval takes key=value "
                       "overrides and --json")
    plugins = bootstrap()
    ConfigStore.instance().store(name="eval_schema", node=EvalConfig, package="eval")
    cfg = check_overrides(args, config_name="eval")
    import warnings

    warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated",
                            FutureWarning)
    from gym_core.eval.runner import evaluate

    report = evaluate(cfg, plugins, log=lambda m: print(m, file=sys.stderr))
    print(report.as_json() if as_json else report.table())
    for failure in report.failures:
        print(f"gym: error: {failure}", file=sys.stderr)
    return 2 if report.failures else 0


def entry() -> None:
    import os

    from gym_core.base.errors import exit_on_user_error
    from gym_core.base.threads import prepare_environment

    prepare_environment()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # harness data comes from this machine
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with exit_on_user_error():
        code = main(sys.argv[1:])
    raise SystemExit(code)


if __name__ == "__main__":
    entry()
