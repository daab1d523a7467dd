"""Compiles a C source of this package for the machine it runs on, keeps the library, and loads it.

A source is compiled with the machine's C compiler (``$CC``, else ``cc``/``gcc``/``clang``) for the CPU it runs
on (``-march=native``), without FMA contraction and without fast-math (a vector unit of any width then gives the
same bits: the sources fix their order of additions), with OpenMP when the compiler has it: the library then
declares ``libgomp.so.1``, which torch has already loaded, so its threads are torch's. Libraries are kept in
``$AMULET_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/amulet-serve/kernels`` (else ``~/.cache``, else the temporary
directory), named by a hash of the source, the flags, the compiler's version and the CPU's flags, so a second
start loads them at once; a library is written under another name and renamed, so concurrent starts see the
whole file or none. With no compiler, or a build that fails, :func:`load_library` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared")
"""Compiler flags: no contraction of a product and a sum into one rounding, no reassociation."""
COMPILERS = ("cc", "gcc", "clang")
KERNEL_CACHE_ENV = "AMULET_KERNEL_CACHE"
"""Names the folder the compiled libraries are kept in."""
SOURCES = Path(__file__).parent
"""Where the C sources are (shipped with the package)."""


@dataclass(frozen=True)
class Library:
    """A loaded library: its handle, its file, whether it runs OpenMP threads, and the source it was built from. A
    copy of a module holding it shares it (a loaded library is never changed); a pickled one is built again from
    its source where it is unpickled (another machine may need other instructions)."""

    handle: ctypes.CDLL
    path: Path
    threaded: bool
    compiler: str
    source: Path

    def __deepcopy__(self, memo: dict[int, object]) -> Library:
        return self

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return rebuilt_library, (self.source,)

    def function(self, name: str, restype: Any, argtypes: list[Any]) -> Any:
        """The library's function ``name``, its result and argument types declared on first use (ctypes keeps one
        function object per loaded library; a call without them would pass 64-bit values as C ints)."""
        function = getattr(self.handle, name)
        if function.argtypes is None:
            function.restype = restype
            function.argtypes = argtypes
        return function

    def describe(self) -> str:
        threads = "OpenMP threads shared with torch" if self.threaded else "one thread (the compiler has no OpenMP)"
        return f"compiled by {self.compiler} ({threads}), {self.path}"


def load_library(source: Path, cache_dir: Path | None = None, extra_flags: tuple[str, ...] = ()) -> tuple[Library | None, str]:
    """``source`` compiled for this machine, unless ``cache_dir`` (else :func:`cache_dir`) already holds it, and
    loaded; or None and why not. ``extra_flags`` go after :data:`FLAGS` (``-mno-avx2``: the code a CPU without AVX2
    runs, for the tests)."""
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler ($CC, cc, gcc or clang)"
    version = _run([compiler, "--version"]).split("\n", 1)[0]
    failures = []
    text = source.read_bytes()
    for threaded in (True, False):
        flags = (*FLAGS, *extra_flags, "-fopenmp") if threaded else (*FLAGS, *extra_flags)
        key = hashlib.sha256(b"\0".join([text, " ".join(flags).encode(), version.encode(), _cpu_flags()])).hexdigest()
        path = (cache_dir or kernel_cache_dir()) / f"{source.stem}-{key[:20]}.so"
        if not path.exists():
            error = _build(compiler, flags, source, path)
            if error:
                failures.append(error)
                continue
        try:
            handle = ctypes.CDLL(str(path))
        except OSError as exc:
            failures.append(str(exc))
            continue
        return Library(handle, path, threaded, version, source), ""
    return None, f"{source.name} did not build: " + " | ".join(failures)


def rebuilt_library(source: Path) -> Library:
    """:func:`load_library` of ``source``, or RuntimeError saying why not (an unpickled :class:`Library`)."""
    library, why = load_library(source)
    if library is None:
        raise RuntimeError(why)
    return library


def kernel_cache_dir() -> Path:
    """``$AMULET_KERNEL_CACHE``, else the first writable of ``$XDG_CACHE_HOME`` (else ``~/.cache``) and the
    temporary directory."""
    named = os.environ.get(KERNEL_CACHE_ENV)
    if named:
        return Path(named)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for root in (Path(base), Path(tempfile.gettempdir())):
        directory = root / "amulet-serve" / "kernels"
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(directory, os.W_OK):
            return directory
    return Path(tempfile.mkdtemp(prefix="amulet-kernels-"))


def _compiler() -> str | None:
    named = os.environ.get("CC")
    for name in ([named] if named else []) + list(COMPILERS):
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return done.stdout or done.stderr


def _build(compiler: str, flags: tuple[str, ...], source: Path, path: Path) -> str | None:
    """Compiles ``source`` into ``path``; the compiler's complaint, or None."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=path.parent, suffix=".so.partial")
    except OSError as exc:
        return str(exc)
    os.close(handle)
    try:
        command = [compiler, *flags, str(source), "-o", partial, "-lm"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            return (done.stderr or done.stdout).strip()[-400:] or f"{compiler} exited {done.returncode}"
        os.replace(partial, path)
        return None
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _cpu_flags() -> bytes:
    """The CPU's model and flags (``-march=native`` compiles for them)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return b""
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))][:2]
    return "\n".join(lines).encode()
