"""The shipped deployments are closed by default, read as text (no Docker engine or Kubernetes cluster needed):

* docker-compose.yml (alone, with docker-compose.cpu.yml and with docker-compose.podman.yml): every published
  port is bound to loopback; the server cannot start without an API key (a required variable, not an empty
  default); Grafana takes its admin password from a required variable or a secret and has no anonymous Admin
  or Editor;
* docker/kuberay-rayservice.yaml: Ray's dashboard is not bound to every interface; a NetworkPolicy covers
  the Ray pods and opens nothing to everyone but the serving port; the API key is read from a Kubernetes
  Secret mounted as a file on every pod.

Each check is a function returning the problems it finds; the tests run them on the shipped files (none) and on
the files with each old flaw put back (the flaw is found), as the files were before they were closed.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ops.compose_files import load_compose, merge_compose, parse_compose
from tests.support import ROOT

COMPOSE = ROOT / "docker-compose.yml"
CPU_OVERRIDE = ROOT / "docker-compose.cpu.yml"
PODMAN_OVERRIDE = ROOT / "docker-compose.podman.yml"
KUBERAY = ROOT / "docker" / "kuberay-rayservice.yaml"
SERVING_PORT = 8000
REQUIRED_VARIABLE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*:?\?[^}]+\}$")
"""A Compose variable that must be set: ``${NAME:?message}`` (or ``${NAME?message}``)."""
PRIVILEGED_GRAFANA_ROLES = {"admin", "editor", "grafana admin"}


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _loopback(host_ip: str) -> bool:
    try:
        return ipaddress.ip_address(host_ip.strip("[]")).is_loopback
    except ValueError:
        return host_ip == "localhost"


def _published_host_ips(port: Any) -> str | None:
    """The host address a port entry publishes on ("" when it names none: every interface)."""
    if isinstance(port, dict):
        return str(port.get("host_ip", "")) if port.get("published") is not None else None
    text = str(port)
    if text.startswith("["):  # [::1]:8000:8000
        return text[: text.index("]") + 1]
    parts = text.split(":")
    return parts[0] if len(parts) == 3 else ""  # "8000:8000" and "8000" publish on every interface


def compose_open_ports(compose: dict[str, Any]) -> list[str]:
    problems = []
    for name, service in compose.get("services", {}).items():
        if service.get("network_mode") == "host":
            problems.append(f"{name}: network_mode host publishes every port it opens")
        for port in service.get("ports", []) or []:
            host_ip = _published_host_ips(port)
            if host_ip is not None and not _loopback(host_ip):
                problems.append(f"{name}: port {port!r} is published on every interface, not 127.0.0.1")
    return problems


def _required(value: str) -> bool:
    return bool(REQUIRED_VARIABLE.match(value.strip()))


def compose_missing_key(compose: dict[str, Any]) -> list[str]:
    server = compose["services"]["server"]
    env = _environment(server)
    command = " ".join(map(str, server.get("command") or []))
    problems = []
    if "--allow-open-api" in command:
        problems.append("server: --allow-open-api serves the API without a key")
    keyed = _required(env.get("AMULET_API_KEY", "")) or _required(env.get("AMULET_API_KEY_FILE", ""))
    keyed = keyed or any(flag in command for flag in ("--api-key-file", "--api-key "))
    if not keyed:
        problems.append("server: AMULET_API_KEY is not required (an unset or empty default leaves the API open)")
    return problems


def compose_anonymous_admin(compose: dict[str, Any]) -> list[str]:
    problems = []
    for name, service in compose.get("services", {}).items():
        if "grafana" not in str(service.get("image", "")):
            continue
        env = _environment(service)
        anonymous = env.get("GF_AUTH_ANONYMOUS_ENABLED", "false").strip().lower() == "true"
        role = env.get("GF_AUTH_ANONYMOUS_ORG_ROLE", "Viewer").strip().lower()
        if anonymous and role in PRIVILEGED_GRAFANA_ROLES:
            problems.append(f"{name}: anonymous users are {role}")
        password = env.get("GF_SECURITY_ADMIN_PASSWORD")
        from_secret = bool(env.get("GF_SECURITY_ADMIN_PASSWORD__FILE")) and bool(service.get("secrets"))
        if not from_secret and (password is None or not _required(password)):
            problems.append(f"{name}: the admin password is not taken from a required variable or a secret (admin/admin)")
    return problems


def compose_problems(compose: dict[str, Any]) -> list[str]:
    return compose_open_ports(compose) + compose_missing_key(compose) + compose_anonymous_admin(compose)


# ---------------------------------------------------------------- KubeRay


def kuberay_documents(text: str) -> dict[str, list[dict[str, Any]]]:
    documents: dict[str, list[dict[str, Any]]] = {}
    for document in yaml.safe_load_all(text):
        if document:
            documents.setdefault(document["kind"], []).append(document)
    return documents


def _pod_templates(service: dict[str, Any]) -> Iterator[dict[str, Any]]:
    cluster = service["spec"]["rayClusterConfig"]
    yield cluster["headGroupSpec"]["template"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["template"]


def _argv(service: dict[str, Any]) -> list[str]:
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    return [str(arg) for app in config["applications"] for arg in (app.get("args") or {}).get("argv", [])]


def kuberay_open_dashboard(documents: dict[str, list[dict[str, Any]]]) -> list[str]:
    problems = []
    for service in documents.get("RayService", []):
        head = service["spec"]["rayClusterConfig"]["headGroupSpec"]
        params = {str(k): str(v) for k, v in (head.get("rayStartParams") or {}).items()}
        if params.get("include-dashboard", "true").lower() == "false":
            continue
        if params.get("dashboard-host", "0.0.0.0").strip("[]") in ("0.0.0.0", "::", ""):  # Ray's default under KubeRay
            problems.append("the Ray dashboard (its Jobs API runs code) listens on every interface")
    return problems


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    match = selector.get("matchLabels") or {}
    return bool(match) and match.items() <= labels.items()


def kuberay_network_problems(documents: dict[str, list[dict[str, Any]]]) -> list[str]:
    policies = documents.get("NetworkPolicy", [])
    problems = []
    for service in documents.get("RayService", []):
        for template in _pod_templates(service):
            labels = (template.get("metadata") or {}).get("labels") or {}
            covering = [
                p for p in policies if _selects(p["spec"]["podSelector"], labels) and "Ingress" in p["spec"]["policyTypes"]
            ]
            if not covering:
                problems.append(f"no NetworkPolicy covers the pods labelled {labels}")
                continue
            rules = [rule for policy in covering for rule in policy["spec"].get("ingress", [])]
            for rule in rules:
                sources = rule.get("from")
                ports = [p.get("port") for p in rule.get("ports") or []]
                if not sources and ports != [SERVING_PORT]:
                    problems.append(f"a NetworkPolicy rule opens {ports or 'every port'} to everyone, not the serving port only")
                for source in sources or []:
                    if source.get("ipBlock", {}).get("cidr") in ("0.0.0.0/0", "::/0"):
                        problems.append(f"a NetworkPolicy rule opens {ports or 'every port'} to every address")
            if not any(_selects((s.get("podSelector") or {}), labels) for r in rules for s in r.get("from") or []):
                problems.append("the Ray pods cannot reach each other (no rule admits head <-> workers)")
    return problems


def kuberay_missing_key(documents: dict[str, list[dict[str, Any]]]) -> list[str]:
    problems = []
    for service in documents.get("RayService", []):
        argv = _argv(service)
        if "--allow-open-api" in argv:
            problems.append("--allow-open-api serves the API without a key")
        if "--api-key-file" not in argv:
            problems.append("the API key is not read from a file (--api-key-file)")
            continue
        key_file = argv[argv.index("--api-key-file") + 1]
        for template in _pod_templates(service):
            spec = template["spec"]
            secrets = {v["name"] for v in spec.get("volumes", []) if "secret" in v}
            mounts = [m for c in spec["containers"] for m in c.get("volumeMounts", []) if m["name"] in secrets]
            if not any(key_file.startswith(m["mountPath"].rstrip("/") + "/") for m in mounts):
                problems.append(f"{key_file} is not in a Secret mounted on the pod {template.get('metadata')}")
    return problems


def kuberay_problems(documents: dict[str, list[dict[str, Any]]]) -> list[str]:
    return kuberay_open_dashboard(documents) + kuberay_network_problems(documents) + kuberay_missing_key(documents)


# ---------------------------------------------------------------- the shipped files pass


def shipped_compose() -> dict[str, Any]:
    return load_compose(COMPOSE)


def test_the_shipped_compose_files_are_closed() -> None:
    assert compose_problems(shipped_compose()) == []
    assert compose_problems(merge_compose(shipped_compose(), load_compose(CPU_OVERRIDE))) == []
    assert compose_problems(merge_compose(shipped_compose(), load_compose(PODMAN_OVERRIDE))) == []


def test_the_shipped_kuberay_manifest_is_closed() -> None:
    assert kuberay_problems(kuberay_documents(KUBERAY.read_text())) == []


# ---------------------------------------------------------------- each old flaw put back is found


def _flawed_compose(change: str) -> dict[str, Any]:
    compose = shipped_compose()
    services = compose["services"]
    if change == "published on every interface":
        services["server"]["ports"] = ["8000:8000"]
    elif change == "no host address":
        services["prometheus"]["ports"] = ["9090"]
    elif change == "long syntax on every interface":
        services["grafana"]["ports"] = [{"target": 3000, "published": 3000}]
    elif change == "optional key":
        services["server"]["environment"] = {
            "AMULET_API_KEY": "${AMULET_API_KEY:-}",
            "AMULET_API_KEY_FILE": "${AMULET_API_KEY_FILE:-}",
        }
    elif change == "open api flag":
        services["server"]["command"] = [*services["server"]["command"], "--allow-open-api"]
    elif change == "anonymous admin":
        services["grafana"]["environment"] |= {"GF_AUTH_ANONYMOUS_ENABLED": "true", "GF_AUTH_ANONYMOUS_ORG_ROLE": "Admin"}
    elif change == "default admin password":
        del services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    return compose


@pytest.mark.parametrize(
    "change",
    [
        "published on every interface",
        "no host address",
        "long syntax on every interface",
        "optional key",
        "open api flag",
        "anonymous admin",
        "default admin password",
    ],
)
def test_each_compose_flaw_is_found(change: str) -> None:
    assert compose_problems(_flawed_compose(change)), change


def _flawed_kuberay(change: str) -> dict[str, list[dict[str, Any]]]:
    documents = kuberay_documents(KUBERAY.read_text())
    (service,) = documents["RayService"]
    cluster = service["spec"]["rayClusterConfig"]
    if change == "dashboard on every interface":
        cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] = "0.0.0.0"
    elif change == "dashboard host left to the default":
        del cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"]
    elif change == "no network policy":
        del documents["NetworkPolicy"]
    elif change == "dashboard open to everyone":
        documents["NetworkPolicy"][0]["spec"]["ingress"].append({"ports": [{"port": 8265}]})
    elif change == "everything open to everyone":
        documents["NetworkPolicy"][0]["spec"]["ingress"].append({})
    elif change == "no key file":
        config = yaml.safe_load(service["spec"]["serveConfigV2"])
        config["applications"][0]["args"]["argv"] = ["--host", "0.0.0.0", "--ray-metrics-port", "8100"]
        service["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    elif change == "key file not mounted on the workers":
        for group in cluster["workerGroupSpecs"]:
            group["template"]["spec"]["volumes"] = []
    return documents


@pytest.mark.parametrize(
    "change",
    [
        "dashboard on every interface",
        "dashboard host left to the default",
        "no network policy",
        "dashboard open to everyone",
        "everything open to everyone",
        "no key file",
        "key file not mounted on the workers",
    ],
)
def test_each_kuberay_flaw_is_found(change: str) -> None:
    assert kuberay_problems(_flawed_kuberay(change)), change


OLD_COMPOSE = """
services:
  server:
    image: amulet-serve:gpu
    ports: ["8000:8000"]
    environment:
      AMULET_API_KEY: ${AMULET_API_KEY:-}
      AMULET_API_KEY_FILE: ${AMULET_API_KEY_FILE:-}
  prometheus:
    image: prom/prometheus:v2.55.1
    ports: ["9090:9090"]
  grafana:
    image: grafana/grafana:11.3.0
    environment:
      GF_AUTH_ANONYMOUS_ENABLED: "true"
      GF_AUTH_ANONYMOUS_ORG_ROLE: Viewer
    ports: ["3000:3000"]
"""
"""The parts of docker-compose.yml that mattered before it was closed (commit 80763f2)."""


def test_the_compose_file_as_it_was_fails_every_check() -> None:
    old = parse_compose(OLD_COMPOSE)
    assert len(compose_open_ports(old)) == 3
    assert compose_missing_key(old) and compose_anonymous_admin(old)


def test_the_checks_read_the_shipped_files_as_compose_and_kubernetes_do(tmp_path: Path) -> None:
    """The parts the checks read are really there (a renamed service or key would make them vacuous)."""
    compose = shipped_compose()
    assert {"server", "prometheus", "grafana"} <= set(compose["services"])
    assert all(compose["services"][name]["ports"] for name in ("server", "prometheus", "grafana"))
    documents = kuberay_documents(KUBERAY.read_text())
    assert len(documents["RayService"]) == 1 and len(documents["NetworkPolicy"]) == 1
    assert "--api-key-file" in _argv(documents["RayService"][0])
    assert len(list(_pod_templates(documents["RayService"][0]))) == 2
