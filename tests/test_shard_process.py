"""A live shard process on 127.0.0.1 under attack by malformed and foreign messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from sgdjob.api.validation import parse_job, spec_to_json
from sgdjob.contract import ProcessContract
from sgdjob.protocol import HEADER_SIZE, DType, Header, Op, token_digest
from tests.conftest import job_doc


@pytest.fixture
def live_shard(tmp_path: Path) -> Iterator[dict[str, Any]]:
    job = parse_job(job_doc("attack"))
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(spec_to_json(job.spec))
    c = ProcessContract(
        role="ps",
        index=0,
        job_name="attack",
        spec_path=str(spec_path),
        token="secret",
        output_dir=str(tmp_path),
        bind="tcp://127.0.0.1:0",
        status_bind="127.0.0.1:0",
        ready_file=str(tmp_path / "ready.json"),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "sgdjob", "trainer"], env={**os.environ, **c.to_env()}
    )
    try:
        for _ in range(600):
            if (tmp_path / "ready.json").exists():
                break
            assert proc.poll() is None, "shard died during start-up"
            time.sleep(0.05)
        ready = json.loads((tmp_path / "ready.json").read_text())
        yield {
            "endpoint": ready["endpoint"],
            "status": f"http://127.0.0.1:{ready['statusPort']}/status",
        }
    finally:
        proc.kill()
        proc.wait()


def status(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return dict(json.loads(r.read()))


def test_malformed_and_foreign_frames_are_rejected_counted_and_change_nothing(
    live_shard: dict[str, Any],
) -> None:
    before = status(live_shard["status"])
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(live_shard["endpoint"])
    good = token_digest("secret")
    n = before["totalSteps"]  # unknown before any hello: None
    assert n is None
    size = 64 * 32 + 32 + 32 * 10 + 10

    def push(**kw: Any) -> Header:
        base = dict(
            op=Op.PUSH,
            token=good,
            worker=0,
            offset=0,
            count=size,
            nbytes=size * 4,
            nframes=1,
            dtype=DType.FLOAT32,
        )
        base.update(kw)
        return Header(**base)  # type: ignore[arg-type]

    rng = np.random.default_rng(0)
    bad: list[list[bytes]] = [
        [push().pack()[:40]],  # truncated header
        [b"\x00" * HEADER_SIZE],  # wrong magic
        [push().pack()[:4] + b"\x07\x00" + push().pack()[6:], bytes(size * 4)],  # version 7
        [push(token=token_digest("other-job")).pack(), bytes(size * 4)],  # foreign job
        [push().pack(), bytes(size * 4 - 4)],  # short payload
        [push(offset=3).pack(), bytes(size * 4)],  # wrong offset
        [push(nbytes=size * 4 + 4).pack(), bytes(size * 4 + 4)],  # wrong size
        [push(nframes=2).pack(), bytes(size * 4)],  # missing frame
        *[[rng.bytes(int(rng.integers(1, 300)))] for _ in range(20)],  # random bytes
    ]
    for frames in bad:
        sock.send_multipart(frames)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        after = status(live_shard["status"])
        if sum(after["rejected"].values()) >= len(bad):
            break
        time.sleep(0.1)
    assert sum(after["rejected"].values()) == len(bad)
    assert after["paramsChecksum"] == before["paramsChecksum"]
    assert after["step"] == 0
    assert {"BAD_TOKEN", "BAD_VERSION", "TRUNCATED", "BAD_RANGE"} <= set(after["rejected"])
    sock.close(linger=0)
    ctx.term()
