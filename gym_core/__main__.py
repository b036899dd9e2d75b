"""``python -m gym_core [overrides]``: compose the config with Hydra and run one job.

Start-up stays light: plugins are discovered and their schemas registered (no torch),
and the heavy modules are imported only when a job actually runs.
``python -m gym_core --plugins`` lists the installed plugins and exits.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from gym_core.plugin.startup import NO_JOB_FLAGS, bootstrap, check_overrides, overrides_of


@hydra.main(version_base=None, config_path="pkg://gym_core.conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from gym_core.base.errors import exit_on_user_error
    from gym_core.train.job import run_job

    with exit_on_user_error():
        from gym_core.train.pipeline import is_pipeline

        if is_pipeline(cfg):
            from gym_core.base.errors import GymError

            raise GymError("a pipeline recipe (pipeline.stages) runs its stages one after "
                           "the other and cannot be swept with -m: run it once per setting")
        if cfg.trainer.backend == "ray":  # Ray Train runs the job's ranks (docs/scale.md)
            from gym_core.train.job import run_dir_for
            from gym_core.train.ray_train import run_on_ray

            summary = run_on_ray(cfg, run_dir_for(cfg), _task_overrides())
        else:
            summary = run_job(cfg)
    # The return value is what sweepers (Optuna) optimise: held-out accuracy at the end.
    if summary.get("objective") is not None:  # trainer.objective: any logged metric
        return summary["objective"]
    ev = summary.get("eval", {})
    best = ev.get("after_quant") if ev.get("after_quant") is not None else ev.get("after")
    return best


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


HELP_HEADER = """\
gym: post-training for language models, one plugin per method.
Usage: gym train [group=option ...] [key=value ...]   (-m for a sweep; = python -m gym_core)
"""

HELP_FOOTER = """\
Examples:
  gym train algorithm=grpo quant=bitdelta
  gym train model=tiny trainer.max_steps=2 run.name=smoke
  gym train -m algorithm=grpo,dr_grpo algorithm.lr=1e-5,3e-5
  gym train +recipe=sft_then_grpo                 # recipes: the `recipe` group below
  gym train algorithm=dpo --help          # the config those options give
Plugins: gym plugins (python -m gym_core --plugins) lists them (distribution, version, options added);
GYM_DISABLE_PLUGINS=name1,name2 skips installed plugins; docs/plugins.md.
Powered by Hydra (https://hydra.cc); --hydra-help shows Hydra's own options.
"""


def config_groups() -> dict[str, list[str]]:
    """Every config group and its options: the schemas stored by plugins and the core,
    and any YAML presets shipped in gym_core.conf (Hydra's own groups left out)."""
    from importlib import resources

    from hydra.core.config_store import ConfigStore

    groups: dict[str, set[str]] = {}
    for name, node in ConfigStore.instance().repo.items():
        if isinstance(node, dict) and name != "hydra":
            groups.setdefault(name, set()).update(k.removesuffix(".yaml") for k in node)
    for folder in resources.files("gym_core.conf").iterdir():
        if folder.is_dir() and not folder.name.startswith("_"):
            groups.setdefault(folder.name, set()).update(
                f.name.removesuffix(".yaml") for f in folder.iterdir() if f.name.endswith(".yaml"))
    return {g: sorted(opts) for g, opts in sorted(groups.items())}


def print_help(overrides: list[str]) -> None:
    """Hydra's --help lists groups by copying its whole config store once per group (a
    second with every plugin installed); this reads the store once."""
    from omegaconf import OmegaConf

    from gym_core.plugin.startup import compose

    groups = "\n".join(f"{g}: {', '.join(opts)}" for g, opts in config_groups().items())
    config = OmegaConf.to_yaml(compose(overrides))
    print(f"{HELP_HEADER}\n== Config groups (installed options) ==\n{groups}\n\n"
          f"== Config (defaults; override with key=value) ==\n{config}\n{HELP_FOOTER}")


def lock_early(cfg, args: list[str]):
    """Lock the run directory (or a sweep's folder) before Hydra starts, so a second
    process on the same run.name stops here, in a second, with the holder's pid
    (:mod:`gym_core.train.rundir`; the job locks it again, reentrantly). A run.name with a
    time stamp (the default) names a new folder: nothing to protect yet, and locking it
    here could create a folder the job, a second later, does not use. Returns the folder
    locked, or None."""
    import os
    from pathlib import Path

    from omegaconf import OmegaConf

    from gym_core.train.rundir import acquire

    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 holds it for all
        return None
    for o in overrides_of(args):
        key, _, value = o.partition("=")
        key = key.lstrip("+~")
        moved = key in ("hydra.run.dir", "hydra.sweep.dir")
        swept = key in ("run.name", "run.root") and "," in value
        if moved or swept:  # the job's folder is not run.root/run.name: the job locks it
            return None
    if "${now:" in str(OmegaConf.to_container(cfg.run, resolve=False).get("name")):
        return None
    folder = Path(cfg.run.root) / cfg.run.name
    acquire(folder)
    return folder


def multirun(args: list[str]) -> bool:
    """A sweep: -m on the command line, or a recipe that sets ``hydra.mode: MULTIRUN``
    (conf/recipe/grpo_loss_sweep.yaml)."""
    if {"-m", "--multirun"}.intersection(args):
        return True
    overrides = overrides_of(args)
    if not any(o.lstrip("+").startswith("recipe=") for o in overrides):
        return False
    from gym_core.plugin.startup import compose

    mode = compose(overrides, return_hydra_config=True).hydra.get("mode")
    return str(mode) in ("MULTIRUN", "RunMode.MULTIRUN")


def _outside_a_job(signum, step) -> str:
    import signal

    return (f"interrupted by {signal.Signals(signum).name} outside a training job; nothing "
            "was left half-written")


def entry() -> None:
    from gym_core.base.errors import exit_on_user_error
    from gym_core.base.threads import prepare_environment
    from gym_core.train.interrupt import StopRequest

    prepare_environment()  # before anything loads torch's OpenMP runtime

    # Ctrl-C while torch loads (seconds) is one line too; the job installs its own handlers
    with exit_on_user_error(), StopRequest(_outside_a_job):
        _entry(sys.argv[1:])


def _entry(args: list[str]) -> None:
    from gym_core.base.errors import GymError

    plugins = bootstrap()
    if "--plugins" in args:
        if len(args) > 1:
            raise GymError("--plugins lists the installed plugins and takes no other "
                           f"arguments; got {' '.join(args)}")
        # Like pytest's --trace-config / `datasette plugins`: what is installed, from
        # which distribution, and which config-group options each plugin adds.
        from gym_core.plugin.manager import format_listing

        print(format_listing(plugins))
        return
    if ("--help" in args or "-h" in args) and "--hydra-help" not in args:
        print_help(overrides_of(args))
        return
    if "--hydra-help" not in args and "--info" not in args:
        cfg = check_overrides(args)
        from gym_core.train.pipeline import is_pipeline

        if is_pipeline(cfg) and not NO_JOB_FLAGS.intersection(args) and not multirun(args):
            # a recipe of several stages: each its own run (gym_core/train/pipeline.py)
            from gym_core.train.pipeline import run_pipeline

            run_pipeline(cfg, overrides_of(args))
            return
        if not NO_JOB_FLAGS.intersection(args):
            from gym_core.config.checks import preflight
            from gym_core.plugin.startup import check_named_components
            from gym_core.train.rundir import check_run_name, check_run_state

            check_run_name(cfg)  # one folder inside run.root, before anything is created
            preflight(cfg)  # declared values, the run's folder, model.init's chain
            check_named_components(cfg)  # a disabled plugin's reward: refused here too
            from pathlib import Path

            root = Path(cfg.run.root)
            new = [p for p in (root, root / str(cfg.run.name)) if not p.exists()]
            folder = lock_early(cfg, args)
            if folder is not None and not multirun(args):
                from gym_core.train.resume import check

                check_run_state(folder)
                check(cfg, folder)  # a refused change costs a second, not a model load
            try:
                main()
            except SystemExit as exc:
                if exc.code == 2 and folder is not None and folder in new:
                    remove_refused_start(folder, [p for p in new if p != folder])
                raise
            return
    main()


def remove_refused_start(folder, parents) -> None:
    """A start refused inside the job (a bad data row, ...) before it wrote anything
    leaves no folder behind: ``folder`` (created by this start, still locked by it)
    goes if it holds only the lock and Hydra's empty log, and then ``parents`` (folders
    this start created) if they are empty. Anything else there: kept, untouched."""
    import contextlib

    from gym_core.train.rundir import LOCK_NAME, release

    names = {p.name: p for p in folder.iterdir()}
    if LOCK_NAME not in names or any(
            n != LOCK_NAME and not (n.endswith(".log") and p.is_file() and p.stat().st_size == 0)
            for n, p in names.items()):
        return
    _close_log_handlers(folder)  # Hydra's job log there: closed before its file goes
    with contextlib.suppress(OSError):
        for p in names.values():
            p.unlink()
        folder.rmdir()  # fails, harmlessly, if another start has just made its lock there
        for parent in parents:
            parent.rmdir()
    release(folder)


def _close_log_handlers(folder) -> None:
    """Detach and close the logging file handlers Hydra opened in ``folder`` (in-process
    callers go on logging after the folder is removed)."""
    import logging
    from pathlib import Path

    root = Path(folder).resolve()
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for h in list(getattr(logger, "handlers", [])):
            path = getattr(h, "baseFilename", None)
            if path and Path(path).resolve().parent == root:
                logger.removeHandler(h)
                h.close()


if __name__ == "__main__":
    sys.exit(entry())
