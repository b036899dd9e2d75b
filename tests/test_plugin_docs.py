"""docs/plugins.md documents the whole plugin contract: a hook spec without a docstring
or without a section there fails here (add a "### <hook name>" section saying when the
hook is called, its arguments and how results combine)."""

from __future__ import annotations

import re

from gym_core import hookspecs
from gym_core.plugins import FAMILIES
from tests.conftest import REPO

PAGE = REPO / "docs" / "plugins.md"


def hook_specs():
    marker = f"{hookspecs.PROJECT}_spec"  # what pluggy's HookspecMarker sets
    return {name: fn for name, fn in vars(hookspecs).items()
            if callable(fn) and hasattr(fn, marker)}


def sections(text: str) -> dict[str, str]:
    parts = re.split(r"^### (\S+)\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_every_hook_spec_has_a_docstring_and_a_section():
    specs = hook_specs()
    assert set(FAMILIES.values()) <= set(specs)
    documented = sections(PAGE.read_text(encoding="utf-8"))
    missing = []
    for name, fn in sorted(specs.items()):
        if not (fn.__doc__ and len(fn.__doc__.strip()) > 40):
            missing.append(f"{name}: no docstring in gym_core/hookspecs.py")
        body = documented.get(name)
        if body is None:
            missing.append(f"{name}: no '### {name}' section in docs/plugins.md")
        elif not all(word in body for word in ("*When:*", "*Arguments:*", "*Results:*")):
            missing.append(f"{name}: its section must say *When:*, *Arguments:*, *Results:*")
    assert not missing, "\n".join(missing)


def test_no_section_documents_a_hook_that_does_not_exist():
    hooks = {name for name in sections(PAGE.read_text(encoding="utf-8")) if name.startswith("gym_")}
    assert hooks <= set(hook_specs()), hooks - set(hook_specs())


def test_every_config_group_hook_appears_in_the_option_table():
    text = PAGE.read_text(encoding="utf-8")
    for family, hook in FAMILIES.items():
        assert f"| `{hook}` |" in text, f"docs/plugins.md's option table lacks {hook} ({family})"
