"""Serving the dashboard with uvicorn: on its own (``pgdurable dashboard``) or beside a worker
in one event loop (``pgdurable up``)."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Iterator

import uvicorn

from .app import LOOPBACK_HOSTS, DashboardConfig, create_app

DEFAULT_PORT = 8787


class _QuietServer(uvicorn.Server):
    """A uvicorn server that leaves the process's signal handlers alone: beside a worker, the
    worker's handlers stop both."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str, extra: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """The Host headers to answer when bound to ``host``: on loopback, the loopback names,
    ``host`` itself and the ``extra`` names (a TLS proxy's public name, say), so that a web
    page elsewhere cannot reach the dashboard by DNS rebinding; on another address, the
    ``extra`` names if any were given, else any."""
    if is_loopback(host):
        return tuple(dict.fromkeys((*LOOPBACK_HOSTS, host, *extra)))
    return extra or None


def make_server(
    config: DashboardConfig, host: str, port: int, embedded: bool = False
) -> uvicorn.Server:
    """A uvicorn server for the dashboard; ``embedded``: one that runs in an event loop of
    someone else's (``await server.serve()``), leaving signals to it."""
    uv_config = uvicorn.Config(
        create_app(config),
        host=host,
        port=port,
        log_level="warning",
        # The access log would be the only place a path shows: paths hold no secrets, but
        # there is no need for a line per refresh either.
        access_log=False,
        server_header=False,
        lifespan="on",
    )
    return (_QuietServer if embedded else uvicorn.Server)(uv_config)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port``, bound now, so that a port in use is an error
    at start rather than later in the server's task. Raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def url(host: str, port: int) -> str:
    """The dashboard's address, for people."""
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{port}/"
