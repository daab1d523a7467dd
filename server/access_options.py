"""The options of ``amulet-server`` about who may reach it and how much a request may hold (a part of
:func:`server.options.build_parser`), and the start-up refusal of an open API on a non-loopback address."""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Sequence
from typing import Any

from server.api_keys import API_KEY_ENV, API_KEY_FILE_ENV
from server.config import (
    ANY_HOST,
    DEFAULT_BODY_READ_TIMEOUT_S,
    DEFAULT_KEEP_ALIVE_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONNECTIONS,
)
from server.requests.limits import (
    DEFAULT_MAX_SEQUENCES,
    DEFAULT_PREPARATION_QUEUE,
    DEFAULT_PREPARATION_THREADS,
    RequestLimits,
)

ALLOW_OPEN_API_FLAG = "--allow-open-api"


def add_access_arguments(p: argparse.ArgumentParser) -> None:
    """``--max-body-bytes``, ``--body-read-timeout``, ``--keep-alive-timeout``, ``--max-connections``,
    ``--max-sequences-per-request``, ``--preparation-threads``, ``--preparation-queue``, ``--allowed-hosts``,
    ``--allow-open-api`` and ``--docs``."""
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="largest request body accepted; bigger ones get 413 (default: %(default)s)",
    )
    p.add_argument(
        "--body-read-timeout",
        type=float,
        default=DEFAULT_BODY_READ_TIMEOUT_S,
        metavar="SECONDS",
        help="a request body must arrive whole within this time, else 408 (default: %(default)s)",
    )
    p.add_argument(
        "--keep-alive-timeout",
        type=int,
        default=DEFAULT_KEEP_ALIVE_TIMEOUT_S,
        metavar="SECONDS",
        help="how long an idle keep-alive connection stays open; keep it above the idle timeout of the clients and "
        "load balancers in front (default: %(default)s)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="open connections (or running requests) beyond which a new request gets 503 at once; 0: no limit "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--max-sequences-per-request",
        type=int,
        default=DEFAULT_MAX_SEQUENCES,
        metavar="N",
        help="most sequences one request may decode (its prompts x n x the contexts of its method); more get 400 "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--preparation-threads",
        type=int,
        default=DEFAULT_PREPARATION_THREADS,
        metavar="N",
        help="threads that render chat templates and tokenize requests, off the event loop (default: %(default)s)",
    )
    p.add_argument(
        "--preparation-queue",
        type=int,
        default=DEFAULT_PREPARATION_QUEUE,
        metavar="N",
        help="requests that may wait for a preparation thread; one more gets 429 with Retry-After (default: %(default)s)",
    )
    p.add_argument(
        "--allowed-hosts",
        default="",
        metavar="NAMES",
        help=f"comma-separated Host names answered besides localhost, 127.0.0.1, [::1] and --host ('*.example.com': "
        f"its subdomains; '{ANY_HOST}': any); other Host headers get 400, so that no web page reaches the server "
        "through a DNS name rebound to it (default: none)",
    )
    p.add_argument(
        ALLOW_OPEN_API_FLAG,
        action="store_true",
        help="listen on an address other than loopback without an API key (refused otherwise)",
    )
    p.add_argument(
        "--docs",
        action="store_true",
        help="serve /docs (Swagger UI) and /redoc, whose pages load script from cdn.jsdelivr.net into this origin, "
        "and leave them and /openapi.json open without a key (default: off; /openapi.json then needs the key)",
    )


def access_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~server.config.ServerConfig` fields of these options."""
    return {
        "max_body_bytes": args.max_body_bytes,
        "body_read_timeout_s": args.body_read_timeout,
        "keep_alive_timeout_s": args.keep_alive_timeout,
        "max_connections": args.max_connections or None,
        "allowed_hosts": tuple(name.strip() for name in args.allowed_hosts.split(",") if name.strip()),
        "allow_open_api": args.allow_open_api,
        "docs": args.docs,
        "request_limits": RequestLimits(
            max_sequences=args.max_sequences_per_request,
            preparation_threads=args.preparation_threads,
            preparation_queue=args.preparation_queue,
        ),
    }


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` is reachable from this machine only (``localhost`` or a loopback address)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # another name: it may resolve to any interface


def open_api_refusal(host: str, api_keys: Sequence[str], allow_open_api: bool) -> str | None:
    """Why the server must not start (an API without a key on an address others can reach), or None."""
    if api_keys or allow_open_api or is_loopback(host):
        return None
    return (
        f"refusing to serve the API without a key on --host {host}, which other machines can reach: set a key "
        f"(--api-key-file PATH, ${API_KEY_FILE_ENV} or ${API_KEY_ENV}), listen on 127.0.0.1, or pass "
        f"{ALLOW_OPEN_API_FLAG} to serve it open anyway"
    )
