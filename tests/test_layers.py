"""Imports point one way: the core under the engine under the server under Ray; evaluation and benchmarks on top.

* ``amulet_core`` imports nothing from ``server``, ``amulet_ray``, ``amulet_eval`` or ``benchmarks``, and
  outside ``amulet_core/engine/`` nothing from ``amulet_core.engine``. Within the core, by sub-package:

  * ``amulet_core.method`` (the decoding methods' maths) imports no ``grammar``, ``sampling``, ``model``;
  * ``amulet_core.model`` (loading, chat templates) imports no ``method``, ``sampling``, ``grammar``;
  * ``amulet_core.grammar`` imports no ``method``, ``sampling``, ``model``;
  * ``amulet_core.native`` (the C kernels' build) imports no other part of the core;
  * ``amulet_core.sampling`` may use a grammar's spec and masks (``grammar.spec``, ``grammar.masks``) but not
    its compiler (``grammar.compiler``, llguidance: the engine compiles);
  * ``amulet_core/engine/`` may import all of the core;

* ``server/`` imports nothing from ``amulet_ray``, ``amulet_eval`` or ``benchmarks``; the one exception
  (:data:`LAZY_EXCEPTION`) is ``server.cli.main`` importing ``amulet_ray.cli`` inside the function, to hand
  an ``amulet-server --ray`` command line over to ``amulet-ray``;
* ``amulet_ray/`` (Ray Serve replicas of the server) imports the server and the core, nothing from
  ``amulet_eval`` or ``benchmarks``;
* ``amulet_eval/`` imports nothing from ``server``, ``amulet_ray`` or ``benchmarks``: it uses the core, and
  the HTTP API like any other client.

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

PRODUCT_PACKAGES = ("amulet_core", "server", "amulet_ray", "amulet_eval", "benchmarks")
ABOVE_THE_CORE = ("server", "amulet_ray", "amulet_eval", "benchmarks")
CORE_RULES = {  # sub-package of the core -> the parts of the core it must not import (first match wins)
    "amulet_core.engine": (),
    "amulet_core.method": ("amulet_core.engine", "amulet_core.grammar", "amulet_core.sampling", "amulet_core.model"),
    "amulet_core.model": ("amulet_core.engine", "amulet_core.method", "amulet_core.sampling", "amulet_core.grammar"),
    "amulet_core.grammar": ("amulet_core.engine", "amulet_core.method", "amulet_core.sampling", "amulet_core.model"),
    "amulet_core.sampling": ("amulet_core.engine", "amulet_core.grammar.compiler"),
    "amulet_core.native": (
        "amulet_core.engine",
        "amulet_core.method",
        "amulet_core.grammar",
        "amulet_core.sampling",
        "amulet_core.model",
    ),
    "amulet_core": ("amulet_core.engine",),
}
LAZY_EXCEPTION = ("server.cli", "amulet_ray.cli")
"""The one upward import of the server: ``server.cli`` may import ``amulet_ray.cli`` inside a function (``main``
hands a ``--ray`` command line to ``amulet-ray``), never at module level, so ``server`` loads no ``amulet_ray``."""


def forbidden_for(module: str) -> tuple[str, ...]:
    """The packages ``module`` (a dotted name) must not import from."""
    for package, inside in CORE_RULES.items():
        if _hits(module, package):
            return inside + ABOVE_THE_CORE
    if _hits(module, "server"):
        return ("amulet_ray", "amulet_eval", "benchmarks")
    if _hits(module, "amulet_ray"):
        return ("amulet_eval", "benchmarks")
    if _hits(module, "amulet_eval"):
        return ("server", "amulet_ray", "benchmarks")
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


def _inside_functions(tree: ast.AST) -> set[int]:
    """The ids of every node within a function's body (imports there run only when the function is called)."""
    functions = (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))
    return {id(node) for function in functions for statement in function.body for node in ast.walk(statement)}


def _excepted(module: str, name: str, lazy: bool) -> bool:
    importer, imported = LAZY_EXCEPTION
    return lazy and module == importer and _hits(name, imported)


def violations(path: Path, source: str) -> list[str]:
    """The wrong-way imports of one file (``path`` relative to the repository root), as ``file:line: import``."""
    module, is_package = module_name(path)
    forbidden = forbidden_for(module)
    found: list[tuple[int, str]] = []
    tree = ast.parse(source, filename=str(path))
    lazy = _inside_functions(tree)
    for node in ast.walk(tree):
        try:
            names = imported_names(node, module, is_package)
        except ImportError as exc:
            line = getattr(node, "lineno", 0)
            found.append((line, f"{path}:{line}: `{ast.unparse(node)}` ({exc})"))
            continue
        bad = sorted({p for name in names for p in forbidden if _hits(name, p) and not _excepted(module, name, id(node) in lazy)})
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
    assert Path("amulet_ray/cli.py") in files and Path("amulet_core/grammar/compiler.py") in files
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
    assert violations(Path("benchmarks/ray_replicas.py"), "from amulet_ray.application import build_application\n") == []
    # Ray's package on top of the server and the core.
    ray_source = "from server.assembly import build_app\nfrom amulet_core.engine import protocol\nfrom .config import x\n"
    assert violations(Path("amulet_ray/deployments.py"), ray_source) == []
    # Within the core: sampling uses a grammar's spec and masks; the engine uses every sub-package.
    sampling = "from amulet_core.grammar.spec import GrammarSpec\nfrom ..grammar.masks import TokenMasks\nfrom . import params\n"
    assert violations(Path("amulet_core/sampling/sampler.py"), sampling) == []
    engine = "from ..grammar.compiler import compile_grammar\nfrom amulet_core.method import rows\nfrom ..model import loading\n"
    assert violations(Path("amulet_core/engine/llm_engine.py"), engine) == []
    assert violations(Path("amulet_core/method/rows.py"), "from amulet_core.errors import InvalidParameterError\n") == []


LAZY_HAND_OVER = """\
def main(argv):
    if ray_requested(argv):
        from amulet_ray.cli import main as ray_main

        ray_main(argv)
"""


def test_the_server_imports_amulet_ray_only_in_the_cli_s_lazy_hand_over() -> None:
    assert violations(Path("server/cli.py"), LAZY_HAND_OVER) == []
    for path, source, line in [
        ("server/cli.py", "from amulet_ray.cli import main\n", 1),  # at module level: loaded with the server
        ("server/cli.py", "if True:\n    import amulet_ray.cli\n", 2),
        ("server/cli.py", LAZY_HAND_OVER.replace("amulet_ray.cli", "amulet_ray.launcher"), 3),  # another module
        ("server/assembly.py", LAZY_HAND_OVER, 3),  # another importer
    ]:
        found = violations(Path(path), source)
        assert len(found) == 1 and f"{path}:{line}:" in found[0] and "must not import amulet_ray" in found[0], found


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
        ("amulet_eval/entry.py", "from amulet_ray.config import parse_args\n", "amulet_ray"),
        ("amulet_core/errors.py", "from amulet_ray import config\n", "amulet_ray"),
        ("amulet_core/engine/async_engine.py", "import amulet_ray.prefix\n", "amulet_ray"),
        ("server/app.py", "from amulet_ray.config import RayServeConfig\n", "amulet_ray"),
        ("server/cli.py", "from amulet_ray.cli import main\n", "amulet_ray"),  # module level: not the lazy exception
        ("amulet_ray/application.py", "from amulet_eval.judge import parse_verdict\n", "amulet_eval"),
        ("amulet_ray/cli.py", "from benchmarks import load\n", "benchmarks"),
        # the core's sub-packages
        ("amulet_core/method/rows.py", "from amulet_core.grammar.masks import TokenMasks\n", "amulet_core.grammar"),
        ("amulet_core/method/settings.py", "from ..engine.protocol import GenerationRequest\n", "amulet_core.engine"),
        ("amulet_core/method/reference.py", "from amulet_core.sampling.sampler import sample\n", "amulet_core.sampling"),
        ("amulet_core/method/__init__.py", "from ..model import loading\n", "amulet_core.model"),
        ("amulet_core/model/loading.py", "from amulet_core.engine.config import EngineConfig\n", "amulet_core.engine"),
        ("amulet_core/model/chat_template.py", "from ..method import preference_prompts\n", "amulet_core.method"),
        ("amulet_core/model/loading.py", "import amulet_core.sampling.params\n", "amulet_core.sampling"),
        ("amulet_core/model/gguf_cache.py", "from amulet_core.grammar.spec import GrammarSpec\n", "amulet_core.grammar"),
        ("amulet_core/sampling/params.py", "from amulet_core.grammar.compiler import compile\n", "amulet_core.grammar.compiler"),
        ("amulet_core/sampling/sampler.py", "from ..grammar import compiler\n", "amulet_core.grammar.compiler"),
        ("amulet_core/sampling/processors.py", "from amulet_core.engine import sequence\n", "amulet_core.engine"),
        ("amulet_core/grammar/masks.py", "from amulet_core.sampling.params import SamplingParams\n", "amulet_core.sampling"),
        ("amulet_core/grammar/compiler.py", "from amulet_core.method.settings import Method\n", "amulet_core.method"),
        ("amulet_core/grammar/spec.py", "from amulet_core.model.loading import ModelConfig\n", "amulet_core.model"),
        ("amulet_core/grammar/__init__.py", "from ..engine import protocol\n", "amulet_core.engine"),
    ],
)
def test_each_rule(path: str, source: str, forbidden: str | None) -> None:
    found = violations(Path(path), source)
    assert len(found) == 1, found
    assert f"{path}:1:" in found[0]
    if forbidden is not None:
        assert f"must not import {forbidden}" in found[0]
