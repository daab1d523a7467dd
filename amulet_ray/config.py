"""The options of ``amulet-ray`` and their frozen configs; importing this needs no Ray.

``amulet-ray`` takes every ``amulet-server`` option (:func:`server.options.build_parser`) plus the ``--ray*``
ones (:func:`add_ray_arguments`); :func:`parse_args` turns them into :class:`RayConfigs`: the server's
:class:`~server.options.Configs`, which every replica gets unchanged but for its torch threads (a CPU replica
without ``--cpu-threads`` runs as many as the CPUs it reserves; ``--host`` and ``--port`` become the address of Ray's
HTTP proxy), and the :class:`RayServeConfig` of the replicas' placement and routing.
``amulet-server --ray ...`` hands its whole command line to ``amulet-ray``, so ``--ray`` is accepted here too.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from server.options import RAY_FLAG, RAY_INSTALL_HINT, Configs, configs_from_args
from server.options import build_parser as build_server_parser

ROUTING_PREFIX = "prefix"
ROUTING_POW2 = "pow2"
ROUTINGS = (ROUTING_PREFIX, ROUTING_POW2)
ROUTING_HEADER = "x-amulet-routing"
"""A request may ask for ``pow2`` (no prefix affinity) or ``prefix`` in this header, whatever the default."""
REPLICA_HEADER = "x-amulet-replica"
"""Every answer names the Ray Serve replica (its unique id) that served it."""
INSTALL_HINT = RAY_INSTALL_HINT


@dataclass(frozen=True)
class RayServeConfig:
    """How ``amulet-ray`` places and routes replicas (each replica gets the other configs unchanged).

    A fixed ``replicas`` count when ``max_replicas`` is None (or equal), else Ray Serve's autoscaling
    between ``replicas`` and ``max_replicas`` on queue length: ``target_ongoing_requests`` requests
    running or queued per replica.
    """

    address: str | None = None
    """A running Ray cluster (``ray://...`` or ``host:port``); None starts a local one (or joins $RAY_ADDRESS)."""
    app_name: str = "amulet"
    replicas: int = 1
    max_replicas: int | None = None
    target_ongoing_requests: float = 8.0
    max_ongoing_requests: int | None = None
    """Requests Ray sends one replica at once; None = the engine's ``--max-num-seqs``. More wait in Ray's router."""
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    num_gpus: float | None = None
    """GPUs per replica; None = 1 when the cluster has GPUs and ``--device`` is not cpu, else 0."""
    num_cpus: float | None = None
    """CPUs Ray reserves per replica; None = ``--cpu-threads`` (else 1) for a CPU replica, 1 for a GPU one."""
    metrics_port: int = 8100
    """Replica k on a node serves its ``amulet_`` metrics on this port + k (0: off)."""
    routing: str = ROUTING_PREFIX
    max_imbalance: int = 8
    """The preferred replica counts as busy when it holds this many more requests than the least loaded one."""

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"--ray-replicas must be at least 1, got {self.replicas}")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"--ray-max-replicas ({self.max_replicas}) must be at least --ray-replicas ({self.replicas})")
        positive = {
            "--ray-target-ongoing-requests": self.target_ongoing_requests,
            "--ray-max-ongoing-requests": 1 if self.max_ongoing_requests is None else self.max_ongoing_requests,
        }
        non_negative = {
            "--ray-upscale-delay": self.upscale_delay_s,
            "--ray-downscale-delay": self.downscale_delay_s,
            "--ray-num-gpus": 0 if self.num_gpus is None else self.num_gpus,
            "--ray-num-cpus": 0 if self.num_cpus is None else self.num_cpus,
            "--ray-max-imbalance": self.max_imbalance,
        }
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be above 0, got {value}")
        for name, value in non_negative.items():
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be 0 or more, got {value}")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"--ray-metrics-port must be a TCP port (0 turns it off), got {self.metrics_port}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"--ray-routing must be one of {', '.join(ROUTINGS)}, got {self.routing!r}")

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None and self.max_replicas > self.replicas


@dataclass(frozen=True)
class RayConfigs:
    """Everything ``amulet-ray`` parsed."""

    app: Configs
    """The server's configs: each replica runs its engine and app with them (the ingress its server options)."""
    ray: RayServeConfig


def add_ray_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``parser`` (the server's) with the ``--ray*`` options, a group of ``amulet-ray --help``."""
    defaults = RayServeConfig()
    group = parser.add_argument_group(
        "Ray Serve (scale-out)",
        f"Serve replicas of this server behind Ray Serve's HTTP proxy at --host:--port ({INSTALL_HINT}). "
        "Every other option applies to each replica.",
    )
    group.add_argument(
        RAY_FLAG, action="store_true", help="implied; accepted so that an amulet-server --ray command line runs unchanged"
    )
    group.add_argument("--ray-address", default=None, help="a running Ray cluster (default: $RAY_ADDRESS, else a local one)")
    group.add_argument("--ray-replicas", type=int, default=defaults.replicas, help="replicas (the minimum when autoscaling)")
    group.add_argument(
        "--ray-max-replicas", type=int, default=None, help="autoscale on queue length up to this many replicas (default: off)"
    )
    group.add_argument(
        "--ray-target-ongoing-requests",
        type=float,
        default=defaults.target_ongoing_requests,
        help="autoscaling target of requests running or queued per replica (default: %(default)s)",
    )
    group.add_argument(
        "--ray-max-ongoing-requests", type=int, default=None, help="requests one replica takes at once (default: --max-num-seqs)"
    )
    group.add_argument("--ray-upscale-delay", type=float, default=defaults.upscale_delay_s, help="seconds (default: %(default)s)")
    group.add_argument(
        "--ray-downscale-delay", type=float, default=defaults.downscale_delay_s, help="seconds (default: %(default)s)"
    )
    group.add_argument(
        "--ray-num-gpus", type=float, default=None, help="GPUs per replica (default: 1 where the cluster has GPUs, else 0)"
    )
    group.add_argument(
        "--ray-num-cpus", type=float, default=None, help="CPUs per replica (default: --cpu-threads, or 1, on CPU replicas)"
    )
    group.add_argument(
        "--ray-metrics-port",
        type=int,
        default=defaults.metrics_port,
        help="replica k of a node serves its metrics at --host:PORT+k/metrics; 0 turns it off (default: %(default)s)",
    )
    group.add_argument(
        "--ray-routing",
        choices=ROUTINGS,
        default=defaults.routing,
        help=f"prefix: the replica that served the same leading prompt blocks last, unless busy; pow2: Ray's power of "
        f"two choices (a request may pick with the {ROUTING_HEADER} header) (default: %(default)s)",
    )
    group.add_argument(
        "--ray-max-imbalance",
        type=int,
        default=defaults.max_imbalance,
        help="requests the preferred replica may hold above the least loaded one before it counts as busy (default: %(default)s)",
    )
    return parser


def ray_config_from_args(args: argparse.Namespace) -> RayServeConfig:
    """The config of the parsed ``--ray*`` options. Raises ValueError on a bad value."""
    return RayServeConfig(
        address=args.ray_address,
        replicas=args.ray_replicas,
        max_replicas=args.ray_max_replicas,
        target_ongoing_requests=args.ray_target_ongoing_requests,
        max_ongoing_requests=args.ray_max_ongoing_requests,
        upscale_delay_s=args.ray_upscale_delay,
        downscale_delay_s=args.ray_downscale_delay,
        num_gpus=args.ray_num_gpus,
        num_cpus=args.ray_num_cpus,
        metrics_port=args.ray_metrics_port,
        routing=args.ray_routing,
        max_imbalance=args.ray_max_imbalance,
    )


def build_parser() -> argparse.ArgumentParser:
    """``amulet-ray``'s parser: every option of ``amulet-server`` (but its ``--ray`` hand-over) and the ``--ray*`` ones."""
    parser = add_ray_arguments(build_server_parser("amulet-ray", ray_flag=False))
    parser.description = "Replicas of amulet-server on Ray Serve behind its HTTP proxy, routed by prompt prefix."
    return parser


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> RayConfigs:
    """All of ``amulet-ray``'s configs from the command line (``--ray`` implied, accepted); exits with a usage error
    (status 2) on bad values, as ``amulet-server`` does."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        ray = ray_config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    return RayConfigs(configs_from_args(parser, args, environ), ray)
