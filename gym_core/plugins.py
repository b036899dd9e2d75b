"""Plugin discovery and the small facade the rest of gym uses instead of pluggy.

Plugins are found through the ``gym_core`` entry-point group, built-in ones included:
the core never imports a plugin by name. ``GYM_DISABLE_PLUGINS=a,b`` skips plugins by
entry-point name without uninstalling them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import metadata

import pluggy

from gym_core import hookspecs
from gym_core.registry import Registry

#: Registration hook per family; the family name is also the Hydra config group.
FAMILIES = {
    "algorithm": "gym_add_algorithms",
    "quant": "gym_add_quantizers",
    "experience_store": "gym_add_experience_stores",
    "data": "gym_add_datasets",
    "reward": "gym_add_rewards",
}

DISABLE_ENV = "GYM_DISABLE_PLUGINS"


class PluginError(RuntimeError):
    """A plugin could not be loaded or registered; the message names it and its distribution."""


@dataclass
class PluginInfo:
    name: str  # entry-point name
    value: str  # "module" the entry point points at
    dist: str  # distribution name
    version: str


@dataclass
class Plugins:
    """The loaded plugins and what they registered."""

    pm: pluggy.PluginManager
    registries: dict[str, Registry]
    infos: dict[str, PluginInfo] = field(default_factory=dict)
    disabled: list[str] = field(default_factory=list)

    def registry(self, family: str) -> Registry:
        return self.registries[family]

    def component(self, family: str, name: str):
        return self.registries[family].get(name)

    @property
    def hook(self):
        """Lifecycle hooks: ``plugins.hook.gym_step_end(step=..., metrics=...)``."""
        return self.pm.hook


def _disabled_names() -> list[str]:
    raw = os.environ.get(DISABLE_ENV, "")
    return [n.strip() for n in raw.split(",") if n.strip()]


def _describe(ep: metadata.EntryPoint) -> PluginInfo:
    dist = getattr(ep, "dist", None)
    return PluginInfo(
        name=ep.name,
        value=ep.value,
        dist=dist.metadata["Name"] if dist is not None else "?",
        version=dist.version if dist is not None else "?",
    )


def load_plugins(entry_points: list[metadata.EntryPoint] | None = None) -> Plugins:
    """Discover, load and register every plugin, then run the registration hooks.

    ``entry_points`` defaults to the ``gym_core`` group of the installed distributions.
    """
    from gym_core import builtin

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(builtin, name="gym_core")
    infos: dict[str, PluginInfo] = {}
    disabled = _disabled_names()
    if entry_points is None:
        entry_points = list(metadata.entry_points(group=hookspecs.PROJECT))
    seen: set[str] = set()
    for ep in entry_points:
        info = _describe(ep)
        if ep.name in disabled:
            continue
        if ep.name in seen:  # the same distribution visible twice on sys.path
            continue
        seen.add(ep.name)
        where = f"plugin '{ep.name}' ({ep.value}) from distribution {info.dist} {info.version}"
        try:
            module = ep.load()
        except Exception as exc:
            raise PluginError(
                f"{where} failed to import: {type(exc).__name__}: {exc}. Fix or uninstall "
                f"it, or skip it with {DISABLE_ENV}={ep.name}."
            ) from exc
        try:
            pm.register(module, name=ep.name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            raise PluginError(
                f"{where} does not match gym's hook specs: {exc}. Skip it with "
                f"{DISABLE_ENV}={ep.name}."
            ) from exc
        infos[ep.name] = info

    registries = {family: Registry(family) for family in FAMILIES}
    for family, hook_name in FAMILIES.items():
        registry = registries[family]
        caller = getattr(pm.hook, hook_name)
        # Call each implementation separately so every entry records its plugin.
        for impl in reversed(caller.get_hookimpls()):
            registry._plugin = impl.plugin_name
            try:
                impl.function(registry=registry)
            except Exception as exc:
                info = infos.get(impl.plugin_name)
                who = f" ({info.dist} {info.version})" if info else ""
                raise PluginError(
                    f"plugin '{impl.plugin_name}'{who} failed in {hook_name}: {exc}"
                ) from exc
        registry._plugin = "gym_core"
    return Plugins(pm=pm, registries=registries, infos=infos, disabled=disabled)
