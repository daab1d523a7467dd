"""No import circle anywhere in the product: its module graph has no strongly connected component of two or more.

Every ``.py`` file of the product packages is a module, a package being its ``__init__.py`` named by its dotted
name (``server``, ``amulet_core.grammar``). Each import a module makes of another module of the product is an
edge, read with ``ast`` as ``tests/test_layers.py`` reads them (:func:`~tests.test_layers.imported_names`):
wherever it stands (inside functions, ``if TYPE_CHECKING:`` blocks, ``try`` blocks), relative ones resolved.
``from m import a`` is an import of the module ``m.a`` when ``m.a`` is a module file of the product, else of
``m``; so a package whose ``__init__.py`` imports a submodule that imports the package back is a circle.
Circles are found with Tarjan's algorithm and reported with the imports that close them.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

from tests.support import ROOT
from tests.test_layers import PRODUCT_PACKAGES, imported_names, module_name, product_files

Graph = Mapping[str, Mapping[str, str]]
"""Module -> the modules it imports, each with where it first does (``file:line``)."""


def imports_of(path: Path, source: str, modules: Iterable[str]) -> dict[str, str]:
    """The product modules that the module in ``path`` (relative to the repository root) imports, with where."""
    module, is_package = module_name(path)
    known = set(modules)
    found: dict[str, str] = {}
    for node in ast.walk(ast.parse(source, filename=str(path))):
        names = imported_names(node, module, is_package)
        if isinstance(node, ast.ImportFrom):  # [m, m.a, m.b, ...]: m.a where it is a module, else m
            source_module, members = names[0], names[1:]
            names = [name if name in known else source_module for name in members] or [source_module]
        for name in names:
            if name in known and name != module:
                found.setdefault(name, f"{path}:{node.lineno}")
    return found


def import_graph(sources: Mapping[Path, str]) -> dict[str, dict[str, str]]:
    """The import graph of the modules whose sources are given (by path relative to the repository root)."""
    modules = {module_name(path)[0] for path in sources}
    return {module_name(path)[0]: imports_of(path, source, modules) for path, source in sources.items()}


def circles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm), each sorted, in order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def describe(circle: list[str], graph: Graph) -> str:
    """One circle: its modules, then each import between two of them."""
    members = set(circle)
    edges = [
        f"    {module} -> {target}  ({where})"
        for module in circle
        for target, where in sorted(graph.get(module, {}).items())
        if target in members
    ]
    return "\n".join([f"  {', '.join(circle)}:", *edges])


def test_the_product_has_no_import_circle() -> None:
    files = product_files()
    for package in PRODUCT_PACKAGES:  # the walk found each package (a moved folder must not pass vacuously)
        assert any(f.parts[0] == package for f in files), f"no .py file found under {package}/"
    graph = import_graph({path: (ROOT / path).read_text(encoding="utf-8") for path in files})
    assert "amulet_ray.cli" in graph["server.cli"]  # the lazy hand-over counts: a circle through it would show
    found = circles(graph)
    assert not found, f"{len(found)} import circle(s):\n" + "\n".join(describe(c, graph) for c in found)


# ---------------------------------------------------------------- the checker itself


def test_tarjan_finds_every_circle_and_passes_a_dag() -> None:
    assert circles({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a"}}) == []
    assert circles({"a": {"a"}}) == []  # a module importing itself is no circle of modules
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": {"a"}, "g": set()}
    assert circles(graph) == [["a", "b", "c"], ["d", "e"]]
    assert circles({"x": {"y"}, "y": {"z"}}) == []  # targets without an entry of their own


def graph_of(files: dict[str, str]) -> dict[str, dict[str, str]]:
    return import_graph({Path(path): source for path, source in files.items()})


def test_edges_resolve_packages_submodules_and_relative_imports() -> None:
    graph = graph_of(
        {
            "pkg/__init__.py": "from .sub import helper\n",
            "pkg/sub.py": "from pkg import other, VALUE\nimport os\n",
            "pkg/other.py": "from . import deep\nfrom .deep import leaf\n",
            "pkg/deep/__init__.py": "",
            "pkg/deep/leaf.py": "def f():\n    from .. import sub\n",
        }
    )
    assert graph["pkg"] == {"pkg.sub": "pkg/__init__.py:1"}
    # ``other`` is a module; ``VALUE`` is not, so it is an import of the package; ``os`` is not the product's.
    assert set(graph["pkg.sub"]) == {"pkg.other", "pkg"}
    assert set(graph["pkg.other"]) == {"pkg.deep", "pkg.deep.leaf"}
    assert graph["pkg.deep.leaf"] == {"pkg.sub": "pkg/deep/leaf.py:2"}  # inside a function too
    # pkg <-> pkg.sub, and pkg.sub -> pkg.other -> pkg.deep.leaf -> pkg.sub: one component.
    assert circles(graph) == [["pkg", "pkg.deep.leaf", "pkg.other", "pkg.sub"]]


def test_a_package_and_its_submodule_importing_it_back_is_a_circle_and_lazy_imports_count() -> None:
    package_circle = {"pkg/__init__.py": "from pkg import sub\n", "pkg/sub.py": "import pkg\n"}
    assert circles(graph_of(package_circle)) == [["pkg", "pkg.sub"]]
    lazy = {
        "a/__init__.py": "",
        "a/one.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from a.two import T\n",
        "a/two.py": "def f():\n    import a.one\n",
    }
    graph = graph_of(lazy)
    assert circles(graph) == [["a.one", "a.two"]]
    assert describe(["a.one", "a.two"], graph) == (
        "  a.one, a.two:\n    a.one -> a.two  (a/one.py:3)\n    a.two -> a.one  (a/two.py:2)"
    )
    # The same modules without the way back: no circle.
    assert circles(graph_of({**lazy, "a/two.py": "def f():\n    import a\n"})) == []
