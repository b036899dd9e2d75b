"""Checks of a composed config that need nothing loaded (no torch): run by
``python -m gym_core`` before Hydra starts the job (and before anything is created on
disk), and by :func:`gym_core.train.job.run_job` for in-process callers. A value that
would fail (or silently do nothing) deep in the run is refused here in one line. What
each field may hold is declared in the schema (:mod:`gym_core.config.schema`), not here:
:func:`gym_core.config.fields.check_values` checks the config against it."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from gym_core.base.errors import GymError
from gym_core.config.fields import check_values

#: what to say for a required value that is missing, where a hint helps
_NEEDS = {
    "data.train_file": "data=jsonl needs data.train_file=PATH (a JSONL file of your rows; "
                       "docs/guide.md shows the formats)",
    "soup.inputs": "a soup needs soup.inputs=[a,b,...]: two or more delta files, or run "
                   "directories holding one delta/*.safetensors each",
}


def check_missing(cfg: DictConfig) -> None:
    """Refuse a config with a required value left unset (``???``)."""
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra."))
    if missing:
        key = missing[0]
        raise GymError(_NEEDS.get(key, f"{key} has no value and needs one: add {key}=... to "
                                       "the command"))


def preflight(cfg: DictConfig) -> list | None:
    """Every check of a composed config that loads nothing: a value left unset, each
    field against what its schema declares (:func:`gym_core.config.fields.check_values`:
    choices, ranges, and each section's ``validate``), the run's folder, and the chain
    of runs ``model.init`` names (:func:`gym_core.model.stages.check_init`). Returns that
    chain (None without ``model.init``)."""
    from gym_core.model.stages import check_init

    check_missing(cfg)
    check_values(cfg)
    check_run_place(cfg)
    from gym_core.env.setup import check_env_config

    check_env_config(cfg)  # env=...: an online algorithm, limits in range (docs/agents.md)
    return check_init(cfg.model)


#: kernel file systems: nothing a run writes can live there
_VIRTUAL = ("/proc", "/sys", "/dev")


def check_run_place(cfg: DictConfig) -> None:
    """``run.root`` / ``run.name`` must be a place a run folder can be made in: not a
    file, not below a file, not inside a kernel's virtual file system."""
    import os
    from pathlib import Path

    root = Path(cfg.run.root).expanduser()
    absolute = Path(os.path.abspath(root))
    real = Path(os.path.realpath(absolute))
    for top in _VIRTUAL:
        if any(p == Path(top) or Path(top) in p.parents for p in (absolute, real)):
            raise GymError(f"run.root={cfg.run.root} is inside {top}, a kernel file system "
                           "where no run can be written: choose a folder on a disk")
    if root.exists() and not root.is_dir():
        raise GymError(f"run.root={cfg.run.root} is a file, not a folder: choose another "
                       "run.root")
    name = cfg.run.name
    folder = root / str(name)
    if folder.exists() and not folder.is_dir():
        raise GymError(f"run.name={name}: {folder} is a file, not a run folder: choose "
                       "another run.name (or move the file)")
    existing = absolute
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise GymError(f"run.root={cfg.run.root}: {existing} is a file, so no folder can be "
                       "made below it: choose another run.root")
    # whether it can be written is found by writing (gym_core.train.rundir): root ignores
    # permission bits, and a read-only mount says so only then
