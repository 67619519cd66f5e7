"""A live shard process on 127.0.0.1 under attack by malformed and foreign messages."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from sgdjob.api.validation import parse_job
from sgdjob.curvekeys import JobKeys
from sgdjob.protocol import HEADER_SIZE, DType, Header, Op, parse_header, token_digest
from tests.conftest import job_doc
from tests.live_shard import KEYS, curve_client, shard_process, status


def dealer(ctx: zmq.Context, endpoint: str, keys: JobKeys | None = KEYS) -> zmq.Socket:
    """A DEALER to the shard, holding ``keys``' client pair (None: no CURVE at all)."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if keys is not None:
        curve_client(sock, keys)
    sock.connect(endpoint)
    return sock


@pytest.fixture
def live_shard(tmp_path: Path) -> Iterator[dict[str, Any]]:
    with shard_process(parse_job(job_doc("attack")).spec, tmp_path, token="secret") as live:
        yield live


def test_malformed_and_foreign_frames_are_rejected_counted_and_change_nothing(
    live_shard: dict[str, Any],
) -> None:
    ctx = zmq.Context()
    sock = dealer(ctx, live_shard["endpoint"])  # an insider: it holds the job's keys
    good = token_digest("secret")
    # Say hello first, so the malformed pushes below reach the deeper checks.
    sock.send_multipart(hello())
    assert sock.poll(10_000, zmq.POLLIN)
    sock.recv_multipart()
    before = status(live_shard["status"])
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


def wait_rejections(url: str, at_least: int, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        s = status(url)
        if sum(s["rejected"].values()) >= at_least or time.monotonic() > deadline:
            return s


def hello(total_steps: int = 60) -> list[bytes]:
    size = 64 * 32 + 32 + 32 * 10 + 10
    return [
        Header(
            op=Op.HELLO, token=token_digest("secret"), worker=0, step=total_steps, aux=float(size)
        ).pack()
    ]


@pytest.mark.parametrize("who", ["no CURVE at all", "another job's keys", "a stolen server key"])
def test_a_client_without_the_jobs_key_gets_no_message_accepted(
    live_shard: dict[str, Any], who: str
) -> None:
    before = status(live_shard["status"])
    ctx = zmq.Context()
    other = JobKeys.generate()
    keys = {
        "no CURVE at all": None,
        "another job's keys": other,
        # Knows the shards' public key (not secret) but holds its own client pair.
        "a stolen server key": JobKeys(
            server_public=KEYS.server_public,
            server_secret="",
            client_public=other.client_public,
            client_secret=other.client_secret,
        ),
    }[who]
    sock = dealer(ctx, live_shard["endpoint"], keys)
    for _ in range(3):
        sock.send_multipart(hello())  # a perfectly valid request, token and all
    assert not sock.poll(1500, zmq.POLLIN)  # no WELCOME: nothing got through
    after = wait_rejections(live_shard["status"], 1)
    assert any(k.startswith("HANDSHAKE") for k in after["rejected"])
    assert after["workers"]["0"]["hellos"] == 0
    assert after["paramsChecksum"] == before["paramsChecksum"]
    # The job's own worker still gets in.
    good = dealer(ctx, live_shard["endpoint"])
    good.send_multipart(hello())
    assert good.poll(10_000, zmq.POLLIN)
    reply = parse_header(good.recv_multipart()[0], token=token_digest("secret"))
    assert reply.op == Op.WELCOME
    sock.close()
    good.close()
    ctx.term()
