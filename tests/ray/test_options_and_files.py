"""``amulet-ray`` options, the deployment options derived from them, and the shipped files, without a cluster.

* The ``--ray*`` options parse into :class:`RayServeConfig` (bad values are usage errors, status 2), the
  server's own into the :class:`~server.options.Configs` every replica gets; ``amulet-server`` parses no
  ``--ray*`` option and hands a ``--ray`` command line over to ``amulet-ray``. Without ``--ray`` the server
  neither needs nor imports Ray (nor ``amulet_ray``), and with ``--ray`` (or ``amulet-ray``) but no Ray
  installed it says how to install it (status 2).
* One GPU per replica where the cluster has GPUs, a CPU replica reserving its torch threads otherwise;
  autoscaling between ``--ray-replicas`` and ``--ray-max-replicas``; the drain timeout as Ray's graceful
  shutdown budget; the prefix-affinity router.
* ``docker/ray-serve.yaml`` and the RayService manifest are valid Serve configs of this application;
  ``docker/prometheus-ray.yml`` is a valid Prometheus config scraping the replicas' default ports.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from amulet_ray.config import RayServeConfig, parse_args
from amulet_ray.prefix import prefix_chain
from server import options
from tests.support import ROOT

pytestmark = pytest.mark.ray

DOCKER = ROOT / "docker"


def test_ray_options_parse_into_the_ray_config() -> None:
    assert parse_args([], environ={}).ray == RayServeConfig()
    assert parse_args(["--ray"], environ={}) == parse_args([], environ={})  # implied, accepted for amulet-server --ray
    configs = parse_args(
        ["--ray-replicas", "2", "--ray-max-replicas", "4", "--ray-routing", "pow2", "--ray-num-gpus", "0.5", "--port", "9"],
        environ={},
    )
    assert configs.ray == RayServeConfig(replicas=2, max_replicas=4, routing="pow2", num_gpus=0.5)
    assert configs.ray.autoscaling and not RayServeConfig(replicas=2, max_replicas=2).autoscaling
    assert configs.app == options.parse_args(["--port", "9"], environ={})  # every server option, parsed by the server


def test_the_server_parses_no_ray_option_and_hands_ray_command_lines_over() -> None:
    assert options.ray_requested(["--ray", "--ray-replicas", "2"]) and options.ray_requested(["--port", "1", "--ra"])
    assert not options.ray_requested([]) and not options.ray_requested(["--ray-replicas", "2", "--help"])
    assert not hasattr(options.parse_args([], environ={}), "ray")


@pytest.mark.parametrize(
    ("argv", "message"), [(["--ray-replicas", "2"], "are amulet-ray's: add --ray"), (["--ray"], "--ray is amulet-ray's")]
)
def test_ray_options_are_usage_errors_of_the_server(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        options.parse_args(argv, environ={})
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ray-replicas", "0"], "--ray-replicas must be at least 1"),
        (["--ray-replicas", "3", "--ray-max-replicas", "2"], "must be at least --ray-replicas"),
        (["--ray-target-ongoing-requests", "0"], "--ray-target-ongoing-requests must be above 0"),
        (["--ray-num-gpus", "-1"], "--ray-num-gpus must be 0 or more"),
        (["--ray-metrics-port", "70000"], "--ray-metrics-port must be a TCP port"),
        (["--ray-routing", "random"], "invalid choice"),
    ],
)
def test_bad_ray_options_are_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv, environ={})
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


def test_without_ray_the_server_imports_no_ray_and_with_ray_missing_it_says_how_to_install_it() -> None:
    code = (
        "import sys, server.cli as c, server.options as o; o.parse_args([]); o.build_parser();"
        "print(any(m == 'amulet_ray' or m.startswith('amulet_ray.') for m in sys.modules), end=' ');"
        "import amulet_ray.cli; from amulet_ray.prefix import prefix_chain;"
        "print('ray' in sys.modules, list(prefix_chain(range(64), 16)), flush=True);"
        "sys.modules['ray'] = None; c.main(['--ray'])"  # as if Ray were not installed
    )
    result = run_python(code)
    amulet_ray_imported, ray_imported, chain = result.stdout.strip().split(" ", 2)
    assert amulet_ray_imported == "False" and ray_imported == "False", result.stderr[-2000:]
    # The routing key's hashes are the same in another process (BLAKE2b, not Python's salted hash).
    assert json.loads(chain) == list(prefix_chain(range(64), 16))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "pip install '.[ray]'" in result.stderr
    direct = run_python("import sys, amulet_ray.cli; sys.modules['ray'] = None; amulet_ray.cli.main([])")
    assert direct.returncode == 2 and "pip install '.[ray]'" in direct.stderr, direct.stderr[-2000:]


def test_replicas_get_a_gpu_where_the_cluster_has_gpus_and_cpu_threads_elsewhere() -> None:
    from amulet_ray.application import replica_resources

    def resources(argv: list[str], gpus: float) -> dict[str, float]:
        return replica_resources(parse_args(argv), gpus)

    assert resources([], 4) == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert resources([], 0) == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert resources(["--cpu-threads", "3"], 0) == {"num_cpus": 3.0, "num_gpus": 0.0}
    assert resources(["--device", "cpu", "--cpu-threads", "2"], 4) == {"num_cpus": 2.0, "num_gpus": 0.0}
    assert resources(["--ray-num-gpus", "0.5", "--ray-num-cpus", "4"], 0) == {"num_cpus": 4.0, "num_gpus": 0.5}


def test_a_cpu_replica_runs_the_torch_threads_it_reserves() -> None:
    from amulet_ray.application import replica_app_configs

    def threads(argv: list[str], actor_options: dict[str, float]) -> int | None:
        return replica_app_configs(parse_args(argv), actor_options).model.cpu_threads

    assert threads([], {"num_cpus": 3.0, "num_gpus": 0.0}) == 3  # not every CPU of its node
    assert threads([], {"num_cpus": 0.5, "num_gpus": 0.0}) == 1
    assert threads(["--cpu-threads", "2"], {"num_cpus": 4.0, "num_gpus": 0.0}) == 2
    assert threads([], {"num_cpus": 1.0, "num_gpus": 1.0}) is None  # a GPU replica: torch's threads untouched


def test_the_replica_deployment_autoscales_drains_and_routes_by_prefix() -> None:
    from ray.serve.request_router import RequestRouter

    from amulet_ray.application import ROUTER_CLASS, replica_options

    configs = parse_args(["--ray-replicas", "2", "--ray-max-replicas", "5", "--drain-timeout", "12", "--max-num-seqs", "24"])
    options = replica_options(configs, 0)
    assert options["autoscaling_config"] == {
        "min_replicas": 2,
        "initial_replicas": 2,
        "max_replicas": 5,
        "target_ongoing_requests": 8.0,
        "upscale_delay_s": 30.0,
        "downscale_delay_s": 600.0,
    }
    assert "num_replicas" not in options and options["max_ongoing_requests"] == 24
    assert options["graceful_shutdown_timeout_s"] > 12
    assert options["request_router_config"]["request_router_kwargs"] == {"max_imbalance": 8}
    module, name = ROUTER_CLASS.split(":")
    assert issubclass(getattr(importlib.import_module(module), name), RequestRouter)
    assert replica_options(parse_args(["--ray-replicas", "3"]), 0)["num_replicas"] == 3


def serve_apps(config: dict[str, Any]) -> list[Any]:
    from ray.serve.schema import ServeDeploySchema

    return list(ServeDeploySchema.model_validate(config).applications)


def test_the_shipped_serve_config_is_valid_and_builds_the_application_with_a_key_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ray.serve.deployment import Application

    from amulet_ray.application import app_builder

    (app,) = serve_apps(yaml.safe_load((DOCKER / "ray-serve.yaml").read_text()))
    assert app.import_path == "amulet_ray.application:app_builder" and app.route_prefix == "/"
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {"AmuletReplica", "AmuletIngress"}
    scaling = deployments["AmuletReplica"].autoscaling_config
    assert scaling["min_replicas"] < scaling["max_replicas"]
    monkeypatch.delenv("AMULET_API_KEY", raising=False)
    monkeypatch.delenv("AMULET_API_KEY_FILE", raising=False)
    with pytest.raises(SystemExit) as refused:  # --host 0.0.0.0 without a key: closed by default
        app_builder(app.args)
    assert refused.value.code == 2 and "--allow-open-api" in capsys.readouterr().err
    monkeypatch.setenv("AMULET_API_KEY", "sk-serve-config")
    assert isinstance(app_builder(app.args), Application)
    with pytest.raises(ValueError):
        app_builder({"argv": "--ray-replicas 2"})


def test_amulet_ray_refuses_an_open_api_on_every_interface(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        parse_args(["--host", "0.0.0.0"], environ={})
    assert refused.value.code == 2 and "refusing to serve the API without a key" in capsys.readouterr().err
    assert parse_args(["--host", "0.0.0.0"], environ={"AMULET_API_KEY": "sk-x"}).app.server.api_keys == ("sk-x",)
    assert parse_args(["--host", "0.0.0.0", "--allow-open-api"], environ={}).app.server.allow_open_api


def test_the_kuberay_manifest_runs_the_same_application_with_a_gpu_per_replica(tmp_path: Path) -> None:
    from ray.serve.deployment import Application

    from amulet_ray.application import app_builder

    documents = {d["kind"]: d for d in yaml.safe_load_all((DOCKER / "kuberay-rayservice.yaml").read_text())}
    assert set(documents) == {"RayService", "PodMonitor", "NetworkPolicy"}
    service, monitor = documents["RayService"], documents["PodMonitor"]
    assert service["apiVersion"] == "ray.io/v1"
    (app,) = serve_apps(yaml.safe_load(service["spec"]["serveConfigV2"]))
    argv = list(app.args["argv"])
    keys = tmp_path / "api-keys"  # the Secret's file, here
    keys.write_text("sk-from-the-secret\n")
    argv[argv.index("--api-key-file") + 1] = str(keys)
    assert isinstance(app_builder({"argv": argv}), Application)
    (shipped,) = serve_apps(yaml.safe_load((DOCKER / "ray-serve.yaml").read_text()))
    assert app.import_path == shipped.import_path
    replica = next(d for d in app.deployments if d.name == "AmuletReplica")
    assert replica.ray_actor_options.num_gpus == 1
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == importlib.import_module("ray").__version__
    (worker,) = cluster["workerGroupSpecs"]
    container = worker["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    port = next(p for p in container["ports"] if p["name"] == "amulet-metrics")
    assert port["containerPort"] == RayServeConfig().metrics_port
    assert monitor["kind"] == "PodMonitor"
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "amulet-metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= worker["template"]["metadata"]["labels"].items()


def test_the_prometheus_example_scrapes_the_replicas_default_metrics_ports(prometheus_binary: str) -> None:
    path = DOCKER / "prometheus-ray.yml"
    (job,) = yaml.safe_load(path.read_text())["scrape_configs"]
    targets = job["static_configs"][0]["targets"]
    base = RayServeConfig().metrics_port
    assert targets == [f"127.0.0.1:{base + k}" for k in range(len(targets))] and len(targets) >= 2
    promtool = str(Path(prometheus_binary).with_name("promtool"))
    result = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_ray_image_installs_the_locked_ray() -> None:
    dockerfile = (DOCKER / "Dockerfile.ray").read_text()
    version = importlib.import_module("ray").__version__
    assert f'"ray[serve]=={version}"' in dockerfile and "requirements-dev.lock" in dockerfile
    assert f"ray=={version}" in Path(ROOT / "requirements-dev.lock").read_text()
