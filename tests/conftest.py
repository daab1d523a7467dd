"""Fixtures every folder may use: the embedded model's tokenizer and model, tiny random-weight models,
the fake engine behind a live server (tests/server and tests/eval), and the torch thread count restored
after each module (torch runs on one thread here: see ``pytest_configure``).

A test that uses the ``smollm`` fixture (directly or through another fixture) is marked ``smollm``
here, and one that uses ``compose`` or ``prometheus_binary`` (tests/ops: they may apt-get install
them) is marked ``system``, so the fast lane (``-m "not smollm and not system and not slow"``) never
loads the weights or installs packages even where a module forgot its mark. Tests that load the
weights another way (a server subprocess, ``AsyncEngine`` or ``amulet-eval`` on the embedded model)
carry the mark themselves.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

# Triton's interpreter runs the paged decode kernel on CPU tensors (tests/engine/test_paged_decode.py): it must be
# chosen before Triton is first imported. The suite runs on CPUs; a GPU run sets TRITON_INTERPRET=0 itself.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from amulet_core.engine.fixed_order_kernel import FixedOrderAttention, load_fixed_order_attention
from amulet_core.model.gguf_cache import MODEL_CACHE_ENV, default_model_cache
from amulet_core.model.loading import LoadedModel, ModelConfig, embedded_model_file, load_model
from amulet_core.native.build import KERNEL_CACHE_ENV
from server.app import create_app
from server.config import ServerConfig
from server.store.options import DATA_DIR_ENV
from tests.support import ENSURE_PACKAGE
from tests.support.fake_engine import FakeEngine, RecordingObserver
from tests.support.live_server import LiveServer, live_server


def pytest_configure(config: pytest.Config) -> None:
    """Torch computes on one thread in the test process unless ``OMP_NUM_THREADS`` is set.

    The machine's 2 cores are shared with the tests' own server threads and with other jobs, and torch's
    intra-op threads slow down many times over when one of them has to wait for a core at every operation
    (the fast lane took 4.5 minutes instead of about one on a machine with one busy core).
    """
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    # One converted copy of the embedded GGUF model for the whole run, in a folder of its own (never the
    # user's ~/.cache): the first load converts it, every later load (server subprocesses included, which
    # inherit the variable) reads it in about a second instead of about fifteen.
    cache = Path(tempfile.mkdtemp(prefix="amulet-test-model-cache-"))
    os.environ[MODEL_CACHE_ENV] = str(cache)
    config.add_cleanup(lambda: shutil.rmtree(cache, ignore_errors=True))
    # The C kernels are compiled once for the run, into a folder of its own.
    kernels = Path(tempfile.mkdtemp(prefix="amulet-test-kernels-"))
    os.environ[KERNEL_CACHE_ENV] = str(kernels)
    config.add_cleanup(lambda: shutil.rmtree(kernels, ignore_errors=True))
    # Stored responses of servers started from the command line go to a folder of the run's (never the user's).
    data = Path(tempfile.mkdtemp(prefix="amulet-test-data-"))
    os.environ[DATA_DIR_ENV] = str(data)
    config.add_cleanup(lambda: shutil.rmtree(data, ignore_errors=True))


FIXTURE_MARKS = {
    "smollm": "smollm",
    "compose": "system",
    "prometheus_binary": "system",
    "postgres_url": "system",
    "chromium_path": "browser",
}
"""A test that takes the fixture (even indirectly) gets the mark."""


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture in getattr(item, "fixturenames", ()):
            mark = FIXTURE_MARKS.get(fixture)
            if mark is not None and item.get_closest_marker(mark) is None:
                item.add_marker(getattr(pytest.mark, mark))


# ---------------------------------------------------------------- the embedded model and tiny models


@pytest.fixture(scope="session")
def smollm_tokenizer():
    from transformers import AutoTokenizer

    gguf = embedded_model_file()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="session")
def smollm() -> LoadedModel:
    """SmolLM2-135M-Instruct in float32 (exact comparisons need it)."""
    return load_model(ModelConfig(dtype="float32", model_cache=default_model_cache()))


@pytest.fixture(scope="session")
def tiny_model(request: pytest.FixtureRequest) -> Callable[[str], LoadedModel]:
    """Factory of tiny random-weight models of a family (llama, qwen2, mistral) with SmolLM2's tokenizer,
    on the CPU in float32 unless ``AMULET_TEST_DEVICE`` / ``AMULET_TEST_DTYPE`` say otherwise
    (``AMULET_TEST_TOKENIZER``: a saved tokenizer folder instead of the embedded model's; see tests/engine/device.py)."""
    from tests.engine.device import build_tiny_model, saved_tokenizer

    cache: dict[str, LoadedModel] = {}

    def make(family: str = "llama") -> LoadedModel:
        if family not in cache:
            tokenizer = saved_tokenizer() or request.getfixturevalue("smollm_tokenizer")
            cache[family] = build_tiny_model(family, tokenizer)
        return cache[family]

    return make


@pytest.fixture(scope="session")
def fixed_order_kernel() -> FixedOrderAttention:
    """The fixed-order attention kernel, compiled for this machine; fails (never skips) where it does not build:
    the machines the suite runs on have a C compiler, and a server there uses the kernel."""
    kernel, why = load_fixed_order_attention()
    if kernel is None:
        pytest.fail(why)
    return kernel


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    """The ``prometheus`` binary (``promtool`` is next to it), installed from Debian's package when missing.

    Skips only where it cannot be installed (no apt-get, or not root); a failed install fails.
    """
    result = subprocess.run(
        ["bash", str(ENSURE_PACKAGE), "prometheus", "prometheus"], capture_output=True, text=True, timeout=900
    )
    if result.returncode == 3:
        pytest.skip(f"Prometheus cannot be installed here: {result.stderr.strip()}")
    assert result.returncode == 0, f"installing Prometheus failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def tiny_model_folder(tiny_model: Callable[[str], LoadedModel], tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny random Llama saved as a Hugging Face folder, for ``amulet-server --model`` in a subprocess
    (it loads in a second, where the embedded model takes many: for tests about the process, not the answers)."""
    loaded = tiny_model("llama")
    folder = tmp_path_factory.mktemp("tiny-llama")
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(autouse=True, scope="module")
def _restore_torch_threads():
    """An engine serving on the CPU sets torch's (process-wide) thread count; undo it per module."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- the fake engine behind a live server
# One server per module. A module changes the engine or the config by overriding ``fake_engine`` or
# ``server_config`` (module scope); tests take ``server``, ``fake`` and ``observer``, which come reset.


@pytest.fixture(scope="module")
def fake_engine() -> FakeEngine:
    """The module's fake engine (override the fixture to build it with other arguments)."""
    return FakeEngine()


@pytest.fixture(scope="module")
def server_config() -> ServerConfig:
    """The module's server configuration (override the fixture for another)."""
    return ServerConfig()


@pytest.fixture(scope="module")
def recording_observer() -> RecordingObserver:
    return RecordingObserver()


@pytest.fixture(scope="module")
def fake_server(
    fake_engine: FakeEngine, server_config: ServerConfig, recording_observer: RecordingObserver
) -> Iterator[LiveServer]:
    """The module's live server over its fake engine, every served request recorded (for module-scoped fixtures)."""
    with live_server(create_app(fake_engine, server_config, recording_observer)) as running:
        yield running


@pytest.fixture
def fake(fake_engine: FakeEngine, recording_observer: RecordingObserver) -> FakeEngine:
    """The module's fake engine, reset (and the observer's records cleared) before the test."""
    fake_engine.reset()
    recording_observer.records.clear()
    return fake_engine


@pytest.fixture
def observer(fake: FakeEngine, recording_observer: RecordingObserver) -> RecordingObserver:
    """The records of the requests this test's server served."""
    return recording_observer


@pytest.fixture
def server(fake_server: LiveServer, fake: FakeEngine) -> LiveServer:
    """The module's live server, over its fake engine reset for the test."""
    return fake_server


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL cluster for the whole run (tests/support/postgres.py); marks its tests ``system``."""
    from tests.support.postgres import throwaway_postgres

    with throwaway_postgres() as url:
        yield url


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Debian's headless Chromium (installed when missing) for the Playwright tests; skips where it cannot be."""
    result = subprocess.run(
        ["bash", str(ENSURE_PACKAGE), "chromium", "chromium", "fonts-liberation"], capture_output=True, text=True, timeout=900
    )
    if result.returncode == 3:
        pytest.skip(f"Chromium cannot be installed here: {result.stderr.strip()}")
    assert result.returncode == 0, f"installing Chromium failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout.strip().splitlines()[-1]
