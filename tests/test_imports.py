"""Which way imports go inside ``megafusion/`` (issue 25; ../shared/notes/design.md).

Reads every module's imports with ``ast`` (imports inside functions count: a lazy import
still ties two modules together) and checks three rules:

- no import cycle between modules of ``megafusion/``;
- ``megafusion.model`` holds modules only: it imports nothing from ``megafusion.training``
  or ``megafusion.recipes``, and from ``megafusion.data`` only the Sample format
  (``megafusion.data.sample``);
- no module uses another's ``_private`` names (``from megafusion.x import _y``, ``x._y``).

Importing ``a.b.c`` runs the ``__init__`` of ``a.b`` too, so a module depends on every
package above the module it imports (those it sits in itself excepted: they are running).
Imports under ``if TYPE_CHECKING:`` count too: a cycle only for the type checker is still
a circle a reader has to untangle (design.md: no import cycles anywhere).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megafusion"

# Cycles that exist today and are not yet broken: each is a sorted tuple of the modules of
# one strongly connected component. Delete an entry when its cycle is gone (the test says
# so). Any other cycle fails. (Issue 25 broke inference.loading <-> interop.{export,import_}
# with interop.safetensors_io, and moe <-> modality_ffn with model.routing + model.ffn.)
KNOWN_CYCLES: set[tuple[str, ...]] = set()

# megafusion.model may import these (and anything outside megafusion.{data,training,recipes}).
MODEL_MAY_IMPORT = {"megafusion.data.sample"}
MODEL_MAY_NOT_IMPORT = ("megafusion.data", "megafusion.training", "megafusion.recipes")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_names(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ``megafusion`` that ``name`` imports (at module level or in any function)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the importer's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            for alias in node.names:  # ``from pkg import submodule``
                if f"{target}.{alias.name}" in modules:
                    found.add(f"{target}.{alias.name}")
    targets: set[str] = set()
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
    for target in found:
        if target != "megafusion" and not target.startswith("megafusion."):
            continue
        while target and target not in modules:  # ``from megafusion.x import attr`` -> megafusion.x
            target = target.rpartition(".")[0]
        parts = target.split(".")
        for i in range(1, len(parts) + 1):  # the module and the packages above it
            prefix = ".".join(parts[:i])
            if prefix in modules and prefix not in own:
                targets.add(prefix)
    return targets


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imported_names(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components with more than one module (or a self-import), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[tuple[str, ...]] = []

    def visit(root: str) -> None:  # Tarjan's algorithm, iteratively
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    found.append(tuple(sorted(component)))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return sorted(found)


def cycle_path(graph: dict[str, set[str]], component: tuple[str, ...]) -> str:
    """One shortest loop through a component, for the failure message: a -> b -> ... -> a."""
    members, start = set(component), component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:  # breadth-first from start, inside the component, back to start
        reached = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return " -> ".join([*reversed(path), start])
                if child not in previous:
                    previous[child] = node
                    reached.append(child)
        frontier = reached
    return " <-> ".join(component)


def test_the_import_graph_is_read():
    graph = import_graph()
    assert "megafusion.model.transfusion" in graph and "megafusion.recipes.transfusion" in graph
    assert "megafusion.model.transfusion" in graph["megafusion.recipes.transfusion"]
    assert "megafusion.data.sample" in graph["megafusion.model.transfusion"]
    # a function-level import counts (recipes.transfusion reads its streams lazily)
    assert "megafusion.data.shapes_stream" in graph["megafusion.recipes.transfusion"]


def test_cycle_finder_on_a_known_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(graph) == [("a", "b", "c"), ("e",)]
    assert cycle_path(graph, ("a", "b", "c")) == "a -> b -> c -> a"


def test_no_import_cycles_inside_megafusion():
    graph = import_graph()
    found = cycles(graph)
    new = [c for c in found if c not in KNOWN_CYCLES]
    assert not new, "import cycles inside megafusion/ (imports inside functions count):\n" + "\n".join(
        f"  {cycle_path(graph, c)}" for c in new)
    gone = KNOWN_CYCLES - set(found)
    assert not gone, f"these known cycles are gone: remove them from KNOWN_CYCLES in {__file__}: {sorted(gone)}"


def test_model_imports_no_data_training_or_recipes():
    graph = import_graph()
    bad = sorted(
        f"{name} imports {target}"
        for name, targets in graph.items() if name == "megafusion.model" or name.startswith("megafusion.model.")
        for target in targets
        if target not in MODEL_MAY_IMPORT and target != "megafusion.data"  # the (empty) package of data.sample
        and any(target == p or target.startswith(p + ".") for p in MODEL_MAY_NOT_IMPORT))
    assert not bad, ("megafusion.model holds modules only: no imports from megafusion.training, "
                     "megafusion.recipes, or megafusion.data beyond megafusion.data.sample:\n  " + "\n  ".join(bad))


def private_uses(name: str, path: Path) -> list[str]:
    """``_private`` names that module ``name`` takes from another megafusion module: imported by
    name (``from megafusion.x import _y``) or read off an imported module (``x._y``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    modules: set[str] = set()  # local names bound to megafusion modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                target = ".".join(base[:len(base) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target != "megafusion" and not target.startswith("megafusion."):
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{name}:{node.lineno} imports {target}.{alias.name}")
                modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            modules |= {(alias.asname or alias.name).split(".")[0] for alias in node.names
                        if alias.name == "megafusion" or alias.name.startswith("megafusion.")}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in modules):
            found.append(f"{name}:{node.lineno} reads {node.value.id}.{node.attr}")
    return found


def test_no_module_imports_another_modules_private_names():
    bad = sorted(use for name, path in all_modules().items() for use in private_uses(name, path))
    assert not bad, ("a module of megafusion/ uses another's _private names; make the name public where it is "
                     "shared:\n  " + "\n  ".join(bad))


def test_private_use_finder(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from megafusion.a import _x, y\nimport megafusion.b as b\nfrom os import _exit\n"
                    "def f():\n    return b._z, y._w, b.__name__\n")
    assert private_uses("megafusion.m", path) == ["megafusion.m:1 imports megafusion.a._x",
                                                  "megafusion.m:5 reads b._z", "megafusion.m:5 reads y._w"]
