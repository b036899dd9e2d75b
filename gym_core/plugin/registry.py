"""Registries: what plugins add through the registration hooks.

One :class:`Registry` per family (algorithm, quant, data, reward, soup, and the families
plugins declare).
Each entry records which plugin added it, so listings and errors can name it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, is_dataclass
from typing import Any

from gym_core.base.errors import GymError


class RegistryError(GymError):
    """A name is unknown or registered twice; the message says which and what exists."""


class DuplicateNameError(RegistryError):
    """Two plugins register the same name; ``plugins`` is (first, second)."""

    def __init__(self, message: str, plugins: tuple[str, str]) -> None:
        super().__init__(message)
        self.plugins = plugins


@dataclass(frozen=True)
class Component:
    kind: str  # the family, also the Hydra config group ("algorithm", "quant", ...)
    name: str  # the option name: algorithm=<name>
    config: type | None  # the option's schema dataclass (None for rewards)
    impl: Any  # the class / callable, or a "module:attr" string resolved on first use
    plugin: str  # the plugin that registered it

    def load(self) -> Any:
        """The implementation, importing it first when it was registered lazily."""
        if not isinstance(self.impl, str):
            return self.impl
        module, _, attr = self.impl.partition(":")
        try:
            obj = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise RegistryError(
                f"{self.kind} '{self.name}' from plugin '{self.plugin}' points at "
                f"'{self.impl}', which cannot be loaded: {exc}"
            ) from exc
        return obj


@dataclass
class Registry:
    """The components of one family. Plugins call :meth:`add`; the core calls :meth:`get`."""

    kind: str
    _items: dict[str, Component] = field(default_factory=dict)
    _plugin: str = "gym_core"  # set by the plugin manager around each hook call

    def add(self, name: str, config: type | None, impl: Any) -> None:
        """Register ``impl`` under ``name`` with the schema dataclass ``config``."""
        if not isinstance(name, str) or not name.isidentifier():
            raise RegistryError(
                f"plugin '{self._plugin}' registers {self.kind} {name!r}: names must be "
                "identifiers (letters, digits, underscores), as they become config options"
            )
        if name in self._items:
            other = self._items[name].plugin
            if other == self._plugin:
                raise DuplicateNameError(
                    f"plugin '{other}' registers {self.kind} '{name}' twice", (other, other))
            raise DuplicateNameError(
                f"{self.kind} '{name}' is registered by both plugin '{other}' and plugin "
                f"'{self._plugin}'", (other, self._plugin))
        if config is not None and not (isinstance(config, type) and is_dataclass(config)):
            raise RegistryError(
                f"plugin '{self._plugin}' registers {self.kind} '{name}' with config "
                f"{config!r}: it must be a dataclass type"
            )
        self._items[name] = Component(self.kind, name, config, impl, self._plugin)

    def discard_plugin(self, plugin: str) -> None:
        """Forget everything ``plugin`` registered (it is being skipped after an error)."""
        self._items = {k: c for k, c in self._items.items() if c.plugin != plugin}

    def get(self, name: str) -> Component:
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(
                f"no {self.kind} named '{name}' is installed. Installed: "
                f"{', '.join(sorted(self._items)) or '(none)'}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __iter__(self):
        return iter(self._items.values())

    def __contains__(self, name: object) -> bool:
        return name in self._items
