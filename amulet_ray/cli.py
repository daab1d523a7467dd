"""``amulet-ray``: every ``amulet-server`` option plus the ``--ray*`` ones; serve replicas on Ray Serve.

``amulet-server --ray ...`` hands its whole command line here. Exit statuses: see :mod:`amulet_ray.launcher`.
Ray itself is imported only once the options parsed (inside :func:`~amulet_ray.launcher.serve_on_ray`).
"""

from __future__ import annotations

from collections.abc import Sequence

from amulet_ray.config import parse_args
from amulet_ray.launcher import serve_on_ray
from server.options import configure_logging


def main(argv: Sequence[str] | None = None) -> None:
    configs = parse_args(argv)
    configure_logging(configs.app.server.log_level)
    raise SystemExit(serve_on_ray(configs))


if __name__ == "__main__":
    main()
