"""Gradient push + pull throughput through a real shard, against raw pyzmq PUSH/PULL.

For vectors of 4, 40 and 160 MB: a one-worker sync job's shard runs in its own process; the
bench process pushes a gradient and pulls the new parameters (2 x size bytes a round; the
shard also applies plain SGD to the slice), and separately streams the same bytes one way
through a bare pyzmq PUSH -> PULL pair (one frame per message, zero-copy). Both on 127.0.0.1.
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from bench.common import job, shard_process
from bench.report import markdown_table, write_result

SIZES_MB = (4, 40, 160)
ROUNDS = {4: 40, 40: 8, 160: 3}
IN, CLASSES = 1000, 10


def hidden_for(mb: int) -> int:
    # MLP in->h->classes holds in*h + h + h*classes + classes parameters.
    return max(1, round((mb * 1e6 / 4 - CLASSES) / (IN + 1 + CLASSES)))


def spec_for(mb: int, rounds: int, *, curve: bool) -> dict[str, object]:
    return job(
        f"transport-{mb}",
        {
            "model": {"builtin": "mlp", "hidden": [hidden_for(mb)]},
            "data": {"builtin": "teacher", "teacher": {"inputDim": IN, "classes": CLASSES}},
            "training": {"maxSteps": rounds + 1, "momentum": 0.0, "lr": 1e-6},
            "workers": {"replicas": 1},
            "security": {"curve": curve},
            "checkpoint": {"every": None},
        },
    )


def sgdjob_rounds(mb: int, rounds: int, workdir: Path, *, curve: bool) -> float:
    """GB/s of push+pull through sgdjob's protocol and a real shard process."""
    from sgdjob.client import ShardClient
    from sgdjob.curvekeys import JobKeys
    from sgdjob.protocol import token_digest
    from sgdjob.transport import CurveClient

    doc = spec_for(mb, rounds, curve=curve)
    size = IN * hidden_for(mb) + hidden_for(mb) + hidden_for(mb) * CLASSES + CLASSES
    keys = JobKeys.generate() if curve else None
    with shard_process(doc, workdir, keys=keys) as endpoint:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        client = ShardClient(
            ctx=ctx,
            addrs=(endpoint,),
            token=token_digest("bench"),
            worker=0,
            timeout_s=300,
            chunk_bytes=4 << 20,
            curve=CurveClient(
                server_public=keys.server_public,
                public=keys.client_public,
                secret=keys.client_secret,
            )
            if keys
            else None,
        )
        client.hello(size, total_steps=rounds + 1)
        params = np.zeros(size, np.float32)
        grads = np.full(size, 1e-3, np.float32)
        versions, _ = client.pull(params, min_version=0)  # warm-up
        t0 = time.perf_counter()
        for step in range(rounds):
            client.push(grads, versions=versions, step=step)
            versions, _ = client.pull(params, min_version=step + 1)
        elapsed = time.perf_counter() - t0
        client.close()
        ctx.term()
    return 2 * size * 4 * rounds / elapsed / 1e9


def _raw_sink(endpoint: str, messages: int) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    s.connect(endpoint)
    for _ in range(messages):
        s.recv(copy=False)
    s.close()
    ctx.term()


def raw_pyzmq(mb: int, rounds: int) -> float:
    """GB/s of the same bytes (2 x size per round) through a bare PUSH -> PULL pair."""
    size = int(mb * 1e6)
    payload = np.ones(size // 4, np.float32)
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    messages = 2 * rounds
    sink = mp.get_context("spawn").Process(
        target=_raw_sink, args=(f"tcp://127.0.0.1:{port}", messages + 1)
    )
    sink.start()
    s.send(payload, copy=False)  # warm-up and connection set-up
    t0 = time.perf_counter()
    trackers = [s.send(payload, copy=False, track=True) for _ in range(messages)]
    sink.join()
    elapsed = time.perf_counter() - t0
    del trackers
    s.close()
    ctx.term()
    return payload.nbytes * messages / elapsed / 1e9


def main() -> str:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mb in SIZES_MB:
            rounds = ROUNDS[mb]
            plain = sgdjob_rounds(mb, rounds, Path(tmp) / f"{mb}-plain", curve=False)
            curve = sgdjob_rounds(mb, rounds, Path(tmp) / f"{mb}-curve", curve=True)
            raw = raw_pyzmq(mb, rounds)
            rows.append((f"{mb} MB", rounds, plain, curve, raw, plain / raw, curve / raw))
    text = markdown_table(
        [
            "vector",
            "rounds",
            "sgdjob GB/s",
            "sgdjob + CURVE GB/s",
            "raw PUSH/PULL GB/s",
            "ratio",
            "ratio with CURVE",
        ],
        rows,
    )
    text += (
        "\n\nsgdjob's figure includes header validation, the finite check on every "
        "gradient, the shard's SGD update and the copy of received parameters into the "
        "worker's buffer; raw pyzmq only moves bytes. CURVE (on by default) adds "
        "encryption and authentication of every byte."
    )
    write_result(
        "transport",
        "bench/transport: gradient push + pull through a shard vs raw pyzmq (127.0.0.1)",
        text,
    )
    return text


if __name__ == "__main__":
    main()
