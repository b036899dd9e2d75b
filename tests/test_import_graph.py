"""The layering rules of docs/plugins.md, read from the source (AST; nothing is imported):

- the core (``gym_core``) never imports a plugin (``plugins/gym_*``);
- a plugin never imports another plugin;
- a plugin imports from the core only ``gym_core.api`` and ``gym_core.contracts`` (the
  public API), never an internal module;
- the core's modules import each other without a cycle at module level (an import inside
  a function runs later and may break a cycle; ``if TYPE_CHECKING:`` imports never run).

Plus the public API's ``TYPE_CHECKING`` block: type checkers see each lazily loaded name
of ``gym_core.api`` imported from the module that really defines it.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

from tests.conftest import REPO

CORE = REPO / "gym_core"
PLUGINS = sorted(p for p in (REPO / "plugins").iterdir() if (p / "__init__.py").is_file())
PLUGIN_NAMES = {p.name for p in PLUGINS}
PUBLIC = ("gym_core.api", "gym_core.contracts")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(package: Path) -> dict[str, Path]:
    """``{dotted name: file}`` of every module of a package (the package's folder's name is
    its import name)."""
    return {module_name(p, package.parent): p for p in sorted(package.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


@functools.cache
def imports(path: Path, name: str, known: frozenset[str]) -> list[tuple[str, int, bool]]:
    """``(imported module, line, top_level)`` for every import in the file. ``top_level``:
    executed when the module is imported (not inside a function, not under
    ``if TYPE_CHECKING:``). ``from a import b`` counts as importing ``a.b`` when that is a
    module of ``known``, else ``a``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    out: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), False)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), top)
            elif isinstance(child, ast.Import):
                out.extend((alias.name, child.lineno, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".")
                    base = base[: len(base) - child.level + (1 if is_package else 0)]
                    source = ".".join([*base, *([child.module] if child.module else [])])
                else:
                    source = child.module or ""
                for alias in child.names:
                    sub = f"{source}.{alias.name}"
                    out.append((sub if sub in known else source, child.lineno, top))
            else:
                visit(child, top)

    visit(tree, True)
    return out


def _top(module: str) -> str:
    return module.split(".", 1)[0]


CORE_MODULES = modules(CORE)
PLUGIN_MODULES = {n: p for plugin in PLUGINS for n, p in modules(plugin).items()}
KNOWN = frozenset(CORE_MODULES) | frozenset(PLUGIN_MODULES)


def test_the_scan_sees_the_code():
    assert "gym_core.train.job" in CORE_MODULES and "gym_core.api" in CORE_MODULES
    assert {"gym_grpo", "gym_bitdelta", "gym_cl_grpo"} <= PLUGIN_NAMES
    edges = imports(CORE_MODULES["gym_core.train.job"], "gym_core.train.job", KNOWN)
    assert ("gym_core.base.errors", True) in {(m, top) for m, _, top in edges}


def test_the_core_imports_no_plugin():
    wrong = [f"{path.relative_to(REPO)}:{line} imports {mod}"
             for name, path in CORE_MODULES.items()
             for mod, line, _ in imports(path, name, KNOWN) if _top(mod) in PLUGIN_NAMES]
    assert not wrong, "the core must not import a plugin (plugins register through hooks):\n" + \
        "\n".join(wrong)


def test_plugins_import_only_themselves_and_the_public_api():
    wrong = []
    for name, path in PLUGIN_MODULES.items():
        own = _top(name)
        for mod, line, _ in imports(path, name, KNOWN):
            where = f"{path.relative_to(REPO)}:{line} imports {mod}"
            top = _top(mod)
            if top in PLUGIN_NAMES and top != own:
                wrong.append(f"{where}: another plugin")
            elif top == "gym_core" and not any(mod == p or mod.startswith(p + ".")
                                               for p in PUBLIC):
                wrong.append(f"{where}: a core internal (use gym_core.api)")
    assert not wrong, "plugin imports outside the rules of docs/plugins.md:\n" + "\n".join(wrong)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a module importing
    itself), each as a list of module names (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def test_find_cycles_finds_them():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_core_has_no_import_cycle_at_module_level():
    graph = {name: {mod for mod, _, top in imports(path, name, KNOWN)
                    if top and mod in CORE_MODULES and mod != name}
             for name, path in CORE_MODULES.items()}
    cycles = find_cycles(graph)
    assert not cycles, (
        "module-level import cycles in gym_core (move one import into the function that "
        "needs it, or move the shared code down a layer):\n"
        + "\n".join(" <-> ".join(c) for c in cycles))


def _lazy_names(tree: ast.Module) -> dict[str, str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("gym_core/api.py has no _LAZY table")


def test_the_api_declares_its_lazy_names_for_type_checkers():
    tree = ast.parse((CORE / "api.py").read_text(encoding="utf-8"))
    lazy = _lazy_names(tree)
    assert "Algorithm" in lazy and "Policy" in lazy
    declared: dict[str, str] = {}
    blocks = [n for n in tree.body if isinstance(n, ast.If) and _is_type_checking(n.test)]
    assert blocks, "gym_core/api.py has no `if TYPE_CHECKING:` block"
    for block in blocks:
        for stmt in block.body:
            assert isinstance(stmt, ast.ImportFrom), (
                f"gym_core/api.py:{stmt.lineno}: only imports belong in the TYPE_CHECKING block")
            for alias in stmt.names:
                assert alias.asname in (None, alias.name), (
                    f"{alias.name} is imported as {alias.asname}: the name must not change")
                assert alias.name not in declared, f"{alias.name} is declared twice"
                declared[alias.name] = stmt.module
    assert declared == lazy, (
        "the TYPE_CHECKING block of gym_core/api.py must import exactly the _LAZY names from "
        f"their modules: missing {sorted(set(lazy) - set(declared))}, extra "
        f"{sorted(set(declared) - set(lazy))}, from another module "
        f"{sorted(n for n in set(lazy) & set(declared) if lazy[n] != declared[n])}")
    for name, module in lazy.items():  # the module really defines it (read, not imported)
        source = CORE_MODULES[module].read_text(encoding="utf-8")
        defined = {t.id for n in ast.parse(source).body
                   for t in (n.targets if isinstance(n, ast.Assign) else
                             [n.target] if isinstance(n, ast.AnnAssign) else [])
                   if isinstance(t, ast.Name)}
        defined |= {n.name for n in ast.parse(source).body
                    if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))}
        assert name in defined, f"gym_core.api: {name} is not defined in {module}"
