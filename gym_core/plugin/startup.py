"""Start-up: load the plugins once per process and store every config schema in Hydra's
ConfigStore, then compose configs. ``python -m gym_core``, the soup and export apps,
tests and launcher workers all start here. Cheap: no torch.
"""

from __future__ import annotations

from gym_core.config.schema import MODEL_OPTIONS, RayConfig, RolloutConfig, RunConfig, TrainerConfig

_plugins = None


def bootstrap(entry_points=None, *, reload: bool = False):
    """Load the plugins and store every config schema in Hydra's ConfigStore.

    Cached per process; ``reload=True`` (or passing ``entry_points``) discovers again.
    Returns the :class:`gym_core.plugin.manager.Plugins`.
    """
    global _plugins
    if _plugins is not None and not reload and entry_points is None:
        return _plugins
    from hydra.core.config_store import ConfigStore

    from gym_core.plugin.manager import load_plugins

    plugins = load_plugins(entry_points)
    cs = ConfigStore.instance()
    # A fresh discovery replaces what an earlier one stored (families included).
    stored = set(_plugins.registries) if _plugins is not None else set()
    for group in ("model", "trainer", *stored, *plugins.registries):
        cs.repo.pop(group, None)
    cs.store(group="trainer", name="default", node=TrainerConfig)
    # the run section's schema: not a group (the export app's `run=` names a run dir)
    cs.store(name="run_schema", node=RunConfig, package="run")
    cs.store(name="ray_schema", node=RayConfig, package="ray")
    cs.store(name="rollout_schema", node=RolloutConfig, package="rollout")
    for name, node in MODEL_OPTIONS.items():
        cs.store(group="model", name=name, node=node)
    for family in plugins.families.values():
        if not family.config_group:
            continue
        for comp in plugins.registries[family.name]:
            if comp.config is not None:
                # a family selected as a list (logger=[a,b]) keeps each option apart
                package = f"{family.name}.{comp.name}" if family.many else None
                cs.store(group=family.name, name=comp.name, node=comp.config,
                         package=package)
    _plugins = plugins
    return plugins


def compose(overrides: list[str] | None = None, config_name: str = "config", *,
            return_hydra_config: bool = False):
    """The config ``python -m gym_core OVERRIDES`` would run, composed in-process (for
    notebooks, tests and benchmarks): ``run_job(compose(["model=tiny"]), run_dir=...)``.
    A bad override raises :class:`gym_core.base.errors.GymError` with gym's one-line message.
    ``config_name="soup"``: the soup app's config (``python -m gym_core.soup``).
    ``return_hydra_config=True`` keeps Hydra's own node (``cfg.hydra.runtime.choices``:
    the option each config group ended up with, plugin-declared groups included)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    plugins = bootstrap()
    with config_errors(plugins), initialize_config_module(config_module="gym_core.conf",
                                                          version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []),
                             return_hydra_config=return_hydra_config)


def config_errors(plugins):
    """A context manager turning Hydra's and OmegaConf's composition errors (several lines,
    a config search path) into one :class:`GymError` line that names the override and the
    fix."""
    import contextlib

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from gym_core.base.errors import GymError

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
    missing = re.search(r"Could not (?:find|load) '([^/']+)/([^']+)'", text)
    if missing:
        group, name = missing.groups()
        options = re.search(r"Available options in '[^']+':\n((?:\t.*\n?)*)", text)
        names = options.group(1).split() if options else []
        if not options and group in plugins.registries:  # a list selection: logger=[a,b]
            names = plugins.registries[group].names()
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


#: Hydra's command-line flags that take a value (the value is not an override)
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp",
                     "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun"}


def overrides_of(args: list[str]) -> list[str]:
    """The key=value / group=option arguments, without Hydra's flags and their values."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a.startswith("-"):
            skip = a in _FLAGS_WITH_VALUE
        else:
            out.append(a)
    return out


def check_overrides(args: list[str], config_name: str = "config"):
    """Compose the config the overrides give before Hydra runs, so that a bad override is
    one line and exit 2 (Hydra's own report is several lines and exit 1), and check it
    against the values its schemas declare (:func:`gym_core.config.fields.check_values`)
    before anything is created on disk. A sweep (-m) is checked value by value: each swept
    value with the first value of the other keys. Returns the config of the first job."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    overrides = overrides_of(args)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        from gym_core.base.errors import GymError

        raise GymError(f"cannot parse the overrides: {str(exc).splitlines()[0]}") from None
    first, others = [], []
    for o in parsed:
        if o.is_sweep_override():
            try:
                values = list(o.sweep_string_iterator())
            except Exception:  # an interval (Optuna) has no first value: its sweeper checks
                continue
            if values:
                others += [(len(first), f"{o.get_key_element()}={v}")
                           for v in dict.fromkeys(values[1:])]
                first.append(f"{o.get_key_element()}={values[0]}")
        else:
            first.append(o.input_line)
    from gym_core.config.fields import check_values

    def check(c) -> None:
        check_values(c)
        if config_name == "config":  # every swept run.name is one folder name too
            from gym_core.train.rundir import check_run_name

            check_run_name(c)

    cfg = compose(first, config_name=config_name)
    with config_errors(bootstrap()):  # interpolations that do not resolve (${nope})
        OmegaConf.to_container(cfg, resolve=True)
        check(cfg)
        for i, line in others:
            check(compose([*first[:i], line, *first[i + 1:]], config_name=config_name))
    return cfg


#: flags after which Hydra prints or inspects instead of running a job
NO_JOB_FLAGS = {"--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help",
                "--shell-completion", "-sc"}


def check_named_components(cfg) -> None:
    """Names given as values rather than config groups (``algorithm.rewards``) must be
    installed and loaded: checked with the config, before a run directory is created, and
    answered like a config group's option (a disabled plugin's reward and a disabled
    plugin's algorithm get the same line)."""
    plugins = bootstrap()
    rewards = cfg.algorithm.get("rewards") if "algorithm" in cfg else None
    for name in list(rewards or []):
        plugins.component("reward", str(name))

