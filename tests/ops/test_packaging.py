"""Reproducible installs: the lock files pin what pyproject.toml asks for, the serving set stays lean,
and make and the Dockerfile install the locks."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from amulet_eval import entry

ROOT = Path(__file__).resolve().parents[2]
EVAL_LIBRARIES = {"matplotlib", "textstat", "vadersentiment", "choix"}
"""The evaluation's own libraries (tqdm is not one: transformers needs it too)."""


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pins(lock: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / lock).read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9._-]+)==(\S+)", line)
        if match:
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_serving_lock_pins_every_runtime_dependency_but_torch_and_no_evaluation_library() -> None:
    pins = _pins("requirements.lock")
    wanted = {_name(r) for r in _project()["dependencies"]} - {"torch"}
    assert wanted <= set(pins), f"not in requirements.lock (run `make lock`): {sorted(wanted - set(pins))}"
    assert "torch" not in pins  # the Makefile's TORCH_SPEC picks the CPU or CUDA build
    assert not EVAL_LIBRARIES & set(pins)
    assert not EVAL_LIBRARIES & {_name(r) for r in _project()["dependencies"]}


def test_the_dev_lock_pins_the_extras_at_the_serving_locks_versions() -> None:
    serve, dev = _pins("requirements.lock"), _pins("requirements-dev.lock")
    extras = _project()["optional-dependencies"]
    wanted = {_name(r) for name in ("eval", "test") for r in extras[name]}
    assert wanted <= set(dev), f"not in requirements-dev.lock (run `make lock`): {sorted(wanted - set(dev))}"
    assert set(dev) >= EVAL_LIBRARIES
    differ = {k: (v, dev[k]) for k, v in serve.items() if k in dev and dev[k] != v}
    assert not differ, f"the two locks disagree: {differ}"


def test_make_and_the_dockerfile_install_the_locks() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "-r requirements.lock" in makefile and "-r requirements-dev.lock" in makefile
    assert re.search(r"^lock:", makefile, re.M) and "uv pip compile" in makefile
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install -r requirements.lock" in dockerfile
    assert "amulet_eval" not in dockerfile  # the image serves; it does not carry the evaluation app


def test_the_license_file_matches_pyproject() -> None:
    project = _project()
    assert project["license"] == "MIT" and "LICENSE" in project["license-files"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_amulet_eval_without_its_extra_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = entry.importlib.util.find_spec
    monkeypatch.setattr(entry.importlib.util, "find_spec", lambda name: None if name == "choix" else real(name))
    assert entry.main(["--help"]) == 2
    err = capsys.readouterr().err
    assert "missing: choix" in err and "amulet-serve[eval]" in err


def test_the_wheel_carries_the_playground_files(tmp_path: Path) -> None:
    """The page's static files are package data: a built wheel serves the playground too."""
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("amulet_serve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"server/static/{path.name}" for path in (ROOT / "server" / "static").iterdir()}
    assert expected and expected <= names
    # Ray's package ships too, with its own console script.
    assert {"amulet_ray/__init__.py", "amulet_ray/cli.py", "server/options.py"} <= names
    (entry_points,) = (name for name in names if name.endswith(".dist-info/entry_points.txt"))
    assert "amulet-ray = amulet_ray.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
