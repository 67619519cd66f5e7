"""Transport set-up: I/O threads per peer, the options every socket gets, zero-copy frames."""

from __future__ import annotations

import numpy as np
import pytest
import zmq

from sgdjob.protocol import DType, Header, Op, token_digest
from sgdjob.transport import (
    COPY_THRESHOLD,
    bind_router,
    connect_dealer,
    io_threads_for,
    make_context,
    vector_frames,
)


def test_a_process_gets_one_io_thread_per_peer_but_never_more_than_its_cores() -> None:
    assert io_threads_for(2, cpus=16) == 2
    assert io_threads_for(8, cpus=4) == 4
    assert io_threads_for(1, cpus=1) == 1
    assert io_threads_for(3, cpus=0) == 1
    assert 1 <= io_threads_for(1000) <= 64
    with pytest.raises(ValueError, match="peers"):
        io_threads_for(0)


def test_a_context_has_the_io_threads_asked_for_and_refuses_nonsense() -> None:
    ctx = make_context(io_threads=3)
    try:
        assert ctx.get(zmq.IO_THREADS) == 3
    finally:
        ctx.term()
    for bad in (0, 65, 2.5):
        with pytest.raises(ValueError, match="io_threads"):
            make_context(io_threads=bad)  # type: ignore[arg-type]


def test_both_ends_share_the_options_and_large_frames_arrive_intact() -> None:
    ctx = make_context(io_threads=2)
    router, endpoint = bind_router(ctx, "tcp://127.0.0.1:0")
    dealer = connect_dealer(ctx, endpoint)
    try:
        for ep in (router, dealer):
            assert ep.sock.copy_threshold == COPY_THRESHOLD
            assert ep.sock.getsockopt(zmq.SNDHWM) == 0 and ep.sock.getsockopt(zmq.RCVHWM) == 0
        # Zero-copy frames (>= COPY_THRESHOLD) and copied ones (< it) in one message.
        vec = np.arange(300_000, dtype=np.float32)
        frames = [*vector_frames(vec, 1 << 20), memoryview(b"small")]
        header = Header(op=Op.PUSH, token=token_digest("t"), nbytes=vec.nbytes, dtype=DType.FLOAT32)
        tracker = dealer.send(header, frames, track=True)
        assert router.poll(10_000)
        msg = router.recv()
        assert tracker is not None
        tracker.wait(10)
        assert msg is not None and msg.header == header.pack()
        got = b"".join(bytes(f.buffer) for f in msg.frames)
        assert got == vec.tobytes() + b"small"
    finally:
        dealer.close(0)
        router.close(0)
        ctx.term()
