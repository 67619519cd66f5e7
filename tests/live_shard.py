"""A real shard process on 127.0.0.1 for tests that attack it over real sockets."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zmq

from sgdjob.api.types import SGDJobSpec
from sgdjob.api.validation import spec_to_json
from sgdjob.contract import ProcessContract, with_curve
from sgdjob.curvekeys import JobKeys

KEYS = JobKeys.generate()  # this test session's job keys


STARTUP_S = 180.0


@contextlib.contextmanager
def shard_process(spec: SGDJobSpec, tmp_path: Path, *, token: str) -> Iterator[dict[str, Any]]:
    """Shard 0 of ``spec`` with CURVE keys ``KEYS``; yields endpoint, status URL and process."""
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(spec_to_json(spec))
    ready_file = tmp_path / "ready.json"
    c = ProcessContract(
        role="ps",
        index=0,
        job_name="live",
        spec_path=str(spec_path),
        token=token,
        output_dir=str(tmp_path),
        bind="tcp://127.0.0.1:0",
        status_bind="127.0.0.1:0",
        ready_file=str(ready_file),
    )
    c = with_curve(c, KEYS.__dict__)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sgdjob", "trainer"], env={**os.environ, **c.to_env()}
    )
    try:
        # Start-up imports torch: seconds alone, minutes on a machine loaded to ten or more.
        deadline = time.monotonic() + STARTUP_S
        while not ready_file.exists():
            assert proc.poll() is None, "shard died during start-up"
            assert time.monotonic() < deadline, f"shard not ready after {STARTUP_S:.0f}s"
            time.sleep(0.05)
        ready = json.loads(ready_file.read_text())
        yield {
            "endpoint": ready["endpoint"],
            "status": f"http://127.0.0.1:{ready['statusPort']}/status?checksum=1",
            "proc": proc,
        }
    finally:
        proc.kill()
        proc.wait()


def status(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return dict(json.loads(r.read()))


def curve_client(sock: zmq.Socket, keys: JobKeys = KEYS) -> None:
    """Give a socket ``keys``' client pair (the job's own by default: an insider)."""
    sock.curve_serverkey = keys.server_public.encode()
    sock.curve_publickey = keys.client_public.encode()
    sock.curve_secretkey = keys.client_secret.encode()
