"""docker-compose.yml, its CPU override, the Prometheus/Grafana provisioning and the Dockerfile agree.

Compose files are validated by a real Compose (Debian's ``docker-compose`` package is installed
with apt-get when no Compose is present; the test skips only where that is impossible). No
Docker engine is needed: ``config`` only parses and validates.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.ops.compose_files import load_compose, merge_compose
from tests.support import ENSURE_PACKAGE, ROOT

COMPOSE = ROOT / "docker-compose.yml"
CPU_OVERRIDE = ROOT / "docker-compose.cpu.yml"
PODMAN_OVERRIDE = ROOT / "docker-compose.podman.yml"
PROMETHEUS_CONFIG = ROOT / "docker" / "prometheus.yml"
GRAFANA = ROOT / "docker" / "grafana"
REQUIRED_VARIABLES = {"AMULET_API_KEY": "sk-compose-test", "GRAFANA_ADMIN_PASSWORD": "compose-test-password"}
"""What ``docker compose up`` refuses to start without (tests/ops/test_deploy_files.py checks that they are required)."""


@dataclass(frozen=True)
class ComposeTool:
    argv: tuple[str, ...]
    supports_reset: bool
    """Compose v2 understands the ``!reset`` tag; Compose v1 (Debian's docker-compose) does not."""

    def config(self, *files: Path, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """``compose config`` of ``files``, with the variables compose requires set (``env`` instead, when given)."""
        args = [*self.argv, "--project-directory", str(ROOT)]
        for f in files:
            args += ["-f", str(f)]
        environment = {**os.environ, **REQUIRED_VARIABLES} if env is None else env
        return subprocess.run([*args, "config"], cwd=cwd, capture_output=True, text=True, timeout=120, env=environment)


def _version_major(argv: list[str]) -> int | None:
    try:
        out = subprocess.run([*argv, "version", "--short"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.match(r"v?(\d+)\.", out.stdout.strip())
    return int(match.group(1)) if out.returncode == 0 and match else None


def _find_compose() -> ComposeTool | None:
    for argv in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(argv[0]) is None:
            continue
        major = _version_major(argv)
        if major is not None:
            return ComposeTool(tuple(argv), supports_reset=major >= 2)
    return None


def _install_compose() -> None:
    """Debian's docker-compose, by the suite's installer (it skips where apt-get or root is lacking)."""
    env = {**os.environ, "PATH": f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"}
    argv = ["bash", str(ENSURE_PACKAGE), "docker-compose", "docker-compose"]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode == 3:
        pytest.skip(f"no Compose found: {result.stderr.strip()}")
    assert result.returncode == 0, f"installing docker-compose failed:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def compose() -> ComposeTool:
    """A Compose that runs here (the tests that take it are marked ``system``: it may be installed with apt-get)."""
    tool = _find_compose()
    if tool is None:
        _install_compose()
        tool = _find_compose()
    assert tool is not None, "docker-compose was installed but does not run"
    return tool


def _assert_valid(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"compose config failed:\n{result.stderr}"


@pytest.mark.system
def test_compose_file_validates(compose: ComposeTool) -> None:
    _assert_valid(compose.config(COMPOSE))


@pytest.mark.system
@pytest.mark.parametrize("missing", sorted(REQUIRED_VARIABLES))
def test_compose_refuses_to_start_without_the_key_or_the_grafana_password(compose: ComposeTool, missing: str) -> None:
    env = {key: value for key, value in os.environ.items() if key not in REQUIRED_VARIABLES}
    env |= {key: value for key, value in REQUIRED_VARIABLES.items() if key != missing}
    result = compose.config(COMPOSE, env=env)
    assert result.returncode != 0
    assert f"set {missing}" in result.stderr + result.stdout
    env[missing] = ""  # empty is refused too
    assert compose.config(COMPOSE, env=env).returncode != 0


@pytest.mark.system
def test_compose_validator_rejects_a_broken_file(compose: ComposeTool, tmp_path: Path) -> None:
    broken = load_compose(COMPOSE)
    broken["services"]["server"]["gpu_count_typo"] = 1
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    assert compose.config(path).returncode != 0


@pytest.mark.system
def test_cpu_override_drops_the_gpu_and_builds_the_cpu_image(compose: ComposeTool, tmp_path: Path) -> None:
    override = load_compose(CPU_OVERRIDE)
    assert override["services"]["server"]["build"]["args"]["VARIANT"] == "cpu"
    merged = merge_compose(load_compose(COMPOSE), override)
    server = merged["services"]["server"]
    assert not server.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    assert server["build"]["context"] == "."
    assert server["build"]["args"]["VARIANT"] == "cpu"
    if compose.supports_reset:
        result = compose.config(COMPOSE, CPU_OVERRIDE)
        _assert_valid(result)
        assert "nvidia" not in result.stdout
    else:  # Compose v1 cannot parse !reset: validate the merged result instead
        path = tmp_path / "docker-compose.yml"
        path.write_text(yaml.safe_dump(merged))
        _assert_valid(compose.config(path))


def test_server_service_reserves_one_nvidia_gpu_and_publishes_8000() -> None:
    server = load_compose(COMPOSE)["services"]["server"]
    assert server["build"]["context"] == "."
    assert [str(p) for p in server["ports"]] == ["127.0.0.1:8000:8000"]
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert any(str(v).endswith(":/data/hf") for v in server["volumes"]), "HF cache volume must be mounted at HF_HOME"


def test_every_bind_mount_source_exists() -> None:
    for name, service in load_compose(COMPOSE)["services"].items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: bind-mount source {source} is missing"


def test_prometheus_config_scrapes_the_server_metrics() -> None:
    services = load_compose(COMPOSE)["services"]
    mounts = [str(v) for v in services["prometheus"]["volumes"]]
    assert "./docker/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    assert [str(p) for p in services["prometheus"]["ports"]] == ["127.0.0.1:9090:9090"]
    command = services["server"]["command"]
    assert command[command.index("--allowed-hosts") + 1] == "server"  # the Host of Prometheus's scrapes

    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = [
        job for job in config["scrape_configs"] if any("server:8000" in sc["targets"] for sc in job.get("static_configs", []))
    ]
    assert len(jobs) == 1, "exactly one scrape job must target the compose service server:8000"
    job = jobs[0]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scrape_interval", config["global"]["scrape_interval"]) == "5s"


@pytest.mark.system
def test_prometheus_config_passes_promtool(prometheus_binary: str) -> None:
    promtool = Path(prometheus_binary).with_name("promtool")
    check = subprocess.run([str(promtool), "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard() -> None:
    grafana = load_compose(COMPOSE)["services"]["grafana"]
    mounts = dict(str(v).split(":")[:2] for v in grafana["volumes"])
    assert mounts["./docker/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert [str(p) for p in grafana["ports"]] == ["127.0.0.1:3000:3000"]
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")

    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"

    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "dashboards.yml").read_text())
    (provider,) = providers["providers"]
    dashboards_in_container = provider["options"]["path"]
    assert mounts["./docker/grafana/dashboards"] == dashboards_in_container
    assert (GRAFANA / "dashboards" / "amulet.json").is_file()
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{dashboards_in_container}/amulet.json"


def test_dockerfile_variants_match_compose_build_args() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", dockerfile, flags=re.MULTILINE | re.IGNORECASE))
    assert re.search(r"^FROM\s+base-\$\{VARIANT\}", dockerfile, flags=re.MULTILINE)
    for compose_file in (COMPOSE, CPU_OVERRIDE):
        variant = load_compose(compose_file)["services"]["server"]["build"]["args"]["VARIANT"]
        assert f"base-{variant}" in stages, f"{compose_file.name}: no Dockerfile stage base-{variant}"
    assert re.search(r"^HEALTHCHECK .*\n?.*127\.0\.0\.1:8000/health", dockerfile, flags=re.MULTILINE)
    assert 'CMD ["amulet-server", "--host", "0.0.0.0", "--port", "8000"]' in dockerfile
    assert re.search(r"^USER\s+(?!root\b)\S+", dockerfile, flags=re.MULTILINE), "the image must not run as root"
    assert re.search(r"^VOLUME .*/data/hf", dockerfile, flags=re.MULTILINE)


def test_the_server_restarts_and_is_health_checked_like_the_image() -> None:
    """Crash-only: Docker restarts a server that exits (model load failure, stalled engine), and checks /health the
    same way, at the same pace, as the Dockerfile's HEALTHCHECK."""
    server = load_compose(COMPOSE)["services"]["server"]
    assert server["restart"] == "unless-stopped"
    check = server["healthcheck"]
    assert "http://127.0.0.1:8000/health" in " ".join(check["test"])
    dockerfile = (ROOT / "Dockerfile").read_text()
    options = re.search(r"^HEALTHCHECK (.*)\\$", dockerfile, flags=re.MULTILINE)
    assert options is not None
    flags = dict(re.findall(r"--([a-z-]+)=(\S+)", options.group(1)))
    for flag, key in (("interval", "interval"), ("timeout", "timeout"), ("start-period", "start_period"), ("retries", "retries")):
        assert str(check[key]) == flags[flag], key
    assert "CMD-SHELL" not in check["test"]


@pytest.mark.system
def test_podman_override_runs_the_local_images_and_validates(compose: ComposeTool) -> None:
    """docker-compose.podman.yml (what tests/ops/test_compose_up.py runs) only swaps in the images built by
    docker/build-images.sh: same ports, key, volumes, restart policy and healthcheck as the shipped file."""
    base, override = load_compose(COMPOSE), load_compose(PODMAN_OVERRIDE)
    assert set(override["services"]) == {"server", "prometheus"}
    assert override["services"]["server"] == {"build": {"args": {"VARIANT": "cpu"}}, "image": "localhost/amulet-serve:cpu"}
    assert override["services"]["prometheus"] == {"image": "localhost/amulet-prometheus:debian"}
    merged = merge_compose(base, override)
    for name in ("server", "prometheus"):
        kept = {k: v for k, v in base["services"][name].items() if k not in {"image", "build"}}
        assert {k: merged["services"][name][k] for k in kept} == kept
    _assert_valid(compose.config(COMPOSE, PODMAN_OVERRIDE))


def test_dockerfile_base_images_and_pip_settings_are_build_arguments() -> None:
    """Offline-friendly: the public bases are defaults, not fixed; every pip step sees build-local/ and pip's
    settings (unset by default)."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG CPU_IMAGE=python:3\.11-slim$", dockerfile, flags=re.MULTILINE)
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+$", dockerfile, flags=re.MULTILINE)
    assert re.search(r"^FROM \$\{CPU_IMAGE\} AS base-cpu$", dockerfile, flags=re.MULTILINE)
    assert re.search(r"^FROM \$\{CUDA_IMAGE\} AS base-gpu$", dockerfile, flags=re.MULTILINE)
    for stage in re.split(r"^FROM ", dockerfile, flags=re.MULTILINE)[1:]:
        if "pip install" in stage:
            assert re.search(r"^ARG PIP_CERT$", stage, flags=re.MULTILINE), stage.splitlines()[0]
            assert re.search(r"^ARG PIP_INDEX_URL$", stage, flags=re.MULTILINE), stage.splitlines()[0]
    for dockerfile_text in (dockerfile, (ROOT / "docker" / "Dockerfile.ray").read_text()):
        runs = re.findall(r"^RUN (?:.*\\\n)*.*$", dockerfile_text, flags=re.MULTILINE)
        for run in (r for r in runs if "pip install" in r):
            assert run.startswith("RUN --mount=type=bind,source=build-local,target=/build-local"), run
    assert (ROOT / "build-local" / "README.md").is_file()  # the bind mount's source must exist in every checkout
    assert "build-local" not in (ROOT / ".dockerignore").read_text().split()
