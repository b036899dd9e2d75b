"""Start-up: load the plugins once per process and store every config schema in Hydra's
ConfigStore, then compose configs. ``python -m gym_core``, the soup and export apps,
tests and launcher workers all start here. Cheap: no torch.
"""

from __future__ import annotations

from gym_core.config import MODEL_OPTIONS, RunConfig, TrainerConfig

_plugins = None


def bootstrap(entry_points=None, *, reload: bool = False):
    """Load the plugins and store every config schema in Hydra's ConfigStore.

    Cached per process; ``reload=True`` (or passing ``entry_points``) discovers again.
    Returns the :class:`gym_core.plugins.Plugins`.
    """
    global _plugins
    if _plugins is not None and not reload and entry_points is None:
        return _plugins
    from hydra.core.config_store import ConfigStore

    from gym_core.plugins import load_plugins

    plugins = load_plugins(entry_points)
    cs = ConfigStore.instance()
    # A fresh discovery replaces what an earlier one stored (families included).
    stored = set(_plugins.registries) if _plugins is not None else set()
    for group in ("model", "trainer", *stored, *plugins.registries):
        cs.repo.pop(group, None)
    cs.store(group="trainer", name="default", node=TrainerConfig)
    # the run section's schema: not a group (the export app's `run=` names a run dir)
    cs.store(name="run_schema", node=RunConfig, package="run")
    for name, node in MODEL_OPTIONS.items():
        cs.store(group="model", name=name, node=node)
    for family in plugins.families.values():
        if not family.config_group:
            continue
        for comp in plugins.registries[family.name]:
            if comp.config is not None:
                cs.store(group=family.name, name=comp.name, node=comp.config)
    _plugins = plugins
    return plugins


def compose(overrides: list[str] | None = None):
    """The config ``python -m gym_core OVERRIDES`` would run, composed in-process (for
    notebooks, tests and benchmarks): ``run_job(compose(["model=tiny"]), run_dir=...)``.
    A bad override raises :class:`gym_core.errors.GymError` with gym's one-line message."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    plugins = bootstrap()
    with config_errors(plugins), initialize_config_module(config_module="gym_core.conf",
                                                          version_base=None):
        return hydra_compose(config_name="config", overrides=list(overrides or []))


def config_errors(plugins):
    """A context manager turning Hydra's and OmegaConf's composition errors (several lines,
    a config search path) into one :class:`GymError` line that names the override and the
    fix."""
    import contextlib

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from gym_core.errors import GymError

    @contextlib.contextmanager
    def ctx():
        try:
            yield
        except (HydraException, OmegaConfBaseException) as exc:
            raise GymError(explain_config_error(exc, plugins)) from None

    return ctx()


def explain_config_error(exc: BaseException, plugins) -> str:
    """One line for a composition error: what was wrong, where, and the fix."""
    import re

    text = str(exc)
    cause = str(exc.__cause__) if exc.__cause__ else ""
    missing = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if missing:
        group, name = missing.groups()
        options = re.search(r"Available options in '[^']+':\n((?:\t.*\n?)*)", text)
        names = options.group(1).split() if options else []
        options = f"(options: {', '.join(names) or 'none'})"
        why = plugins.why_missing(group, name)
        if why:
            return f"{group}={name} is not loaded: {why} {options}"
        return f"{group}={name} is not an installed option of '{group}' {options}"
    no_match = re.search(r"Could not override '([^']+)'\. No match in the defaults list", text)
    if no_match:
        group = no_match.group(1)
        family = plugins.families.get(group)
        if family is not None and family.owner != "gym_core":
            users = [f"{f}={n}" for f, names in plugins.options(family.owner).items()
                     if f in plugins.families and plugins.families[f].owner != family.owner
                     and plugins.families[f].config_group for n in names]
            return (f"{group} is a config group of plugin '{family.owner}', part of the config "
                    f"only with an option that uses it ({', '.join(users) or 'none installed'}): "
                    f"select one of those too")
        return f"{group} is not a config group (python -m gym_core --help lists them)"
    override = re.search(r"Could not override '([^']+)'", text) or re.search(
        r"Error merging override (\S+)", text)
    key = override.group(1).split("=")[0] if override else None
    full_key = re.search(r"full_key: (\S+)", cause)
    first = (cause or text).strip().splitlines()[0]
    if key and "not in struct" in cause and "." not in key:
        return f"{key} is not a config key or group (python -m gym_core --help lists them)"
    if key and "not in" in first:
        section = key.rsplit(".", 1)[0]
        return f"{key} is not a field of '{section}' ({first}); python -m gym_core " \
               f"{section.split('.')[0]}=<option> --help shows its fields"
    if full_key:
        return f"{full_key.group(1)}: {first}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()
             and not ln.startswith(("Config search path", "\tprovider=", "See https"))]
    return "; ".join(lines[:3]) + (f" ({first})" if cause else "")
