"""The coordinator's HTTP endpoint: GET /status (JSON), /metrics (Prometheus), /healthz.

``/status?checksum=1`` adds ``paramsChecksum`` (CRC-32 of the shard's parameters), which costs
a pass over the slice and is therefore not computed for the executors' regular polls; it is
computed at most once per parameter version (``CachedChecksum``), so asking for it in a loop
costs nothing more than asking once.

The server is unauthenticated and plaintext (see the README's CURVE section), so it must not
be a lever on the shard: at most ``max_connections`` requests are handled at once (each in its
own thread; the one after that gets 503 at once), and a connection that sends nothing for
``request_timeout_s`` is closed.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Hashable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from sgdjob.stats import prometheus_text

MAX_CONNECTIONS = 8
REQUEST_TIMEOUT_S = 5.0
BUSY = b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class CachedChecksum:
    """``compute()`` at most once per ``key()`` (the shard's version), one caller at a time."""

    def __init__(self, compute: Callable[[], int], key: Callable[[], Hashable]) -> None:
        self._compute, self._key = compute, key
        self._lock = threading.Lock()
        self._cached: tuple[Hashable, int] | None = None
        self.computed = 0  # how many passes over the parameters were made

    def __call__(self) -> int:
        with self._lock:
            key = self._key()
            if self._cached is None or self._cached[0] != key:
                self._cached = (key, self._compute())
                self.computed += 1
            return self._cached[1]


class BoundedHTTPServer(HTTPServer):
    """A thread per request, at most ``max_connections`` of them; the rest get 503."""

    daemon_threads = True

    def __init__(self, addr: tuple[str, int], handler: Any, *, max_connections: int) -> None:
        super().__init__(addr, handler)
        self._slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.settimeout(1.0)
                request.sendall(BUSY)
            self.shutdown_request(request)
            return
        t = threading.Thread(target=self._handle, args=(request, client_address), daemon=True)
        t.start()

    def _handle(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        return  # timeouts and resets from clients are not worth a traceback


def serve_status(
    bind: str,
    *,
    status: Callable[[bool], dict[str, Any]],
    job: str,
    max_connections: int = MAX_CONNECTIONS,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
) -> tuple[HTTPServer, int]:
    """Start a daemon HTTP server on ``host:port`` (port 0 picks one); returns it and the port."""
    host, _, port = bind.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        timeout = request_timeout_s  # socket timeout: a silent client is dropped

        def do_GET(self) -> None:
            path, _, query = self.path.partition("?")
            if path == "/status":
                body = json.dumps(status("checksum=1" in query.split("&"))).encode()
                ctype = "application/json"
            elif path == "/metrics":
                body = prometheus_text(status(False), job=job).encode()
                ctype = "text/plain; version=0.0.4"
            elif path == "/healthz":
                body, ctype = b"ok\n", "text/plain"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # quiet: polled every second
            return

    server = BoundedHTTPServer(
        (host or "0.0.0.0", int(port)), Handler, max_connections=max_connections
    )
    threading.Thread(target=server.serve_forever, name="status-http", daemon=True).start()
    return server, int(server.server_address[1])
