"""Plugin discovery and the small facade the rest of gym uses instead of pluggy.

Plugins are found through the ``gym_core`` entry-point group, built-in ones included:
the core never imports a plugin by name. ``GYM_DISABLE_PLUGINS=a,b`` skips plugins by
entry-point name without uninstalling them; ``GYM_PLUGIN_ERRORS=skip`` leaves out a plugin
that fails to load instead of stopping (docs/plugins.md, "Failure policy").
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from importlib import metadata

import pluggy

from gym_core import API_VERSION, __version__
from gym_core.base.errors import GymError
from gym_core.plugin import hookspecs
from gym_core.plugin.registry import DuplicateNameError, Registry, RegistryError


@dataclass(frozen=True)
class Family:
    """A kind of component plugins register: its name is the Hydra config group its
    options form (and the registry's kind), ``hook`` the registration hook that fills it."""

    name: str
    hook: str
    owner: str = "gym_core"  # the plugin that declared it
    #: False for families whose components are named elsewhere instead of being selected
    #: as a group option (rewards: ``algorithm.rewards=[...]``)
    config_group: bool = True
    #: the module (or class) holding ``hook``'s spec
    specs: object = field(default=hookspecs, compare=False, repr=False)
    #: True: several options are selected at once, as a list (``logger=[a,b]``), each
    #: under ``<group>.<option>`` in the config
    many: bool = False


#: The core's own families. Plugins add theirs through ``gym_add_families``.
CORE_FAMILIES = (
    Family("algorithm", "gym_add_algorithms"),
    Family("quant", "gym_add_quantizers"),
    Family("data", "gym_add_datasets"),
    Family("reward", "gym_add_rewards", config_group=False),
    Family("soup", "gym_add_aggregators"),  # the soup app's group (python -m gym_core.soup)
    Family("env", "gym_add_environments"),  # multi-turn episodes (docs/agents.md)
    Family("logger", "gym_add_loggers", many=True),  # experiment trackers: logger=[a,b]
)


class Families:
    """What ``gym_add_families`` implementations receive: ``families.add(...)`` declares a
    new family with the hook specs its plugins implement (as pytest's
    ``pytest_addhooks``)."""

    def __init__(self) -> None:
        self._items: dict[str, Family] = {f.name: f for f in CORE_FAMILIES}
        self._plugin = "gym_core"

    def add(self, name: str, *, hook: str, specs: object, config_group: bool = True) -> None:
        """Declare the family ``name`` (a new config group), filled by the registration
        hook ``hook``, whose spec is in ``specs`` (a module or class of functions marked
        with ``gym_core.hookspec``, like gym_core/plugin/hookspecs.py)."""
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"family names must be identifiers, got {name!r}")
        if name in self._items:
            other = self._items[name].owner
            raise ValueError(f"family '{name}' is already declared by plugin '{other}'")
        spec = getattr(specs, hook, None)
        if spec is None or not hasattr(spec, f"{hookspecs.PROJECT}_spec"):
            raise ValueError(f"family '{name}': {specs!r} has no hook spec named {hook!r} "
                             "(decorate it with gym_core.hookspec)")
        self._items[name] = Family(name, hook, self._plugin, config_group, specs)

    def __iter__(self):
        return iter(self._items.values())

    def __getitem__(self, name: str) -> Family:
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items


DISABLE_ENV = "GYM_DISABLE_PLUGINS"
#: What to do with a plugin that fails to load: "fail" (the default) stops with an error
#: naming it; "skip" prints a warning, leaves the plugin out and carries on.
ERRORS_ENV = "GYM_PLUGIN_ERRORS"
ERROR_POLICIES = ("fail", "skip")


class PluginError(GymError):
    """A plugin could not be loaded or registered; the message names it and its distribution."""


@dataclass
class PluginInfo:
    name: str  # entry-point name
    value: str  # "module" the entry point points at
    dist: str  # distribution name
    version: str
    api: str | None = None  # the plugin API versions it declares (GYM_API_VERSION), if any

    def describe(self) -> str:
        return f"plugin '{self.name}' ({self.value}) from distribution {self.dist} {self.version}"


#: The core's own registrations (gym_core/plugin/builtin.py), listed like a plugin.
CORE = PluginInfo("gym_core", "gym_core.plugin.builtin", "gym-core", __version__)


@dataclass
class Plugins:
    """The loaded plugins, the families they declared and what they registered."""

    pm: pluggy.PluginManager
    registries: dict[str, Registry]
    families: dict[str, Family] = field(default_factory=dict)
    infos: dict[str, PluginInfo] = field(default_factory=dict)
    disabled: dict[str, PluginInfo] = field(default_factory=dict)  # by GYM_DISABLE_PLUGINS
    failed: dict[str, str] = field(default_factory=dict)  # skipped after an error: message

    def registry(self, family: str) -> Registry:
        try:
            return self.registries[family]
        except KeyError:
            raise RegistryError(
                f"no plugin family named '{family}' is loaded (families: "
                f"{', '.join(sorted(self.registries))}); the plugin that declares it is "
                "not installed, disabled or skipped (python -m gym_core --plugins)"
            ) from None

    def component(self, family: str, name: str):
        registry = self.registry(family)
        if name not in registry.names():
            why = self.why_missing(family, name)
            if why:  # the message a config group's disabled option gets (plugin/startup.py)
                raise RegistryError(f"{family}={name} is not loaded: {why} (options: "
                                    f"{', '.join(registry.names()) or 'none'})")
        return registry.get(name)

    @property
    def hook(self):
        """Lifecycle hooks: ``plugins.hook.gym_step_end(step=..., metrics=..., run_dir=...)``."""
        return self.pm.hook

    def options(self, plugin: str) -> dict[str, list[str]]:
        """The config-group options (and rewards) ``plugin`` added, by family."""
        out = {}
        for family, registry in self.registries.items():
            names = sorted(c.name for c in registry if c.plugin == plugin)
            if names:
                out[family] = names
        return out

    def hooks(self, plugin: str) -> list[str]:
        """The hook specs ``plugin`` implements."""
        module = self.pm.get_plugin(plugin)
        callers = self.pm.get_hookcallers(module) if module is not None else None
        return sorted(c.name for c in callers or [])

    def why_missing(self, family: str, name: str) -> str | None:
        """Why ``family=name`` may be missing although installed: the plugins that are
        installed but disabled or skipped after an error, with the fix; None when none is."""
        reasons = []
        for n, info in self.disabled.items():
            reasons.append(f"plugin '{n}' ({info.dist} {info.version}) is disabled by "
                           f"{DISABLE_ENV}; remove it from that list to load it")
        for n, message in self.failed.items():
            reasons.append(f"plugin '{n}' was skipped after an error ({message})")
        if not reasons:
            return None
        # the plugin named like the option first: the likeliest provider
        reasons.sort(key=lambda r: f"plugin '{name}'" not in r)
        return "; ".join(reasons)


def _disabled_names() -> list[str]:
    raw = os.environ.get(DISABLE_ENV, "")
    return [n.strip() for n in raw.split(",") if n.strip()]


def _error_policy() -> str:
    policy = os.environ.get(ERRORS_ENV, "fail").strip().lower() or "fail"
    if policy not in ERROR_POLICIES:
        raise PluginError(
            f"{ERRORS_ENV}={policy!r} is not a policy gym knows: use {ERRORS_ENV}=fail (stop "
            f"at a plugin that fails to load, the default) or {ERRORS_ENV}=skip (warn and "
            "leave it out)."
        )
    return policy


def _describe(ep: metadata.EntryPoint) -> PluginInfo:
    dist = getattr(ep, "dist", None)
    return PluginInfo(
        name=ep.name,
        value=ep.value,
        dist=dist.metadata["Name"] if dist is not None else "?",
        version=dist.version if dist is not None else "?",
    )


def _declared_api(module, info: PluginInfo) -> str | None:
    """The module's ``GYM_API_VERSION`` ("1", or a list of the versions it supports),
    checked against :data:`gym_core.API_VERSION`."""
    declared = getattr(module, "GYM_API_VERSION", None)
    if declared is None:
        return None
    accepted = [declared] if isinstance(declared, str) else declared
    if not isinstance(accepted, (list, tuple)) or not all(isinstance(v, str) for v in accepted):
        raise PluginError(
            f"{info.describe()} sets GYM_API_VERSION = {declared!r}: it must be a string "
            f"such as \"{API_VERSION}\" or a list of them."
        )
    if API_VERSION not in accepted:
        wanted = " or ".join(accepted)
        raise PluginError(
            f"{info.describe()} needs gym plugin API {wanted}, but the installed gym-core "
            f"{__version__} provides plugin API {API_VERSION}. Install a release of "
            f"{info.dist} made for plugin API {API_VERSION}, or a gym-core that provides "
            f"API {wanted}."
        )
    return ", ".join(accepted)


#: The core's modules in gym-core 0.1 (plugin API 1: plugins imported from these)
API1_MODULES = frozenset({
    "aggregate", "algorithm", "batching", "builtin", "checkpoint", "config", "data", "delta",
    "distributed", "errors", "evaluate", "experience", "generation", "hookspecs", "llm",
    "losses", "metrics", "model", "plugins", "registry", "rewards", "rollout", "run", "soup",
    "sweep", "train"})
#: The core's flat modules in gym-core 0.2 (plugin API 2; 0.3 grouped them into subpackages)
API2_MODULES = frozenset({
    "aggregate", "algorithm", "batching", "bits", "builtin", "checkpoint", "checks", "config",
    "data", "delta", "distributed", "errors", "evaluate", "export", "files", "fused",
    "generation", "gguf_file", "hookdocs", "hookspecs", "interrupt", "losses", "merge",
    "metrics", "model", "native", "plugins", "policy_gradient", "registry", "resume",
    "rewards", "rollout", "run", "rundir", "soup", "stages", "startup", "sweep", "threads",
    "train"})


def moved_name_hint(exc: BaseException, module: str, dist: str) -> str:
    """For a plugin whose import failed on a ``gym_core`` name: which plugin API it was
    probably built for and what to do, as one sentence (empty for any other error).

    The guess reads the plugin's entry module without running it: its
    ``GYM_API_VERSION`` if it declares one, else whether it imports ``gym_core.api``
    (API 2) or not (API 1), else the module it failed on."""
    import re

    missing = getattr(exc, "name", None) or ""
    if not isinstance(exc, ImportError) or not (missing == "gym_core"
                                                 or missing.startswith("gym_core.")):
        return ""
    release = f"install a release of {dist} made for gym-core {__version__}"
    if missing == "gym_core.api":
        wanted = re.search(r"cannot import name '(\w+)'", str(exc))
        what = f"gym_core.api.{wanted.group(1)}" if wanted else "a name gym_core.api lacks"
        return (f" It was probably built for a newer gym-core: {what} is not in plugin API "
                f"{API_VERSION} of gym-core {__version__}; {release}, or upgrade gym-core.")
    top = missing.split(".")[1] if "." in missing else ""
    source = _entry_source(module)
    declared = re.search(r"^GYM_API_VERSION\s*=\s*[\[(]?\s*['\"](\w+)['\"]", source, re.M)
    if declared:
        api = declared.group(1)
    elif re.search(r"^\s*(from|import) gym_core\.api\b", source, re.M) or (
            top in API2_MODULES and top not in API1_MODULES):
        api = "2"
    elif source or top in API1_MODULES:
        api = "1"
    else:
        return (f" It was probably built for an older gym-core, whose module {missing} is gone: "
                f"plugins import from gym_core.api only (docs/plugins.md); {release}.")
    era = ("gym-core 0.1's module paths, before gym_core.api" if api == "1" else
           "gym-core 0.2's module paths, regrouped into subpackages in 0.3")
    return (f" It was probably built for gym plugin API {api} ({era}): {missing} no longer "
            f"exists; import the names from gym_core.api, the one public module "
            f"(docs/plugins.md), or {release}.")


def _entry_source(module: str) -> str:
    """The source text of a plugin's entry module, read without importing it ('' when it
    cannot be found)."""
    import importlib.util

    if "." in module:
        return ""  # finding a submodule would import its package, which just failed
    try:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            return ""
        with open(spec.origin, encoding="utf-8") as fh:
            return fh.read()
    except (ImportError, OSError, ValueError, UnicodeDecodeError):
        return ""


def _remedy(name: str) -> str:
    return (
        f" Fix or uninstall it, skip it with {DISABLE_ENV}={name}, or set {ERRORS_ENV}=skip "
        "to leave out every plugin that fails to load."
    )


class _Rejected(Exception):
    """A plugin failed while gym assembled the plugins: leave it out (or stop)."""

    def __init__(self, name: str, message: str, cause: BaseException | None = None):
        super().__init__(message)
        self.name, self.message, self.cause = name, " ".join(message.split()), cause


def _call(impl, **kwargs):
    """Call one hook implementation with the arguments it asks for (pluggy's rule)."""
    return impl.function(*[kwargs[a] for a in impl.argnames])


def load_plugins(entry_points: list[metadata.EntryPoint] | None = None) -> Plugins:
    """Discover, load and register every plugin, then run the registration hooks.

    ``entry_points`` defaults to the ``gym_core`` group of the installed distributions.
    A plugin that fails (import error, API version mismatch, a hook implementation that
    matches no spec or not its spec, an error or a duplicate name in a registration
    hook) raises :class:`PluginError` naming it, its distribution and version; with
    ``GYM_PLUGIN_ERRORS=skip`` it is left out entirely with a warning instead
    (``Plugins.failed``), as if it were not installed.
    """
    policy = _error_policy()
    modules: dict[str, tuple[object, PluginInfo]] = {}
    disabled: dict[str, PluginInfo] = {}
    failed: dict[str, str] = {}
    to_disable = _disabled_names()
    if entry_points is None:
        entry_points = list(metadata.entry_points(group=hookspecs.PROJECT))

    def reject(name: str, message: str, exc: BaseException | None) -> None:
        message = " ".join(message.split())  # pluggy's messages span several lines
        if policy == "fail":
            raise PluginError(message + _remedy(name)) from exc
        print(f"gym: warning: skipped {message}", file=sys.stderr)
        failed[name] = message

    for ep in entry_points:
        info = _describe(ep)
        if ep.name in modules or ep.name in disabled or ep.name in failed or ep.name == CORE.name:
            continue  # the same distribution visible twice on sys.path
        if ep.name in to_disable:
            disabled[ep.name] = info
            continue
        try:
            module = ep.load()
        except Exception as exc:
            reject(ep.name, f"{info.describe()} failed to import: {type(exc).__name__}: {exc}."
                   + moved_name_hint(exc, ep.module, info.dist), exc)
            continue
        try:
            info.api = _declared_api(module, info)
        except PluginError as exc:
            reject(ep.name, str(exc), exc)
            continue
        modules[ep.name] = (module, info)
    for name in to_disable:
        if name == CORE.name:
            print(f"gym: warning: {DISABLE_ENV} names '{name}': gym's own registrations "
                  "cannot be disabled.", file=sys.stderr)
        elif name not in disabled:
            print(f"gym: warning: {DISABLE_ENV} names '{name}', but no installed plugin has "
                  f"that entry-point name (installed: "
                  f"{', '.join(sorted([CORE.name, *modules]))}).", file=sys.stderr)

    # Assemble; a plugin that fails is left out and everything is assembled again without
    # it, so nothing it did (a family, a registration, a lifecycle hook) stays behind.
    while True:
        try:
            pm, families, registries = _assemble(modules)
            break
        except _Rejected as exc:
            reject(exc.name, exc.message, exc.cause)
            del modules[exc.name]
    infos = {CORE.name: CORE, **{n: info for n, (_, info) in modules.items()}}
    return Plugins(pm=pm, registries=registries, families={f.name: f for f in families},
                   infos=infos, disabled=disabled, failed=failed)


def _assemble(modules: dict[str, tuple[object, PluginInfo]]):
    from gym_core.plugin import builtin

    infos = {CORE.name: CORE, **{n: info for n, (_, info) in modules.items()}}
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(builtin, name=CORE.name)

    def plugin_name(obj) -> str:
        return pm.get_name(obj) or next(n for n, (m, _) in modules.items() if m is obj)

    for name, (module, info) in modules.items():
        try:
            pm.register(module, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            raise _Rejected(name, f"{info.describe()} does not match gym's hook specs: {exc}.",
                            exc) from exc

    # 1. families: each plugin may declare its own (hook specs + a config group)
    families = Families()
    added_specs: list[object] = []
    for impl in pm.hook.gym_add_families.get_hookimpls():
        families._plugin = impl.plugin_name
        before = set(families._items)
        try:
            _call(impl, families=families)
        except Exception as exc:
            raise _Rejected(impl.plugin_name, f"{infos[impl.plugin_name].describe()} failed in "
                            f"gym_add_families: {exc}", exc) from exc
        for fam in sorted(set(families._items) - before):
            specs = families[fam].specs
            if any(specs is done for done in added_specs):
                continue  # several families may share one spec module
            added_specs.append(specs)
            try:
                pm.add_hookspecs(specs)
            except pluggy.PluginValidationError as exc:
                bad = plugin_name(exc.plugin)
                raise _Rejected(bad, f"{infos[bad].describe()} does not match the hook specs "
                                f"of family '{fam}': {exc}.", exc) from exc
    # 2. every hook implementation must match a spec (pluggy ignores a misspelt one)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        bad = plugin_name(exc.plugin)
        raise _Rejected(bad, f"{infos[bad].describe()} implements a hook no loaded plugin "
                        f"declares: {exc} (a misspelt hook name, or a hook of a family whose "
                        "plugin is not installed, disabled or skipped).", exc) from exc

    # 3. registration: each implementation separately, so every entry records its plugin,
    #    in load order (the core first): of two plugins claiming a name, the later fails.
    registries = {}
    for family in families:
        registry = registries[family.name] = Registry(family.name)
        for impl in getattr(pm.hook, family.hook).get_hookimpls():
            registry._plugin = impl.plugin_name
            try:
                _call(impl, registry=registry)
            except Exception as exc:
                info = infos[impl.plugin_name]
                message = f"{info.describe()} failed in {family.hook}: {exc}"
                if isinstance(exc, DuplicateNameError) and exc.plugins[0] != exc.plugins[1]:
                    first = infos.get(exc.plugins[0], CORE)
                    message += f" (plugin '{first.name}' is from {first.dist} {first.version})"
                raise _Rejected(impl.plugin_name, message, exc) from exc
        registry._plugin = CORE.name
    return pm, families, registries


def format_listing(plugins: Plugins) -> str:
    """What ``python -m gym_core --plugins`` prints: every plugin with its distribution,
    version, plugin API, the config-group options it adds and the hooks it implements."""
    lines = [
        f"gym-core {__version__}, plugin API {API_VERSION}; plugins come from the "
        f"'{hookspecs.PROJECT}' entry-point group.",
        "",
    ]
    for name, info in plugins.infos.items():
        where = "built in" if info is CORE else info.value
        api = f", API {info.api}" if info.api else ""
        lines.append(f"{name}  ({where}; {info.dist} {info.version}{api})")
        for family, names in plugins.options(name).items():
            lines.append(f"    {family}: {', '.join(names)}")
        registration = {f.hook for f in plugins.families.values()} | {"gym_add_families"}
        lifecycle = [h for h in plugins.hooks(name) if h not in registration]
        if lifecycle:
            lines.append(f"    hooks: {', '.join(lifecycle)}")
    if plugins.disabled:
        lines += ["", f"disabled by {DISABLE_ENV} (installed, not loaded):"]
        for name, info in plugins.disabled.items():
            lines.append(f"{name}  ({info.value}; {info.dist} {info.version})")
    if plugins.failed:
        lines += ["", f"skipped after an error ({ERRORS_ENV}=skip):"]
        lines += [f"{name}: {message}" for name, message in plugins.failed.items()]
    return "\n".join(lines)
