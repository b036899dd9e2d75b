"""docs/plugins.md is the plugin contract's guide: its hook reference is generated from the
hook specs' docstrings (python -m gym_core.plugin.hookdocs) and must be current; plugins are
shown importing only the public API module."""

from __future__ import annotations

import re

from gym_core.plugin import hookdocs, hookspecs
from gym_core.plugin.manager import CORE_FAMILIES
from tests.conftest import REPO

PAGE = REPO / "docs" / "plugins.md"
EXAMPLE = REPO / "docs" / "examples" / "gym-example-plugin"


def test_hook_reference_is_generated_from_the_docstrings():
    assert hookdocs.current_block(PAGE) == hookdocs.reference(), (
        "docs/plugins.md's hook reference differs from the hook specs' docstrings: run "
        "python -m gym_core.plugin.hookdocs")


def test_api_reference_is_generated_from_the_code():
    assert hookdocs.current_block(PAGE, hookdocs.API_BEGIN, hookdocs.API_END) == \
        hookdocs.api_reference(), (
        "docs/plugins.md's API reference differs from gym_core.api's signatures and "
        "docstrings: run python -m gym_core.plugin.hookdocs")


def test_api_reference_has_every_public_name_with_its_signature():
    from gym_core import api

    block = hookdocs.api_reference()
    for name in api.__all__:
        assert f"### `{name}`" in block, f"{name} is not in the API reference"
    # what plugin authors had to find with help() before
    assert "`Task(name: 'str', train: 'list[dict[str, Any]]'" in block
    assert "`write_text(path: 'str | Path', text: 'str') -> 'None'`" in block
    assert "- `trainable_parameters()`" in block
    for field in ("lr: 'float' = 1e-05", "weight_decay: 'float' = 0.0", "adam_betas"):
        assert field in block.split("### `AlgorithmConfig`")[1].split("### ")[0], field


def test_inline_code_split_over_docstring_lines_renders_whole():
    doc = """A method (``trains_weights =
    False``: no optimizer) overrides ``step`` to learn."""
    out = hookdocs.render_docstring(doc)
    assert out == "A method (`trains_weights =\nFalse`: no optimizer) overrides `step` to learn."
    prose = re.sub(r"```python\n.*?\n```", "", hookdocs.reference(), flags=re.S)
    assert "``" not in prose, "a double backtick left in the hook reference"


def test_every_hook_spec_says_when_what_and_how_results_combine():
    for name, fn in hookdocs.hook_specs(hookspecs).items():
        doc = fn.__doc__ or ""
        assert len(doc.strip()) > 80, f"{name} has no real docstring"
        assert "implementations are called" in doc, f"{name}: say how results combine"
        if name.startswith("gym_add_"):
            assert "Called once at start-up" in doc, f"{name}: say when it is called"


def test_rendering_turns_params_and_code_blocks_into_markdown():
    doc = """Summary.

    :param registry: call ``registry.add``
        on it.

    Example::

        x = 1
    """
    out = hookdocs.render_docstring(doc)
    assert "- `registry`: call `registry.add` on it." in out
    assert "```python\nx = 1\n```" in out


def test_every_core_family_appears_in_the_option_table():
    text = PAGE.read_text(encoding="utf-8")
    for family in CORE_FAMILIES:
        assert f"| `{family.hook}` |" in text, f"the option table lacks {family.hook}"


def _gym_imports(text: str) -> set[str]:
    return set(re.findall(r"^\s*(?:from|import) (gym_core[\w.]*)", text, flags=re.M))


def test_docs_and_the_example_package_import_only_the_public_api():
    allowed = {"gym_core.api"}
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)
    used = set().union(*(_gym_imports(b) for b in blocks))
    for path in EXAMPLE.rglob("*.py"):
        used |= _gym_imports(path.read_text(encoding="utf-8"))
    assert used, "no gym import found: the scan is broken"
    wrong = {m for m in used if m not in allowed and not m.startswith("gym_core.contracts")}
    assert not wrong, f"plugins are shown importing {sorted(wrong)}: use gym_core.api"
