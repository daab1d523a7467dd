"""The Ray Serve application of ``amulet-ray``: ``AmuletIngress`` in front of ``AmuletReplica``.

:func:`build_application` derives every deployment option from the parsed configs; :func:`app_builder`
is the same for a Serve config file (``import_path: amulet_ray.application:app_builder``, with the
``amulet-ray`` options as ``args: {argv: [...]}``), whose ``deployments:`` section may then override
any option (replicas, autoscaling, ``ray_actor_options``) as Ray Serve applies it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ray
from ray import serve
from ray.serve.deployment import Application

from amulet_ray.config import RayConfigs, parse_args
from amulet_ray.deployments import AmuletIngress, AmuletReplica
from server.options import Configs

REPLICA_DEPLOYMENT = "AmuletReplica"
INGRESS_DEPLOYMENT = "AmuletIngress"
INGRESS_MAX_ONGOING_REQUESTS = 1024
"""The ingress only relays bytes: it takes every request the proxy has and lets the replicas' router queue them."""
HEALTH_CHECK_PERIOD_S = 5.0
HEALTH_CHECK_TIMEOUT_S = 30.0
ROUTER_CLASS = "amulet_ray.router:PrefixAffinityRouter"
"""Imported by Ray wherever a handle to the replicas routes (the ingress)."""
CONSTRUCTOR_RETRIES = 3
"""Replica starts Ray retries before it reports the deployment failed (a model that does not load rarely will)."""
SHUTDOWN_MARGIN_S = 5.0
"""Ray's graceful shutdown budget is ``--drain-timeout`` plus this, for ``__del__``'s drain after Ray's wait."""


def _deployment(cls: type) -> Any:
    """``serve.deployment(cls)`` (typed loosely: Ray's overloads do not tell mypy it is a Deployment)."""
    return serve.deployment(cls)


def replica_resources(configs: RayConfigs, cluster_gpus: float) -> dict[str, float]:
    """``ray_actor_options`` resources of one replica: one GPU where the cluster has GPUs (unless ``--device cpu``),
    else a CPU replica reserving its torch threads; ``--ray-num-gpus`` / ``--ray-num-cpus`` override."""
    model, ray_config = configs.app.model, configs.ray
    gpus = ray_config.num_gpus
    if gpus is None:
        gpus = 1.0 if cluster_gpus > 0 and model.device != "cpu" else 0.0
    cpus = ray_config.num_cpus
    if cpus is None:
        cpus = 1.0 if gpus > 0 else float(model.cpu_threads or 1)
    return {"num_cpus": cpus, "num_gpus": gpus}


def replica_app_configs(configs: RayConfigs, actor_options: Mapping[str, Any]) -> Configs:
    """The configs a replica serves with: ``configs.app``, where a CPU replica without ``--cpu-threads`` runs as many
    torch threads as the CPUs it reserves (``actor_options``' ``num_cpus``, at least 1), not every CPU of its node."""
    app = configs.app
    if app.model.cpu_threads is not None or actor_options.get("num_gpus", 0) > 0:
        return app
    threads = max(1, int(actor_options.get("num_cpus", 1)))
    return dataclasses.replace(app, model=dataclasses.replace(app.model, cpu_threads=threads))


def replica_options(configs: RayConfigs, cluster_gpus: float) -> dict[str, Any]:
    """Every option of the ``AmuletReplica`` deployment (see :func:`build_application`)."""
    app, ray_config = configs.app, configs.ray
    options: dict[str, Any] = {
        "name": REPLICA_DEPLOYMENT,
        "max_ongoing_requests": ray_config.max_ongoing_requests or app.engine.max_num_seqs,
        "ray_actor_options": replica_resources(configs, cluster_gpus),
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
        "graceful_shutdown_timeout_s": app.server.drain_timeout_s + SHUTDOWN_MARGIN_S,
        "graceful_shutdown_wait_loop_s": 0.5,
        "max_constructor_retry_count": CONSTRUCTOR_RETRIES,
        "request_router_config": {
            "request_router_class": ROUTER_CLASS,
            "request_router_kwargs": {"max_imbalance": ray_config.max_imbalance},
        },
    }
    if ray_config.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": ray_config.replicas,
            "initial_replicas": ray_config.replicas,
            "max_replicas": ray_config.max_replicas,
            "target_ongoing_requests": ray_config.target_ongoing_requests,
            "upscale_delay_s": ray_config.upscale_delay_s,
            "downscale_delay_s": ray_config.downscale_delay_s,
        }
    else:
        options["num_replicas"] = ray_config.replicas
    return options


def build_application(
    configs: RayConfigs, overrides: Mapping[str, Mapping[str, Any]] | None = None, cluster_gpus: float | None = None
) -> Application:
    """The application for ``configs``.

    ``overrides``: deployment options by deployment name, applied over the derived ones (what a Serve
    config's ``deployments:`` section does). ``cluster_gpus``: None reads the connected cluster's GPUs."""
    if cluster_gpus is None:
        cluster_gpus = float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0
    overrides = overrides or {}
    options = {**replica_options(configs, cluster_gpus), **overrides.get(REPLICA_DEPLOYMENT, {})}
    replica_configs = replica_app_configs(configs, options["ray_actor_options"])  # no deployment options: rescaling restarts none
    replica = _deployment(AmuletReplica).options(**options)
    ingress_options: dict[str, Any] = {
        "name": INGRESS_DEPLOYMENT,
        "num_replicas": 1,
        "max_ongoing_requests": INGRESS_MAX_ONGOING_REQUESTS,
        "ray_actor_options": {"num_cpus": 0},
        "max_constructor_retry_count": CONSTRUCTOR_RETRIES,
    }
    ingress = _deployment(AmuletIngress).options(**{**ingress_options, **overrides.get(INGRESS_DEPLOYMENT, {})})
    return ingress.bind(replica.bind(replica_configs, configs.ray.metrics_port), replica_configs, configs.ray.routing)


def app_builder(args: Mapping[str, Any]) -> Application:
    """Serve config entry point: ``args: {argv: ["--max-num-seqs", "32", ...]}`` (every ``amulet-ray`` option)."""
    argv = args.get("argv", [])
    if isinstance(argv, str) or not all(isinstance(a, str) for a in argv):
        raise ValueError("args.argv must be a list of strings (amulet-ray options)")
    return build_application(parse_args(list(argv)))
