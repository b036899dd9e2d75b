"""Selecting a run's environment (``env=<name>``) and checking it before sampling."""

from __future__ import annotations

from gym_core.base.errors import GymError


def check_env_config(cfg) -> None:
    """The checks that need no model (run before anything loads, from preflight): an
    ``env`` needs an online algorithm (one with ``num_generations``)."""
    env_cfg = cfg.get("env")
    if env_cfg is not None:
        _check(cfg, env_cfg, "num_generations" in cfg.algorithm)


def _check(cfg, env_cfg, online: bool) -> None:
    name = env_cfg.name
    if not online:
        raise GymError(f"env={name} needs an online algorithm (grpo, rloo, ppo, ...): "
                       f"algorithm={cfg.algorithm.name} learns from given completions; for "
                       "tool-use traces use algorithm=sft with rows of `messages`")
    # the limits' ranges are declared in gym_core/env/config.py (checked with the config)


def selected_environment(cfg, plugins, online: bool, rows: list[dict]):
    """(environment class, its config) for ``env=<name>``, or None without one. A
    configuration the environment cannot run with is a :class:`GymError` (one line,
    exit 2): an offline algorithm, limits out of range, data rows it cannot read."""
    env_cfg = cfg.get("env") if hasattr(cfg, "get") else getattr(cfg, "env", None)
    if env_cfg is None:
        return None
    name = env_cfg.name
    _check(cfg, env_cfg, online)
    cls = plugins.component("env", name).load()
    probe = cls(env_cfg)
    try:
        if rows:
            probe.check_row(rows[0])
    finally:
        probe.close()
    return cls, env_cfg
