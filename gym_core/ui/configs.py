"""What the New run page builds its form from, with no UI code: the config groups and
the options the installed plugins register, each option's fields (name, type, default)
read from the composed config's typed nodes, and the overrides, YAML and command line a
form's values give. A third-party plugin's options, and the groups a plugin declares for
its own methods (cl_grpo's ``experience_store`` and ``llm``), appear here because they
appear in Hydra's composition, not because this module knows them.

Values are checked twice: :func:`check_value` at once, per field (the page marks the
field), and :func:`compose` with every override together (gym's own one-line error, the
one ``python -m gym_core`` would print) before anything is launched.
"""

from __future__ import annotations

import re
import shlex
import threading
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.nodes import (
    AnyNode,
    BooleanNode,
    BytesNode,
    EnumNode,
    FloatNode,
    IntegerNode,
    PathNode,
    StringNode,
)

from gym_core.base.errors import GymError

#: the core's groups, in the order the form shows them; plugin-declared groups follow
CORE_ORDER = ["model", "data", "algorithm", "quant", "trainer", "run"]


@dataclass
class Field:
    """One leaf of a group's config: ``key`` is the full dotted key (``algorithm.lr``)."""

    key: str
    kind: str  # int | float | bool | str | list | dict | enum | any
    default: Any  # the option's default (plain Python), None for a missing value
    optional: bool  # None is allowed
    required: bool  # no default (MISSING): the run needs a value
    choices: list[str] | None = None  # enum members
    computed: str | None = None  # a default computed from other keys (run.name's ${...})

    @property
    def default_text(self) -> str:
        if self.required or self.computed:
            return ""
        return self.default if isinstance(self.default, str) else to_text(self.default)


@dataclass
class Composed:
    """A composed config with what the form needs from it."""

    cfg: DictConfig  # without Hydra's node
    choices: dict[str, str]  # group -> option, plugin-declared groups included
    overrides: list[str]

    def yaml(self) -> str:
        return OmegaConf.to_yaml(self.cfg)


def groups() -> dict[str, list[str]]:
    """Every config group and its installed options (what ``--help`` lists)."""
    from gym_core.__main__ import config_groups
    from gym_core.plugin.startup import bootstrap

    bootstrap()
    return config_groups()


_compose_lock = threading.Lock()  # Hydra's global state serves one composition at a time


def compose(overrides: list[str]) -> Composed:
    """Compose like ``python -m gym_core OVERRIDES``; a bad override raises GymError.
    Safe to call from several threads (the pages compose off the event loop)."""
    from gym_core.plugin.startup import compose as startup_compose

    with _compose_lock:
        cfg = startup_compose(list(overrides), return_hydra_config=True)
    choices = {g: str(o) for g, o in cfg.hydra.runtime.choices.items()
               if "/" not in g and o is not None}
    with open_dict(cfg):
        del cfg["hydra"]
    return Composed(cfg, choices, list(overrides))


def ordered_groups(choices: dict[str, str]) -> list[str]:
    return [g for g in CORE_ORDER if g in choices] + sorted(g for g in choices
                                                            if g not in CORE_ORDER)


def sections(composed: Composed) -> list[tuple[str, bool]]:
    """The form's cards in order: (name, True) for a config group (an option is picked),
    (name, False) for a plain section of the config (``run``: fields only)."""
    names = [k for k in composed.cfg if isinstance(composed.cfg._get_node(k), DictConfig)]
    order = [n for n in CORE_ORDER if n in names] + sorted(n for n in names
                                                           if n not in CORE_ORDER)
    return [(n, n in composed.choices) for n in order]


def fields(cfg: DictConfig, group: str, option: str | None = None) -> list[Field]:
    """The leaves of ``cfg[group]`` (nested sections flattened to dotted keys). A
    top-level field holding the option's own name (``algorithm.name``, ``model.source``)
    identifies the option and is left out: the option is picked, not typed."""
    node = cfg._get_node(group)
    if not isinstance(node, DictConfig):
        return []
    return [f for f in _walk(node, group)
            if not (option is not None and f.key.count(".") == 1 and f.default == option)]


def _walk(node: DictConfig, prefix: str):
    for key in node:
        child = node._get_node(key)
        full = f"{prefix}.{key}"
        if isinstance(child, DictConfig) and not child._is_none() and \
                not child._is_missing() and child._metadata.object_type not in (None, dict):
            yield from _walk(child, full)  # a nested schema (model.lora): its own fields
            continue
        required = child._is_missing()
        optional = bool(child._is_optional())
        default = None if required else OmegaConf.to_container(child, resolve=False) \
            if isinstance(child, (DictConfig, ListConfig)) else child._value()
        choices = None
        if isinstance(child, ListConfig):
            kind = "list"
        elif isinstance(child, DictConfig):
            kind = "dict"
        elif isinstance(child, BooleanNode):
            kind = "bool"
        elif isinstance(child, IntegerNode):
            kind = "int"
        elif isinstance(child, FloatNode):
            kind = "float"
        elif isinstance(child, (StringNode, PathNode, BytesNode)):
            kind = "str"
        elif isinstance(child, EnumNode):
            kind = "enum"
            choices = [m.name for m in child.enum_type]
            default = None if default is None else default.name
        elif isinstance(child, AnyNode):
            kind = "any"
        else:
            kind = "any"
        computed = None
        if isinstance(default, str) and "${" in default:
            computed, default = default, None
        yield Field(full, kind, default, optional, required, choices, computed)


def to_text(value: Any) -> str:
    """A value as an override's right-hand side (and, but for a plain string, which the
    form shows as it is, as the form's text)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(to_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{to_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return quote(value)
    return repr(value) if isinstance(value, float) else str(value)


_PLAIN = re.compile(r"^[A-Za-z0-9_./\-+:@]*[A-Za-z0-9_./\-+@]$")


def quote(text: str) -> str:
    """A string as Hydra's override grammar reads it back unchanged: plain words as they
    are, anything else (spaces, commas, brackets, quotes, '=', '${') in single quotes."""
    if _PLAIN.match(text) and text.lower() not in ("null", "true", "false", "nan", "inf"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def check_value(f: Field, text: str) -> str | None:
    """Why ``text`` cannot be ``f``'s value (one line naming the field), or None."""
    t = text.strip()
    if t in ("", "null", "None"):
        if f.optional and t != "":
            return None
        if f.required or not f.optional:
            if t == "" and f.kind == "str" and not f.required:
                return None  # the empty string
            return f"{f.key} needs a value" if t == "" or f.required else \
                f"{f.key} cannot be null (its type is {f.kind})"
        return None
    if f.kind == "int":
        try:
            int(t)
        except ValueError:
            return f"{f.key}: {t!r} is not an integer"
    elif f.kind == "float":
        try:
            float(t)
        except ValueError:
            return f"{f.key}: {t!r} is not a number"
    elif f.kind == "bool" and t.lower() not in ("true", "false"):
        return f"{f.key}: {t!r} is not true or false"
    elif f.kind == "enum" and f.choices and t not in f.choices:
        return f"{f.key}: {t!r} is not one of {', '.join(f.choices)}"
    elif f.kind == "list" and not (t.startswith("[") and t.endswith("]")):
        return f"{f.key}: a list is written in brackets, e.g. [a,b]"
    return None


def override_value(f: Field, text: str) -> str:
    """The override's right-hand side for the text a user typed into ``f``."""
    t = text.strip()
    if t in ("null", "None") or (t == "" and f.optional and f.kind != "str"):
        return "null"
    if f.kind == "str":
        return quote(text)
    if f.kind == "bool":
        return t.lower()
    return t


def build_overrides(selected: dict[str, str], defaults: dict[str, str],
                    values: dict[str, str], fields_by_key: dict[str, Field]) -> list[str]:
    """``group=option`` for each option that differs from the default choice, then
    ``key=value`` for each field whose text differs from its default."""
    out = [f"{g}={selected[g]}" for g in ordered_groups(selected)
           if defaults.get(g) != selected[g]]
    for key, text in values.items():
        f = fields_by_key.get(key)
        if f is None:
            continue
        if text.strip() == f.default_text.strip() and not f.required:
            continue
        if f.required and text.strip() == "":
            continue  # check_value reports it
        out.append(f"{key}={override_value(f, text)}")
    return out


def command(overrides: list[str]) -> str:
    """The equivalent command line."""
    return shlex.join(["python", "-m", "gym_core", *overrides])


def first_error(flds: list[Field], values: dict[str, str]) -> str | None:
    for f in flds:
        err = check_value(f, values.get(f.key, f.default_text))
        if err:
            return err
    return None


def checked(overrides: list[str]) -> Composed:
    """:func:`compose`, with gym's own message for what the form could not catch."""
    try:
        return compose(overrides)
    except GymError:
        raise
    except Exception as exc:  # a resolver or validation error Hydra did not wrap
        raise GymError(f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None
