"""Imports point one way: the core under the engine under the server; evaluation and benchmarks on top.

* ``amulet_core`` outside ``amulet_core/engine/`` (methods, prompts, sampling, loading, errors, ...)
  imports nothing from ``amulet_core.engine``, ``server``, ``amulet_eval`` or ``benchmarks``;
* ``amulet_core/engine/`` imports nothing from ``server``, ``amulet_eval`` or ``benchmarks``;
* ``server/`` imports nothing from ``amulet_eval`` or ``benchmarks``;
* ``amulet_eval/`` imports nothing from ``server`` or ``benchmarks``: it uses the core, and the HTTP
  API like any other client.

Every ``.py`` file of the product packages is parsed with ``ast``: every ``import`` and
``from ... import`` counts, wherever it stands (inside functions, ``if TYPE_CHECKING:`` blocks,
``try`` blocks), relative imports are resolved against the file's package, and so are
``importlib.import_module`` / ``__import__`` calls with a literal module name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import ROOT

PRODUCT_PACKAGES = ("amulet_core", "server", "amulet_eval", "benchmarks")


def forbidden_for(module: str) -> tuple[str, ...]:
    """The packages ``module`` (a dotted name) must not import from."""
    if module == "amulet_core.engine" or module.startswith("amulet_core.engine."):
        return ("server", "amulet_eval", "benchmarks")
    if module == "amulet_core" or module.startswith("amulet_core."):
        return ("amulet_core.engine", "server", "amulet_eval", "benchmarks")
    if module == "server" or module.startswith("server."):
        return ("amulet_eval", "benchmarks")
    if module == "amulet_eval" or module.startswith("amulet_eval."):
        return ("server", "benchmarks")
    return ()


def module_name(path: Path) -> tuple[str, bool]:
    """The dotted module name of a file relative to the repository root, and whether it is a package's ``__init__``."""
    parts = list(path.with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a ``from ... import`` names (relative ones resolved against the file's package)."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    up = node.level - 1
    if up > len(package) - 1:
        raise ImportError(f"relative import beyond the top-level package in {module}")
    base = package[: len(package) - up]
    return ".".join(base + ([node.module] if node.module else []))


def imported_names(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Every module an import node may load: for ``from m import a``, both ``m`` and ``m.a`` (``a`` may be a submodule)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        source = _resolve(node, module, is_package)
        return [source] + [f"{source}.{alias.name}" for alias in node.names if alias.name != "*"]
    if isinstance(node, ast.Call) and node.args:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        first = node.args[0]
        if name in ("import_module", "__import__") and isinstance(first, ast.Constant) and isinstance(first.value, str):
            return [first.value]
    return []


def _hits(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(path: Path, source: str) -> list[str]:
    """The wrong-way imports of one file (``path`` relative to the repository root), as ``file:line: import``."""
    module, is_package = module_name(path)
    forbidden = forbidden_for(module)
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        try:
            names = imported_names(node, module, is_package)
        except ImportError as exc:
            line = getattr(node, "lineno", 0)
            found.append((line, f"{path}:{line}: `{ast.unparse(node)}` ({exc})"))
            continue
        bad = sorted({p for name in names for p in forbidden if _hits(name, p)})
        if bad:
            found.append(
                (node.lineno, f"{path}:{node.lineno}: `{ast.unparse(node)}` ({module} must not import {', '.join(bad)})")
            )
    return [text for _, text in sorted(found)]


def product_files() -> list[Path]:
    return sorted(p.relative_to(ROOT) for package in PRODUCT_PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_no_wrong_way_imports() -> None:
    files = product_files()
    for package in PRODUCT_PACKAGES:  # the walk found each package (a moved folder must not pass vacuously)
        assert any(f.parts[0] == package for f in files), f"no .py file found under {package}/"
    assert Path("amulet_core/engine/scheduler.py") in files and Path("server/app.py") in files
    found = [v for f in files for v in violations(f, (ROOT / f).read_text(encoding="utf-8"))]
    assert not found, "wrong-way imports:\n" + "\n".join(found)


# ---------------------------------------------------------------- the checker itself

WRONG = """\
from typing import TYPE_CHECKING

import amulet_eval.cli as evaluation
from .engine import scheduler
from . import engine
from amulet_core.engine.protocol import GenerationRequest

if TYPE_CHECKING:
    from server.app import create_app


def later():
    from benchmarks import load
    import importlib

    return importlib.import_module("server.cli")
"""

RIGHT = """\
from . import prompts
from .errors import ModelLoadError
from amulet_core.method.settings import Method
import amulet_core_extras
import serverless


def later():
    from .sampling_params import SamplingParams
"""


def test_the_checker_finds_every_kind_of_wrong_way_import() -> None:
    found = violations(Path("amulet_core/methods.py"), WRONG)
    lines = [int(v.split(":")[1]) for v in found]
    assert lines == [3, 4, 5, 6, 9, 13, 16], found
    assert found[0].startswith("amulet_core/methods.py:3: `import amulet_eval.cli as evaluation`")
    assert "must not import amulet_core.engine" in found[1]  # ``from .engine`` resolved to amulet_core.engine
    assert "amulet_core.engine" in found[2]  # ``from . import engine``: the name is a submodule
    assert "server" in found[4] and "benchmarks" in found[5] and "server" in found[6]


def test_the_checker_passes_right_way_imports() -> None:
    assert violations(Path("amulet_core/methods.py"), RIGHT) == []
    # The engine may import the core, the server both, the evaluation the core.
    assert violations(Path("amulet_core/engine/scheduler.py"), "from ..methods import Method\nfrom . import sequence\n") == []
    assert violations(Path("server/app.py"), "from amulet_core.engine import protocol\nfrom .errors import x\n") == []
    assert (
        violations(
            Path("amulet_eval/judge.py"), "from amulet_core.method.preference_prompts import PRESETS\nfrom .store import x\n"
        )
        == []
    )
    assert violations(Path("benchmarks/load.py"), "from server.cli import main\nfrom amulet_eval import cli\n") == []


@pytest.mark.parametrize(
    ("path", "source", "forbidden"),
    [
        ("amulet_core/engine/llm_engine.py", "from ...server import app\n", None),  # beyond the top level
        ("amulet_core/engine/llm_engine.py", "from server.observer import RequestRecord\n", "server"),
        ("amulet_core/engine/__init__.py", "from server import app\n", "server"),
        ("amulet_core/__init__.py", "from .engine.async_engine import AsyncEngine\n", "amulet_core.engine"),
        ("server/serving_chat.py", "from amulet_eval.judge import parse_verdict\n", "amulet_eval"),
        ("server/__init__.py", "from benchmarks.load import run_load\n", "benchmarks"),
        ("amulet_eval/runner_http.py", "from server.protocol import ChatRequest\n", "server"),
        ("amulet_eval/runner_http.py", "from benchmarks import engine\n", "benchmarks"),
    ],
)
def test_each_rule(path: str, source: str, forbidden: str | None) -> None:
    found = violations(Path(path), source)
    assert len(found) == 1, found
    assert f"{path}:1:" in found[0]
    if forbidden is not None:
        assert f"must not import {forbidden}" in found[0]
