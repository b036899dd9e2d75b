"""Allowed values, declared once in the config schemas and checked once.

A config field declares what it may hold where it is defined, in its dataclass:

    from typing import Literal
    from gym_core.api import bounded, one_of

    Level = Literal["token", "sequence"]

    @dataclass
    class MyConfig(OnlineAlgorithmConfig):
        level: str = one_of(Level, "token")           # a choice
        alpha: float = bounded(0.5, ge=0, le=1)       # a number in [0, 1]
        widths: list[int] = bounded([4, 8], ge=1)     # every item at least 1
        cap: float | None = bounded(None, gt=0, hint="null: no cap")

        @staticmethod
        def validate(cfg, key):                       # relations between fields
            ...

Why the declaration lives in the field's metadata (:func:`dataclasses.field`) and not in
its type: Hydra's configs are OmegaConf structured configs, and OmegaConf types a field
from its annotation, which must be a plain type (``str``, ``int``, ``float``, ``bool``,
lists, dicts, dataclasses, ``Optional`` and Enums); ``typing.Literal`` and
``typing.Annotated`` are refused. So the field stays typed ``str`` (OmegaConf converts
and type-checks overrides as before) and the choices ride in the metadata, given as a
``Literal`` (which code can also use as the type of a parameter, so type checkers see the
choices) or as a tuple. An Enum-typed field works too: OmegaConf itself refuses a value
that is not a member.

A subclass that only changes a default (``loss_type: str = "dr_grpo"``) keeps its base's
declaration: :func:`declarations` reads each field's metadata from the first class of
the MRO that declares one.

:func:`check_values` walks a composed config (every section whose node is a structured
config: the core's groups and every plugin's, nested sections included) and refuses the
first value outside its declaration in one line naming the field, the value and what is
allowed. It then calls each ``validate(cfg, key)`` declared in a section's class body
(bases first; a subclass's ``validate`` adds to its bases', it does not replace them) for
rules that relate several fields. ``python -m gym_core`` (and the soup and export apps)
run it on the config the overrides give, before Hydra starts and before anything is
created on disk (:func:`gym_core.plugin.startup.check_overrides`);
:func:`gym_core.config.checks.preflight` runs it for in-process callers of ``run_job``.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal, get_args, get_origin

from gym_core.base.errors import GymError

#: the metadata keys a declaration may hold
KEYS = ("choices", "ge", "gt", "le", "lt", "length", "hint")


def _choices(allowed) -> tuple:
    if get_origin(allowed) is Literal:
        return get_args(allowed)
    if isinstance(allowed, type) and issubclass(allowed, enum.Enum):
        return tuple(m.value for m in allowed)
    values = tuple(allowed)
    if not values:
        raise ValueError("one_of needs at least one allowed value")
    return values


def _field(default: Any, metadata: dict) -> Any:
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def one_of(allowed, default: Any, *, hint: str | None = None) -> Any:
    """A field whose value (or each value, when it holds a list) must be one of
    ``allowed``: a ``typing.Literal[...]``, an Enum class or a sequence. ``default`` may be
    ``None`` for an optional field (``None`` is then always allowed)."""
    meta = {"choices": _choices(allowed)}
    if hint:
        meta["hint"] = hint
    return _field(default, meta)


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, length: int | None = None,
            hint: str | None = None) -> Any:
    """A numeric field (or a list of numbers: each item) within the bounds given:
    ``ge`` / ``gt`` (at least / greater than) and ``le`` / ``lt`` (at most / less than),
    as in annotated-types and pydantic. No bound: any finite number (NaN and infinities
    are always refused). ``length``: a list must hold exactly that many numbers. ``None``
    is allowed when it is the default or the field is ``Optional``; ``hint`` is added to
    the error (e.g. "0: off")."""
    if ge is not None and gt is not None or le is not None and lt is not None:
        raise ValueError("give at most one lower bound (ge or gt) and one upper (le or lt)")
    meta: dict[str, Any] = {"ge": ge, "gt": gt, "le": le, "lt": lt}
    meta = {k: v for k, v in meta.items() if v is not None}
    meta["range"] = True
    if length is not None:
        meta["length"] = length
    if hint:
        meta["hint"] = hint
    return _field(default, meta)


def declarations(cls: type) -> dict[str, Mapping[str, Any]]:
    """Each field of the dataclass ``cls`` with a declaration: its metadata, from the
    first class of the MRO that declares one (a subclass that changes only the default
    keeps its base's declaration)."""
    out: dict[str, Mapping[str, Any]] = {}
    for f in dataclasses.fields(cls):
        for klass in cls.__mro__:
            own = getattr(klass, "__dataclass_fields__", {}).get(f.name)
            if own is not None and ("choices" in own.metadata or "range" in own.metadata):
                out[f.name] = own.metadata
                break
    return out


def describe(meta: Mapping[str, Any]) -> str:
    """What a declaration allows, in words: "one of a, b", "in [0, 1)", "at least 1"."""
    if "choices" in meta:
        return "one of " + ", ".join(str(c) for c in meta["choices"])
    lo = ("[", meta["ge"]) if "ge" in meta else ("(", meta["gt"]) if "gt" in meta else None
    hi = (meta["le"], "]") if "le" in meta else (meta["lt"], ")") if "lt" in meta else None
    if lo and hi:
        return f"in {lo[0]}{lo[1]:g}, {hi[0]:g}{hi[1]}"
    if lo:
        return f"at least {lo[1]:g}" if lo[0] == "[" else f"greater than {lo[1]:g}"
    if hi:
        return f"at most {hi[0]:g}" if hi[1] == "]" else f"less than {hi[0]:g}"
    return "a finite number"


def _in_range(x: float, meta: Mapping[str, Any]) -> bool:
    if not math.isfinite(x):
        return False
    return not (("ge" in meta and x < meta["ge"]) or ("gt" in meta and x <= meta["gt"])
                or ("le" in meta and x > meta["le"]) or ("lt" in meta and x >= meta["lt"]))


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def check_value(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    """Refuse ``value`` of the field ``key`` if its declaration ``meta`` does not allow it."""
    if value is None:
        return
    hint = f" ({meta['hint']})" if meta.get("hint") else ""
    items = list(value) if isinstance(value, (list, tuple)) else None
    if "choices" in meta:
        for item in items if items is not None else [value]:
            if item not in meta["choices"]:
                where = "" if items is None else f" names {_show(item)}, which"
                raise GymError(f"{key}={_show(value)}{where} is not {describe(meta)}{hint}")
        return
    if "length" in meta and items is not None and len(items) != meta["length"]:
        raise GymError(f"{key}={_show(value)} must hold {meta['length']} numbers, has "
                       f"{len(items)}{hint}")
    for item in items if items is not None else [value]:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue  # OmegaConf has checked the type
        if not _in_range(item, meta):
            what = describe(meta)
            if not math.isfinite(item) and what != "a finite number":
                what = f"a finite number {what}"
            if items is None:
                raise GymError(f"{key}={_show(value)} must be {what}{hint}")
            raise GymError(f"{key}={_show(value)}: each value must be {what}, {_show(item)} "
                           f"is not{hint}")


def _validators(cls: type) -> Iterable:
    for klass in reversed(cls.__mro__):
        fn = klass.__dict__.get("validate")
        if fn is not None:
            yield fn.__get__(None, klass)


def check_values(cfg, key: str = "") -> None:
    """Check every declared field of ``cfg`` (a DictConfig: a whole composed config or
    one section, whose path is ``key``) and each section's ``validate``; raise
    :class:`GymError` with one line on the first value that is not allowed. Values left
    unset (``???``) are skipped (:func:`gym_core.config.checks.check_missing` names
    them)."""
    from omegaconf import DictConfig, OmegaConf

    cls = OmegaConf.get_type(cfg)
    declared = declarations(cls) if dataclasses.is_dataclass(cls) else {}
    for name in cfg:
        path = f"{key}.{name}" if key else str(name)
        if OmegaConf.is_missing(cfg, name):
            continue
        value = cfg[name]
        if isinstance(value, DictConfig):
            check_values(value, path)
        elif name in declared:
            if OmegaConf.is_config(value):
                value = OmegaConf.to_container(value, resolve=True)
            check_value(path, value, declared[name])
    if dataclasses.is_dataclass(cls):
        for validate in _validators(cls):
            validate(cfg, key)


def undeclared_numbers(cls: type) -> list[str]:
    """The numeric fields of the dataclass ``cls`` (nested dataclasses included) that
    declare no range: every numeric option should say what it may hold."""
    import typing

    hints = typing.get_type_hints(cls)
    declared = declarations(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints.get(f.name)
        args = set(get_args(tp)) | {tp}
        nested = [a for a in args if dataclasses.is_dataclass(a)]
        if nested:
            out += [f"{f.name}.{n}" for a in nested for n in undeclared_numbers(a)]
            continue
        numeric = any(a in (int, float) for a in args) or any(
            get_origin(a) is list and set(get_args(a)) & {int, float} for a in args)
        if numeric and f.name not in declared:
            out.append(f.name)
    return out
