"""Transport set-up: I/O threads per peer, the options every socket gets, zero-copy frames."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

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


# Receives 6 rounds of 10 x 4 MiB frames over loopback TCP and prints the page faults the
# process took during the last 5 (the first round may fault the heap in once).
_FAULTS = textwrap.dedent(
    """
    import resource, sys
    import numpy as np, zmq
    from sgdjob.transport import make_context, vector_frames
    ctx = make_context() if sys.argv[1] == "tuned" else zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push.connect(f"tcp://127.0.0.1:{port}")
    frames = vector_frames(np.ones(10 << 20, np.float32))
    faults = 0
    for r in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        push.send_multipart(frames, copy=False)
        got = pull.recv_multipart(copy=False)
        assert sum(len(f.buffer) for f in got) == 40 << 20
        del got
        if r:
            faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(faults)
    push.close(linger=0); pull.close(linger=0); ctx.term()
    """
)


def _python(code: str, *args: str, env: dict[str, str] | None = None) -> str:
    """What a fresh interpreter running ``code`` prints."""
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env=env,
    )
    return out.stdout.strip()


def _receive_faults(mode: str) -> int:
    return int(_python(_FAULTS, mode))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_tuned_process_receives_the_same_frames_again_without_page_faults() -> None:
    # 5 rounds of 40 MiB are 51,200 pages: glibc's defaults fault most of them in again, the
    # tuned allocator reuses the freed buffers. The bound leaves room for the interpreter.
    tuned, plain = _receive_faults("tuned"), _receive_faults("plain")
    assert tuned < 2000 < plain, (tuned, plain)


def test_the_allocator_is_left_alone_when_the_user_tuned_malloc() -> None:
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": str(128 << 10)}
    code = "from sgdjob.transport import keep_freed_buffers; print(keep_freed_buffers())"
    assert _python(code, env=env) == "False"


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
