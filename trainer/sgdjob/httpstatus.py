"""The coordinator's HTTP endpoint: GET /status (JSON), /metrics (Prometheus), /healthz.

``/status?checksum=1`` adds ``paramsChecksum`` (CRC-32 of the shard's parameters), which costs
a pass over the slice and is therefore not computed for the executors' regular polls.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sgdjob.stats import prometheus_text


def serve_status(
    bind: str, *, status: Callable[[bool], dict[str, Any]], job: str
) -> tuple[ThreadingHTTPServer, int]:
    """Start a daemon HTTP server on ``host:port`` (port 0 picks one); returns it and the port."""
    host, _, port = bind.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
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

    server = ThreadingHTTPServer((host or "0.0.0.0", int(port)), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="status-http", daemon=True).start()
    return server, int(server.server_address[1])
