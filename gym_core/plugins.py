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

from gym_core import API_VERSION, __version__, hookspecs
from gym_core.registry import DuplicateNameError, Registry

#: Registration hook per family; the family name is also the Hydra config group.
FAMILIES = {
    "algorithm": "gym_add_algorithms",
    "quant": "gym_add_quantizers",
    "experience_store": "gym_add_experience_stores",
    "data": "gym_add_datasets",
    "reward": "gym_add_rewards",
    "llm": "gym_add_llms",
    "soup": "gym_add_aggregators",  # the soup app's group (python -m gym_core.soup)
}

DISABLE_ENV = "GYM_DISABLE_PLUGINS"
#: What to do with a plugin that fails to load: "fail" (the default) stops with an error
#: naming it; "skip" prints a warning, leaves the plugin out and carries on.
ERRORS_ENV = "GYM_PLUGIN_ERRORS"
ERROR_POLICIES = ("fail", "skip")


class PluginError(RuntimeError):
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


#: The core's own registrations (gym_core/builtin.py), listed like a plugin.
CORE = PluginInfo("gym_core", "gym_core.builtin", "gym-core", __version__)


@dataclass
class Plugins:
    """The loaded plugins and what they registered."""

    pm: pluggy.PluginManager
    registries: dict[str, Registry]
    infos: dict[str, PluginInfo] = field(default_factory=dict)
    disabled: dict[str, PluginInfo] = field(default_factory=dict)  # by GYM_DISABLE_PLUGINS
    failed: dict[str, str] = field(default_factory=dict)  # skipped after an error: message

    def registry(self, family: str) -> Registry:
        return self.registries[family]

    def component(self, family: str, name: str):
        return self.registries[family].get(name)

    @property
    def hook(self):
        """Lifecycle hooks: ``plugins.hook.gym_step_end(step=..., metrics=...)``."""
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


def _remedy(name: str) -> str:
    return (
        f" Fix or uninstall it, skip it with {DISABLE_ENV}={name}, or set {ERRORS_ENV}=skip "
        "to leave out every plugin that fails to load."
    )


def load_plugins(entry_points: list[metadata.EntryPoint] | None = None) -> Plugins:
    """Discover, load and register every plugin, then run the registration hooks.

    ``entry_points`` defaults to the ``gym_core`` group of the installed distributions.
    A plugin that fails (import error, API version mismatch, a hook implementation that
    does not match its spec, an error or a duplicate name in a registration hook) raises
    :class:`PluginError` naming it, its distribution and version; with
    ``GYM_PLUGIN_ERRORS=skip`` it is left out with a warning instead (``Plugins.failed``).
    """
    from gym_core import builtin

    policy = _error_policy()
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(builtin, name=CORE.name)
    infos: dict[str, PluginInfo] = {CORE.name: CORE}
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
        if ep.name in infos or ep.name in disabled or ep.name in failed:
            continue  # the same distribution visible twice on sys.path
        if ep.name in to_disable:
            disabled[ep.name] = info
            continue
        try:
            module = ep.load()
        except Exception as exc:
            reject(ep.name, f"{info.describe()} failed to import: {type(exc).__name__}: {exc}.",
                   exc)
            continue
        try:
            info.api = _declared_api(module, info)
        except PluginError as exc:
            reject(ep.name, str(exc), exc)
            continue
        try:
            pm.register(module, name=ep.name)
            # A hookimpl whose name matches no spec (a typo such as gym_add_algorithm)
            # would otherwise be ignored silently.
            pm.check_pending()
        except (pluggy.PluginValidationError, ValueError) as exc:
            if pm.is_registered(module):
                pm.unregister(module)
            reject(ep.name, f"{info.describe()} does not match gym's hook specs: {exc}.", exc)
            continue
        infos[ep.name] = info
    for name in to_disable:
        if name == CORE.name:
            print(f"gym: warning: {DISABLE_ENV} names '{name}': gym's own registrations "
                  "cannot be disabled.", file=sys.stderr)
        elif name not in disabled:
            print(f"gym: warning: {DISABLE_ENV} names '{name}', but no installed plugin has "
                  f"that entry-point name (installed: {', '.join(sorted(infos))}).",
                  file=sys.stderr)

    registries = {family: Registry(family) for family in FAMILIES}
    for family, hook_name in FAMILIES.items():
        registry = registries[family]
        caller = getattr(pm.hook, hook_name)
        # Call each implementation separately so every entry records its plugin, in
        # load order (the core first): of two plugins claiming a name, the later fails.
        for impl in caller.get_hookimpls():
            if impl.plugin_name in failed:
                continue
            registry._plugin = impl.plugin_name
            try:
                impl.function(registry=registry)
            except Exception as exc:
                info = infos[impl.plugin_name]
                message = f"{info.describe()} failed in {hook_name}: {exc}"
                if isinstance(exc, DuplicateNameError):
                    first = infos.get(exc.plugins[0], CORE)
                    message += f" (plugin '{first.name}' is from {first.dist} {first.version})"
                reject(impl.plugin_name, message, exc)
                # Skipped: take back what it registered so far, and its lifecycle hooks.
                for reg in registries.values():
                    reg.discard_plugin(impl.plugin_name)
                pm.unregister(name=impl.plugin_name)
                del infos[impl.plugin_name]
        registry._plugin = CORE.name
    return Plugins(pm=pm, registries=registries, infos=infos, disabled=disabled, failed=failed)


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
        lifecycle = [h for h in plugins.hooks(name) if h not in FAMILIES.values()]
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
