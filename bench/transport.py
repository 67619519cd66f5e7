"""Gradient push + pull throughput through a real shard, against raw pyzmq moving the same bytes.

For vectors of 4, 40 and 160 MB, with CURVE off and on, four paths run side by side, each in
its own server process on 127.0.0.1, and are timed in interleaved blocks (the order rotates
from block to block), so every ratio compares figures taken under the same machine load:

- sgdjob: a one-worker sync job's shard; a ``ShardClient`` pushes a gradient and pulls the new
  parameters (the shard checks the gradient, applies plain SGD to its slice and answers).
- raw: a bare pyzmq ROUTER that answers each request with a reply of the same size from its
  own buffer; a DEALER sends the request and waits for the reply.

Both move the same bytes the same way: a request of ``size`` bytes, then a reply of ``size``
bytes, cut into frames of ``transport.DEFAULT_CHUNK_BYTES``, sent zero-copy, one round trip
at a time; both count 2 x size bytes a round. raw with CURVE uses the same kind of keys (its
server admits any client: no ZAP handler, which costs nothing per byte anyway).

``python -m bench.transport --smoke`` runs a few rounds of the small sizes and writes nothing.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from bench.common import job, shard_process
from bench.report import markdown_table, write_result

SIZES_MB = (4, 40, 160)
ROUNDS = {4: 20, 40: 4, 160: 2}  # rounds per block
BLOCKS = 5
IN, CLASSES = 1000, 10
PATHS = ("sgdjob", "raw", "sgdjob+curve", "raw+curve")


def hidden_for(mb: int) -> int:
    # MLP in->h->classes holds in*h + h + h*classes + classes parameters.
    return max(1, round((mb * 1e6 / 4 - CLASSES) / (IN + 1 + CLASSES)))


def params_for(mb: int) -> int:
    h = hidden_for(mb)
    return IN * h + h + h * CLASSES + CLASSES


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


Round = Callable[[int], None]


@contextmanager
def sgdjob_path(mb: int, total_rounds: int, workdir: Path, *, curve: bool) -> Iterator[Round]:
    """One push + pull round through sgdjob's protocol and a real shard process."""
    from sgdjob.client import ShardClient
    from sgdjob.curvekeys import JobKeys
    from sgdjob.protocol import token_digest
    from sgdjob.transport import (
        DEFAULT_CHUNK_BYTES,
        CurveClient,
        io_threads_for,
        make_context,
    )

    doc = spec_for(mb, total_rounds, curve=curve)
    size = params_for(mb)
    keys = JobKeys.generate() if curve else None
    with shard_process(doc, workdir, keys=keys) as endpoint:
        ctx = make_context(io_threads=io_threads_for(1))
        client = ShardClient(
            ctx=ctx,
            addrs=(endpoint,),
            token=token_digest("bench"),
            worker=0,
            timeout_s=300,
            chunk_bytes=DEFAULT_CHUNK_BYTES,
            curve=CurveClient(
                server_public=keys.server_public,
                public=keys.client_public,
                secret=keys.client_secret,
            )
            if keys
            else None,
        )
        client.hello(size, total_steps=total_rounds + 1)
        params = np.zeros(size, np.float32)
        grads = np.full(size, 1e-3, np.float32)
        versions, _ = client.pull(params, min_version=0)  # connection and handshake
        state = {"versions": versions}

        def one_round(step: int) -> None:
            client.push(grads, versions=state["versions"], step=step)
            state["versions"], _ = client.pull(params, min_version=step + 1)

        try:
            yield one_round
        finally:
            client.close()
            ctx.term()


def _raw_server(port_q: Any, nbytes: int, chunk: int, curve: tuple[bytes, bytes] | None) -> None:
    """ROUTER that answers every request with ``nbytes`` of its own, in ``chunk``-byte frames."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    if curve is not None:
        s.curve_publickey, s.curve_secretkey = curve
        s.curve_server = True
    s.sndhwm = s.rcvhwm = 0
    port_q.put(s.bind_to_random_port("tcp://127.0.0.1"))
    from sgdjob.transport import vector_frames  # the frames policy sgdjob sends with

    frames = vector_frames(np.ones(nbytes // 4, np.float32), chunk)
    while True:
        parts = s.recv_multipart(copy=False)
        if len(parts) == 2 and parts[1].bytes == b"stop":
            break
        s.send_multipart([parts[0], b"params", *frames], copy=False)
    s.close(linger=0)
    ctx.term()


@contextmanager
def raw_path(mb: int, *, curve: bool) -> Iterator[Round]:
    """One request + reply of the same bytes and frames through bare pyzmq sockets."""
    from sgdjob.transport import DEFAULT_CHUNK_BYTES, vector_frames

    nbytes = params_for(mb) * 4
    server_keys = zmq.curve_keypair() if curve else None
    spawn = mp.get_context("spawn")
    port_q = spawn.Queue()
    server = spawn.Process(
        target=_raw_server, args=(port_q, nbytes, DEFAULT_CHUNK_BYTES, server_keys), daemon=True
    )
    server.start()
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.sndhwm = s.rcvhwm = 0
    if server_keys is not None:
        s.curve_serverkey = server_keys[0]
        s.curve_publickey, s.curve_secretkey = zmq.curve_keypair()
    s.connect(f"tcp://127.0.0.1:{port_q.get(timeout=120)}")
    frames = vector_frames(np.full(nbytes // 4, 1e-3, np.float32), DEFAULT_CHUNK_BYTES)

    def one_round(step: int) -> None:
        s.send_multipart([b"push", *frames], copy=False)
        reply = s.recv_multipart(copy=False)
        if sum(len(f.buffer) for f in reply[1:]) != nbytes:
            raise RuntimeError("raw reply of the wrong size")

    try:
        one_round(-1)  # connection and handshake
        yield one_round
    finally:
        s.send(b"stop")
        server.join(30)
        s.close(linger=0)
        ctx.term()


def measure(mb: int, *, rounds: int, blocks: int, workdir: Path) -> dict[str, float]:
    """GB/s of each path (2 x size bytes a round), from interleaved blocks of ``rounds``."""
    seconds = dict.fromkeys(PATHS, 0.0)
    total = rounds * blocks
    with ExitStack() as stack:
        run: dict[str, Round] = {
            "sgdjob": stack.enter_context(
                sgdjob_path(mb, total, workdir / f"{mb}-plain", curve=False)
            ),
            "raw": stack.enter_context(raw_path(mb, curve=False)),
            "sgdjob+curve": stack.enter_context(
                sgdjob_path(mb, total, workdir / f"{mb}-curve", curve=True)
            ),
            "raw+curve": stack.enter_context(raw_path(mb, curve=True)),
        }
        steps = dict.fromkeys(PATHS, 0)
        for b in range(blocks):
            for name in PATHS[b % len(PATHS) :] + PATHS[: b % len(PATHS)]:
                t0 = time.perf_counter()
                for _ in range(rounds):
                    run[name](steps[name])
                    steps[name] += 1
                seconds[name] += time.perf_counter() - t0
    nbytes = 2 * params_for(mb) * 4 * total
    return {name: nbytes / s / 1e9 for name, s in seconds.items()}


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="bench.transport", description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="4 and 40 MB, 2 blocks of 2 rounds")
    args = ap.parse_args(argv)
    sizes = (4, 40) if args.smoke else SIZES_MB
    blocks = 2 if args.smoke else BLOCKS
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mb in sizes:
            rounds = 2 if args.smoke else ROUNDS[mb]
            g = measure(mb, rounds=rounds, blocks=blocks, workdir=Path(tmp))
            rows.append(
                (
                    f"{mb} MB",
                    rounds * blocks,
                    g["sgdjob"],
                    g["raw"],
                    g["sgdjob"] / g["raw"],
                    g["sgdjob+curve"],
                    g["raw+curve"],
                    g["sgdjob+curve"] / g["raw+curve"],
                    g["sgdjob+curve"] / g["sgdjob"],
                )
            )
    text = markdown_table(
        [
            "vector",
            "rounds",
            "sgdjob GB/s",
            "raw GB/s",
            "ratio",
            "sgdjob+CURVE GB/s",
            "raw+CURVE GB/s",
            "ratio with CURVE",
            "CURVE/plain (sgdjob)",
        ],
        rows,
    )
    text += (
        "\n\nEach round moves 2 x size bytes (push, then pull) in 4 MiB zero-copy frames, one "
        "round trip at a time, on both paths; the four paths are timed in interleaved blocks "
        "in the same run. sgdjob's figure includes header validation, the finite check on "
        "every gradient, the shard's SGD update and the copy of received parameters into the "
        "worker's buffer; raw pyzmq only moves bytes. CURVE (on by default) encrypts and "
        "authenticates every byte, on the ZeroMQ I/O threads."
    )
    if args.smoke:
        print(text)
        return text
    write_result(
        "transport",
        "bench/transport: gradient push + pull through a shard vs raw pyzmq (127.0.0.1)",
        text,
    )
    return text


if __name__ == "__main__":
    main()
