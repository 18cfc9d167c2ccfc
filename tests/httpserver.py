"""A small local HTTP server for tests of HTTP steps (no internet needed).

    with LocalHttpServer() as server:                  # 127.0.0.1, ephemeral port
        server.reply("/ok", body=b'{"a":1}', headers=[("Content-Type", "application/json")])
        server.redirect("/go", "/ok")
        server.hang("/never")
        url = server.url("/ok")                        # http://127.0.0.1:<port>/ok
        ...
        assert [r.method for r in server.hits("/ok")] == ["GET"]

Each path gets one behaviour (``reply``, ``hang``, ``garbage``, ``huge``, ``redirect``);
unregistered paths answer 404. Every request is recorded (method, path with query, headers in
the order received, body) before it is answered, so a test can assert that a refused target
was never contacted. Request bodies are read by Content-Length (which httpx always sends).
Pass ``host="::1"`` for an IPv6 server. Responses always close the connection.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

__all__ = ["LocalHttpServer", "Recorded", "Route"]


@dataclass(frozen=True)
class Recorded:
    """A request the server received."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """The last value of header ``name`` (case-insensitive), or None."""
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return values[-1] if values else None


@dataclass
class Route:
    """How the server answers one path.

    ``mode``: 'reply' (status, headers, body after ``delay`` seconds), 'hang' (read the
    request, never answer), 'garbage' (raw non-HTTP bytes), 'huge' (``size`` bytes of body,
    chunked unless ``content_length``). ``headers`` values may be bytes (sent verbatim, e.g.
    non-UTF-8). ``sent`` counts the body bytes written so far (for 'huge').
    """

    mode: str = "reply"
    status: int = 200
    headers: list[tuple[str, str | bytes]] = field(default_factory=list)
    body: bytes = b""
    delay: float = 0.0
    size: int = 0
    content_length: bool = False
    sent: int = 0


class LocalHttpServer:
    """A threaded HTTP/1.1 server on an ephemeral local port; a context manager."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.routes: dict[str, Route] = {}
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = _Server(host, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return int(self._server.server_address[1])

    def url(self, path: str = "/") -> str:
        """The absolute URL of ``path`` on this server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"

    def start(self) -> LocalHttpServer:
        """Start serving in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; handlers that hang or sleep are released."""
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> LocalHttpServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def reply(
        self,
        path: str,
        status: int = 200,
        body: bytes | str = b"",
        headers: list[tuple[str, str | bytes]] | None = None,
        delay: float = 0.0,
    ) -> Route:
        """Answer ``path`` with ``status``, ``headers`` and ``body`` (Content-Length added)."""
        data = body.encode() if isinstance(body, str) else body
        return self._add(path, Route(status=status, headers=headers or [], body=data, delay=delay))

    def hang(self, path: str) -> Route:
        """Read requests to ``path`` and never answer them."""
        return self._add(path, Route(mode="hang"))

    def garbage(self, path: str, data: bytes = b"this is not HTTP at all\r\n\r\n") -> Route:
        """Answer ``path`` with raw bytes that are not an HTTP response."""
        return self._add(path, Route(mode="garbage", body=data))

    def huge(self, path: str, size: int, content_length: bool = False) -> Route:
        """Answer ``path`` with a ``size``-byte body, chunked unless ``content_length``."""
        return self._add(path, Route(mode="huge", size=size, content_length=content_length))

    def redirect(self, path: str, location: str, status: int = 302) -> Route:
        """Answer ``path`` with a redirect to ``location`` (sent verbatim)."""
        return self._add(path, Route(status=status, headers=[("Location", location)]))

    def hits(self, path: str) -> list[Recorded]:
        """The recorded requests for ``path`` (query string ignored)."""
        with self._lock:
            return [r for r in self.requests if r.path.split("?", 1)[0] == path]

    def _add(self, path: str, route: Route) -> Route:
        self.routes[path] = route
        return route

    def _record(self, request: Recorded) -> None:
        with self._lock:
            self.requests.append(request)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # hanging handlers must not block stop()

    def __init__(self, host: str, owner: LocalHttpServer) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.owner = owner
        super().__init__((host, 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output clean

    def _handle(self) -> None:
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        owner._record(Recorded(self.command, self.path, list(self.headers.items()), body))
        self.close_connection = True
        route = owner.routes.get(self.path.split("?", 1)[0])
        if route is None:
            route = Route(status=404, body=b"not found")
        if route.mode == "hang":
            owner._stopping.wait()
            return
        if route.mode == "garbage":
            self.wfile.write(route.body)
            return
        if route.delay and owner._stopping.wait(route.delay):
            return
        if route.mode == "huge":
            self._huge(route)
            return
        self.send_response_only(route.status)
        for name, value in route.headers:
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            self.send_header(name, text)
        self.send_header("Content-Length", str(len(route.body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(route.body)

    def _huge(self, route: Route) -> None:
        self.send_response_only(200)
        self.send_header("Content-Type", "application/octet-stream")
        if route.content_length:
            self.send_header("Content-Length", str(route.size))
        else:
            self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        chunk = b"x" * 65536
        try:
            while route.sent < route.size and not self.server.owner._stopping.is_set():
                piece = chunk[: route.size - route.sent]
                if route.content_length:
                    self.wfile.write(piece)
                else:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                route.sent += len(piece)
                time.sleep(0)  # let the client side run in between
            if not route.content_length:
                self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client stopped reading and closed the connection

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle
