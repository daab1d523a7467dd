"""``amulet-server``'s options (:mod:`server.options`) parse everything into the frozen configs, in one place."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from amulet_core.engine.config import EngineConfig
from amulet_core.model.loading import ModelConfig, serving_cpu_threads
from server.config import ServerConfig
from server.options import build_parser, parse_args
from server.store.config import StoreConfig
from tests.support import ROOT


def test_defaults() -> None:
    configs = parse_args([], environ={"XDG_CACHE_HOME": "/xdg", "XDG_DATA_HOME": "/xdg-data"})
    assert configs.model == ModelConfig(model_cache="/xdg/amulet-serve/models")
    assert configs.engine == EngineConfig()
    assert configs.server == ServerConfig(store=StoreConfig(data_dir="/xdg-data/amulet-serve"))
    assert configs.server.host == "127.0.0.1" and configs.server.port == 8000
    assert configs.server.api_key is None and configs.server.cors_origins == ()


def test_the_model_cache_comes_from_the_option_then_the_environment() -> None:
    assert parse_args([], environ={"AMULET_MODEL_CACHE": "/env/cache"}).model.model_cache == "/env/cache"
    assert parse_args(["--model-cache", "/opt/c"], environ={"AMULET_MODEL_CACHE": "/env/cache"}).model.model_cache == "/opt/c"
    assert parse_args([], environ={"AMULET_MODEL_CACHE": "none"}).model.model_cache is None
    assert parse_args(["--model-cache", "none"], environ={}).model.model_cache is None


@pytest.mark.parametrize(
    ("argv", "omp", "threads"),
    [([], None, None), ([], "3", 3), (["--cpu-threads", "2"], "3", 2), ([], "0", None), ([], "4,2", None), ([], " ", None)],
)
def test_torch_threads_come_from_the_option_then_omp_num_threads(argv: list[str], omp: str | None, threads: int | None) -> None:
    environ = {} if omp is None else {"OMP_NUM_THREADS": omp}
    assert parse_args(argv, environ=environ).model.cpu_threads == threads


def test_without_a_count_the_server_takes_every_cpu_it_may_run_on() -> None:
    assert serving_cpu_threads(ModelConfig()) == len(os.sched_getaffinity(0))
    assert serving_cpu_threads(ModelConfig(cpu_threads=1)) == 1


def test_every_option() -> None:
    configs = parse_args(
        [
            "--model",
            "/models/qwen",
            "--served-model-name",
            "qwen",
            "--host",
            "0.0.0.0",
            "--port",
            "9001",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--max-num-seqs",
            "8",
            "--max-model-len",
            "1024",
            "--max-queue",
            "5",
            "--kv-cache-memory-gib",
            "4",
            "--max-num-batched-tokens",
            "1024",
            "--enforce-eager",
            "--no-deterministic",
            "--attention-backend",
            "sdpa",
            "--overlap-host",
            "--quantization",
            "int8",
            "--data-dir",
            "/srv/data",
            "--api-key",
            "k1",
            "--cors-origins",
            "https://a.example, https://b.example",
            "--log-level",
            "debug",
            "--max-body-bytes",
            "1000",
            "--drain-timeout",
            "2.5",
            "--default-system-prompt",
            "Be helpful.",
            "--model-cache",
            "/srv/converted",
        ],
        environ={"AMULET_API_KEY": "from-env"},
    )
    assert configs.model == ModelConfig(
        model="/models/qwen", device="cpu", dtype="float32", model_cache="/srv/converted", quantization="int8"
    )
    assert parse_args([], environ={}).model.quantization == "auto"
    assert configs.engine == EngineConfig(
        max_num_seqs=8,
        max_model_len=1024,
        max_queue=5,
        kv_cache_memory_gib=4.0,
        max_num_batched_tokens=1024,
        cuda_graphs=False,
        deterministic=False,
        attention_backend="sdpa",
        overlap_host=True,
    )
    defaults = parse_args([], environ={}).engine
    assert defaults.attention_backend == "auto"
    assert defaults.overlap_host is None and defaults.overlap_on("cuda") and not defaults.overlap_on("cpu")
    assert defaults.cuda_graphs and defaults.max_num_batched_tokens is None
    assert defaults.deterministic is None and defaults.deterministic_on("cpu") and not defaults.deterministic_on("cuda")
    assert parse_args(["--deterministic"], environ={}).engine.deterministic_on("cuda")
    assert (defaults.batched_tokens("cpu"), defaults.batched_tokens("cuda")) == (512, 4096)
    assert configs.engine.batched_tokens("cuda") == 1024
    assert configs.server == ServerConfig(
        host="0.0.0.0",
        port=9001,
        api_key="k1",
        cors_origins=("https://a.example", "https://b.example"),
        served_model_name="qwen",
        log_level="debug",
        max_body_bytes=1000,
        drain_timeout_s=2.5,
        default_system_prompt="Be helpful.",
        store=StoreConfig(data_dir="/srv/data"),
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        configs.server.port = 1  # type: ignore[misc]


def test_api_key_from_the_environment() -> None:
    assert parse_args([], environ={"AMULET_API_KEY": "sk-env"}).server.api_key == "sk-env"
    assert parse_args([], environ={"AMULET_API_KEY": ""}).server.api_key is None


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-model-len", "4"],
        ["--port", "70000"],
        ["--dtype", "int3"],
        ["--max-body-bytes", "0"],
        ["--port", "x"],
        ["--kv-cache-memory-gib", "0"],
        ["--body-read-timeout", "0"],
        ["--body-read-timeout", "nan"],
        ["--max-connections", "-1"],
    ],
)
def test_bad_values_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(argv, environ={})
    assert exited.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_api_key_file_keys_and_precedence(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# comment\n\n  sk-one  \nsk-two\nsk-one\n")
    server = parse_args(["--api-key-file", str(keys)], environ={"AMULET_API_KEY": "sk-env"}).server
    assert server.api_keys == ("sk-one", "sk-two")  # the command line beats the environment; duplicates dropped
    assert "sk-one" not in repr(server) and "sk-two" not in repr(server)
    assert parse_args([], environ={"AMULET_API_KEY_FILE": str(keys)}).server.api_keys == ("sk-one", "sk-two")
    both = parse_args(["--api-key", "sk-cli", "--api-key-file", str(keys)], environ={}).server
    assert both.api_keys == ("sk-cli", "sk-one", "sk-two")
    assert parse_args([], environ={"AMULET_API_KEY_FILE": ""}).server.api_keys == ()


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n"])
def test_an_empty_or_missing_api_key_file_is_a_usage_error(tmp_path: Path, content: str) -> None:
    keys = tmp_path / "keys"
    keys.write_text(content)
    with pytest.raises(SystemExit) as empty:
        parse_args(["--api-key-file", str(keys)], environ={})
    with pytest.raises(SystemExit) as missing:
        parse_args([], environ={"AMULET_API_KEY_FILE": str(tmp_path / "absent")})
    assert empty.value.code == missing.value.code == 2


def test_wait_for_model() -> None:
    assert parse_args([], environ={}).wait_for_model is False
    assert parse_args(["--wait-for-model"], environ={}).wait_for_model is True


def test_the_help_names_the_ray_hand_over_and_no_ray_option() -> None:
    text = build_parser().format_help()
    assert "--ray " in text and "amulet-ray" in text
    assert "--ray-replicas" not in text and "--ray-routing" not in text  # the --ray-* options are amulet-ray's


def test_the_access_options() -> None:
    defaults = parse_args([], environ={}).server
    assert (defaults.allowed_hosts, defaults.docs, defaults.allow_open_api) == ((), False, False)
    assert (defaults.max_connections, defaults.body_read_timeout_s) == (512, 60.0)
    server = parse_args(
        ["--allowed-hosts", "api.example, *.corp.example,", "--docs", "--body-read-timeout", "5", "--max-connections", "64"],
        environ={},
    ).server
    assert server.allowed_hosts == ("api.example", "*.corp.example") and server.docs
    assert (server.body_read_timeout_s, server.max_connections) == (5.0, 64)
    assert parse_args(["--max-connections", "0"], environ={}).server.max_connections is None  # no limit


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "box.lan"])
def test_an_api_without_a_key_on_an_address_others_reach_is_refused(host: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        parse_args(["--host", host], environ={})
    assert refused.value.code == 2
    message = capsys.readouterr().err
    assert "refusing to serve the API without a key" in message and "--allow-open-api" in message
    assert "AMULET_API_KEY" in message and "--api-key-file" in message
    assert parse_args(["--host", host, "--allow-open-api"], environ={}).server.allow_open_api
    assert parse_args(["--host", host], environ={"AMULET_API_KEY": "sk-k"}).server.api_keys == ("sk-k",)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_needs_no_key(host: str) -> None:
    assert parse_args(["--host", host], environ={}).server.api_keys == ()


def test_amulet_server_stops_at_once_with_the_reason() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("AMULET_API_KEY", "AMULET_API_KEY_FILE")}
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "--host", "0.0.0.0", "--port", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert "refusing to serve the API without a key on --host 0.0.0.0" in done.stderr
