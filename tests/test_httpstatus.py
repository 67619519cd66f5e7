"""The coordinator's HTTP server under abuse: idle connections, floods, checksum loops."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from sgdjob.httpstatus import CachedChecksum, serve_status
from sgdjob.stats import ShardStats


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, b""


def server(**kw: Any) -> tuple[Any, int, list[bool]]:
    calls: list[bool] = []

    stats = ShardStats(shard=0, workers=1, mode="sync")

    def status(checksum: bool) -> dict[str, Any]:
        calls.append(checksum)
        return stats.status()

    srv, port = serve_status("127.0.0.1:0", status=status, job="t", **kw)
    return srv, port, calls


def test_a_connection_that_sends_nothing_is_closed_after_the_request_timeout() -> None:
    srv, port, _ = server(request_timeout_s=0.5)
    try:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.settimeout(60)
            assert s.recv(1024) == b""  # the server hung up on the silent client
    finally:
        srv.shutdown()


def test_idle_connections_cannot_grow_the_thread_count_past_the_bound() -> None:
    srv, port, _ = server(max_connections=4, request_timeout_s=30)
    before = threading.active_count()
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
    try:
        time.sleep(1.0)
        assert threading.active_count() <= before + 4
        code, _ = get(port, "/healthz")  # every slot is held: refused at once, not queued
        assert code == 503
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 60
    while get(port, "/healthz")[0] != 200:  # slots come back as the idle clients go
        assert time.monotonic() < deadline
        time.sleep(0.1)
    srv.shutdown()


def test_status_and_metrics_still_answer() -> None:
    srv, port, calls = server()
    try:
        code, body = get(port, "/status?checksum=1")
        assert code == 200 and json.loads(body)["step"] == 0
        assert get(port, "/metrics")[0] == 200
        assert get(port, "/nope")[0] == 404
        assert calls[0] is True
    finally:
        srv.shutdown()


def test_the_checksum_is_computed_once_per_parameter_version() -> None:
    version = [0]
    passes: list[int] = []

    def checksum() -> int:
        passes.append(1)
        return 42

    cached = CachedChecksum(checksum, key=lambda: version[0])
    threads = [threading.Thread(target=lambda: [cached() for _ in range(100)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cached() == 42 and len(passes) == 1
    version[0] = 1
    cached()
    assert len(passes) == 2
