"""``amulet-server``: parse every option (:mod:`server.options`), build the app (:mod:`server.assembly`), run uvicorn.

The model loads in the engine's worker thread after the server starts listening: ``/health``
answers at once, ``/ready`` (and every API call) answers 503 until the model is loaded.

Shutdown drains (:class:`DrainingServer`): on SIGTERM (or Ctrl-C) new API calls get 503 with
``Retry-After`` while the running requests finish, for up to ``--drain-timeout`` seconds; what
still runs then is aborted (its stream ends with an error event) and the process exits 0.
A second signal stops at once.

Without an API key, an address other than loopback (``--host 0.0.0.0``) is refused at once (status 2) unless
``--allow-open-api`` is given (:mod:`server.access_options`).

A model that fails to load makes the process exit with status 4 (``--wait-for-model`` keeps it up,
not ready, instead), a stalled or dead engine worker with status 5 (``--engine-stall-timeout``);
see :mod:`server.supervision` for every exit status.

``--ray`` hands the whole command line to ``amulet-ray`` (:mod:`amulet_ray.cli`), which serves replicas of
this same app on Ray Serve: the one import of ``amulet_ray`` in ``server``, made only then, so that the
server imports neither it nor Ray otherwise.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from typing import Any

import uvicorn

from server.assembly import build_app
from server.config import ServerConfig
from server.draining import DrainingServer, drainer
from server.lifecycle import ServerLifecycle
from server.options import configure_logging, parse_args, ray_requested
from server.supervision import EXIT_STARTUP_FAILED

FLUSH_TIMEOUT_S = 5
"""After draining, how long uvicorn may take to send the last bytes before it cuts connections."""


def uvicorn_config(app: Any, server: ServerConfig) -> uvicorn.Config:
    """uvicorn's settings for ``app``: the address, the connection limit (``--max-connections``: 503 beyond it),
    the keep-alive timeout (``--keep-alive-timeout``) and no ``server`` header (it would tell every caller which
    server and version answer)."""
    return uvicorn.Config(
        app,
        host=server.host,
        port=server.port,
        log_level=server.log_level,
        timeout_graceful_shutdown=FLUSH_TIMEOUT_S,
        limit_concurrency=server.max_connections,
        timeout_keep_alive=server.keep_alive_timeout_s,
        server_header=False,
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if ray_requested(args):
        from amulet_ray.cli import main as ray_main  # the lazy hand-over (see the module docstring)

        ray_main(args)
        return
    configs = parse_args(args)
    configure_logging(configs.server.log_level)
    app = build_app(configs)
    config = uvicorn_config(app, configs.server)
    lifecycle: ServerLifecycle = app.state.lifecycle
    server = DrainingServer(config, drainer(lifecycle, app.state.engine, configs.server.drain_timeout_s), lifecycle)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C before the server had started
        server.run()
    if lifecycle.exit_status is not None:
        raise SystemExit(lifecycle.exit_status)
    if not server.started:
        raise SystemExit(EXIT_STARTUP_FAILED)  # uvicorn's code for a failed startup (e.g. the port is taken)


if __name__ == "__main__":
    main()
