"""The shard state machine, driven directly with real zmq.Frame payloads (no sockets)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import zmq

from sgdjob.api.validation import parse_job
from sgdjob.protocol import (
    Compression,
    DType,
    ErrorCode,
    Flags,
    Header,
    Op,
    Report,
    parse_header,
    token_digest,
)
from sgdjob.shard import Shard
from sgdjob.slicing import Slice
from sgdjob.stats import ShardStats
from sgdjob.transport import Incoming
from tests.conftest import job_doc

TOKEN = token_digest("t")


class Sent:
    def __init__(self) -> None:
        self.messages: list[tuple[bytes | None, Header, list[bytes]]] = []

    def __call__(
        self,
        header: Header,
        payload: Any = (),
        *,
        identity: bytes | None = None,
        track: bool = False,
    ) -> None:
        self.messages.append((identity, header, [bytes(p) for p in payload]))


def make_shard(
    count: int = 6, steps: int = 3, workers: int = 2, trainable: int | None = None, **spec: Any
) -> tuple[Shard, Sent]:
    """A shard of one ``count``-element slice (``trainable`` of them; the rest are buffers),
    after every worker's HELLO."""
    doc = job_doc(workers={"replicas": workers}, **spec)
    job = parse_job(doc)
    sent = Sent()
    n = workers + job.spec.training.backup_workers
    shard = Shard(
        spec=job.spec,
        slice_=Slice(0, 0, count),
        initial=np.ones(count, np.float32),
        total_size=count,
        token=TOKEN,
        send=sent,
        stats=ShardStats(shard=0, workers=n, mode=job.spec.training.mode),
        incarnation=7,
        chunk_bytes=8,
        trainable=trainable,
    )
    for w in range(n):
        shard.handle(
            msg(
                Header(op=Op.HELLO, token=TOKEN, worker=w, step=steps, aux=float(count)),
                ident=b"w%d" % w,
            )
        )
    sent.messages.clear()
    return shard, sent


def msg(h: Header, frames: list[bytes] = (), ident: bytes = b"peer") -> Incoming:  # type: ignore[assignment]
    return Incoming(identity=ident, header=h.pack(), frames=[zmq.Frame(f) for f in frames])


def push(
    worker: int,
    grad: np.ndarray,
    version: int,
    *,
    token: bytes = TOKEN,
    chunks: int = 2,
    step: int | None = None,
) -> Incoming:
    parts = [p.tobytes() for p in np.array_split(grad.astype(np.float32), chunks)]
    h = Header(
        op=Op.PUSH,
        token=token,
        worker=worker,
        version=version,
        step=version if step is None else step,
        offset=0,
        count=grad.size,
        nbytes=grad.size * 4,
        nframes=len(parts),
        dtype=DType.FLOAT32,
    )
    return msg(h, parts, ident=b"w%d" % worker)


def test_a_sync_step_closes_when_every_worker_pushed_and_applies_the_average() -> None:
    shard, _sent = make_shard(training={"momentum": 0.0, "lr": 0.5})
    g0, g1 = np.arange(6, dtype=np.float32), np.full(6, 2.0, np.float32)
    shard.handle(push(0, g0, 0))
    assert shard.version == 0
    shard.handle(push(1, g1, 0))
    assert shard.version == 1
    np.testing.assert_array_equal(shard.params, np.ones(6, np.float32) - 0.5 * (g0 + g1) / 2)


def test_a_pull_for_a_future_version_waits_until_the_step_closes() -> None:
    shard, sent = make_shard()
    shard.handle(msg(Header(op=Op.PULL, token=TOKEN, worker=0, version=1), ident=b"w0"))
    assert not sent.messages
    shard.handle(push(0, np.ones(6), 0))
    shard.handle(push(1, np.ones(6), 0))
    ((ident, h, frames),) = sent.messages
    assert ident == b"w0" and h.op == Op.PARAMS and h.version == 1
    assert np.frombuffer(b"".join(frames), np.float32).tobytes() == shard.params.tobytes()


def test_late_gradients_of_a_closed_step_are_dropped_with_backup_workers() -> None:
    shard, _ = make_shard(workers=2, training={"backupWorkers": 1})
    shard.handle(push(2, np.ones(6), 0))
    shard.handle(push(0, np.ones(6), 0))
    assert shard.version == 1  # the first 2 of 3 close the step
    before = shard.params.copy()
    shard.handle(push(1, np.full(6, 100.0), 0))
    np.testing.assert_array_equal(shard.params, before)
    assert shard.stats.workers[1].dropped == 1


def test_replayed_steps_this_shard_already_closed_are_dropped_not_applied_again() -> None:
    # Another shard restored an older checkpoint (version 0): the workers replay steps 0 and 1,
    # pulling this healthy shard's newest version (2) for them. Applying them here again
    # would train this slice twice on the same batches.
    shard, _ = make_shard(steps=10)
    for step in (0, 1):
        shard.handle(push(0, np.ones(6), step))
        shard.handle(push(1, np.ones(6), step))
    assert shard.version == 2
    before = shard.params.copy()
    for step in (0, 1):
        shard.handle(push(0, np.full(6, 5.0), 2, step=step))
        shard.handle(push(1, np.full(6, 5.0), 2, step=step))
    assert shard.version == 2
    np.testing.assert_array_equal(shard.params, before)
    assert shard.stats.workers[0].dropped == 2
    shard.handle(push(0, np.ones(6), 2))  # the replay caught up: step 2 is new here
    shard.handle(push(1, np.ones(6), 2))
    assert shard.version == 3


def restored_shard(state_extra: dict[str, Any], *, version: int, steps: int = 4) -> Shard:
    """A 2-worker sync shard restored from a checkpoint at ``version``; only worker 0 greets."""
    from sgdjob.checkpoint import ShardState

    job = parse_job(job_doc(workers={"replicas": 2}))
    shard = Shard(
        spec=job.spec,
        slice_=Slice(0, 0, 6),
        initial=np.ones(6, np.float32),
        total_size=6,
        token=TOKEN,
        send=Sent(),
        stats=ShardStats(shard=0, workers=2, mode="sync"),
        incarnation=8,
        chunk_bytes=8,
    )
    arrays = {"params": np.ones(6, np.float32), "momentum": np.zeros(6, np.float32)}
    shard.restore(
        ShardState(
            shard=0,
            offset=0,
            count=6,
            version=version,
            total_steps=steps,
            arrays=arrays,
            extra=state_extra,
        )
    )
    hello = Header(op=Op.HELLO, token=TOKEN, worker=0, step=steps, aux=6.0)
    shard.handle(msg(hello, ident=b"w0"))
    return shard


def test_a_done_worker_is_in_the_checkpoint_and_steps_close_without_it_after_a_restore() -> None:
    shard, _ = make_shard(steps=4)
    shard.handle(push(0, np.ones(6), 0))
    shard.handle(push(1, np.ones(6), 0))
    shard.handle(msg(Header(op=Op.DONE, token=TOKEN, worker=1), ident=b"w1"))
    state = shard.state()
    assert state.extra["exited"] == [1]
    restored = restored_shard(state.extra, version=state.version)
    sent = restored.send
    assert isinstance(sent, Sent)
    for step in (1, 2, 3):  # worker 1 is gone: worker 0 alone closes the replayed steps
        restored.handle(push(0, np.ones(6), step))
        assert restored.version == step + 1
    final = Header(op=Op.PULL, token=TOKEN, worker=0, flags=Flags.FINISHED, step=9)
    restored.handle(msg(final, ident=b"w0"))
    assert sent.messages[-1][1].op == Op.PARAMS
    assert sent.messages[-1][1].flags & Flags.FINISHED


def test_workers_the_executor_saw_succeed_count_as_done() -> None:
    shard = restored_shard({}, version=3)
    final = Header(op=Op.PULL, token=TOKEN, worker=0, flags=Flags.FINISHED, step=9)
    shard.handle(msg(final, ident=b"w0"))
    sent = shard.send
    assert isinstance(sent, Sent)
    assert not [m for m in sent.messages if m[1].op == Op.PARAMS]  # waits for worker 1 ...
    shard.workers_exited([1])  # ... until the executor says worker 1 succeeded
    assert [m[1].op for m in sent.messages][-1] == Op.PARAMS
    assert sent.messages[-1][1].flags & Flags.FINISHED


def test_a_done_worker_whose_gradient_is_pending_still_counts_for_that_step() -> None:
    shard, _ = make_shard(steps=1, training={"momentum": 0.0, "lr": 1.0})
    shard.handle(push(1, np.full(6, 2.0), 0))
    shard.handle(msg(Header(op=Op.DONE, token=TOKEN, worker=1), ident=b"w1"))
    assert shard.version == 0  # not closed on worker 1's gradient alone
    shard.handle(push(0, np.zeros(6), 0))
    assert shard.version == 1
    np.testing.assert_array_equal(shard.params, np.zeros(6, np.float32))  # 1 - (2 + 0) / 2


def test_a_re_sent_pull_already_answered_with_an_update_gets_the_same_bytes_once() -> None:
    from sgdjob.compression import decode_into

    shard, sent = make_shard(
        count=16,
        steps=10,
        workers=1,
        training={"mode": "async"},
        compression={"kind": "onebit", "bucketSize": 8, "serverToWorker": True},
    )

    def pull(seq: int) -> Header:
        shard.handle(msg(Header(op=Op.PULL, token=TOKEN, worker=0, step=seq), ident=b"w0"))
        return sent.messages[-1][1]

    assert not pull(1).flags & Flags.DELTA  # the first answer is the full parameters
    held = np.frombuffer(b"".join(sent.messages[-1][2]), np.float32).copy()
    bits = np.zeros(2, np.uint8)
    scales = np.array([[-0.5, 0.5], [-0.5, 0.5]], np.float32)
    h = Header(
        op=Op.PUSH,
        token=TOKEN,
        worker=0,
        step=0,
        count=16,
        nbytes=bits.nbytes + scales.nbytes,
        nframes=2,
        dtype=DType.ONEBIT,
        compression=Compression.ONEBIT,
        bucket_size=8,
    )
    shard.handle(msg(h, [bits.tobytes(), scales.tobytes()], ident=b"w0"))
    assert pull(2).flags & Flags.DELTA
    first = sent.messages[-1][2]
    assert pull(2).flags & Flags.DELTA  # the worker re-sent it: its answer seemed slow
    assert sent.messages[-1][2] == first  # the same update, encoded once
    # The worker applies one of the two identical answers: the mirror must match it.
    decode_into(
        held,
        np.frombuffer(first[0], np.uint8),
        np.frombuffer(first[1], np.float32),
        count=16,
        bucket_size=8,
    )
    np.testing.assert_array_equal(shard.downlink.mirrors[0].mirror, held)


def test_the_final_pull_is_answered_only_when_training_is_over() -> None:
    shard, sent = make_shard(steps=1)
    shard.handle(msg(Header(op=Op.PULL, token=TOKEN, worker=0, flags=Flags.FINISHED), ident=b"w0"))
    assert not sent.messages
    shard.handle(push(0, np.ones(6), 0))
    shard.handle(push(1, np.ones(6), 0))
    assert sent.messages[0][1].flags & Flags.FINISHED


def test_async_applies_each_gradient_and_records_staleness() -> None:
    shard, _ = make_shard(
        training={"mode": "async", "momentum": 0.0, "lr": 1.0, "staleness": "zhang"}
    )
    shard.handle(push(0, np.ones(6), 0))
    shard.handle(push(1, np.ones(6), 0))  # tau = 1 -> factor 1
    shard.handle(push(0, np.ones(6), 0))  # tau = 2 -> factor 1/2
    np.testing.assert_allclose(shard.params, 1 - 1 - 1 - 0.5)
    assert list(shard.stats.staleness) == [0, 1, 2]


def test_max_staleness_drops_exactly_the_gradients_above_it() -> None:
    shard, _ = make_shard(training={"mode": "async", "maxStaleness": 1})
    for _ in range(4):
        shard.handle(push(0, np.ones(6), 0))  # tau = 0, 1, 2, 3 ... but drops do not advance
    # tau 0 and 1 applied (version 2); then tau 2 twice: both dropped.
    assert shard.version == 2
    assert shard.stats.workers[0].dropped == 2


BAD = {
    "truncated header": lambda: Incoming(b"x", push(0, np.ones(6), 0).header[:50], []),
    "random bytes": lambda: Incoming(b"x", bytes(range(96)), []),
    "wrong token": lambda: push(0, np.ones(6), 0, token=token_digest("other")),
    "missing frame": lambda: Incoming(
        b"x", push(0, np.ones(6), 0).header, push(0, np.ones(6), 0).frames[:1]
    ),
    "wrong offset": lambda: msg(
        Header(
            op=Op.PUSH,
            token=TOKEN,
            worker=0,
            offset=1,
            count=6,
            nbytes=24,
            nframes=1,
            dtype=DType.FLOAT32,
        ),
        [bytes(24)],
    ),
    "wrong size": lambda: msg(
        Header(
            op=Op.PUSH, token=TOKEN, worker=0, count=6, nbytes=20, nframes=1, dtype=DType.FLOAT32
        ),
        [bytes(20)],
    ),
    "nan": lambda: push(0, np.full(6, np.nan), 0),
    "unknown worker": lambda: push(9, np.ones(6), 0),
    "future version": lambda: push(0, np.ones(6), 5),
    "bad report": lambda: msg(
        Header(op=Op.REPORT, token=TOKEN, worker=0, nframes=1, nbytes=3), [b"abc"]
    ),
    "reply op": lambda: msg(Header(op=Op.PARAMS, token=TOKEN, worker=0)),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_message_is_rejected_counted_and_never_touches_parameters(name: str) -> None:
    shard, sent = make_shard()
    before = shard.checksum()
    shard.handle(BAD[name]())
    assert shard.checksum() == before
    assert sum(shard.stats.rejected.values()) == 1
    for _, h, _ in sent.messages:  # any reply is an ERROR, never data
        assert h.op == Op.ERROR and h.error != ErrorCode.OK


def test_a_report_reaches_the_coordinator_stats() -> None:
    shard, _ = make_shard()
    r = Report(
        step=3,
        loss=0.25,
        step_time=0.5,
        samples=32,
        bytes_sent=1,
        bytes_received=2,
        eval_metric=0.75,
    )
    shard.handle(
        msg(
            Header(op=Op.REPORT, token=TOKEN, worker=1, nframes=1, nbytes=len(r.pack())), [r.pack()]
        )
    )
    st = shard.stats.status()
    assert st["workers"]["1"]["loss"] == 0.25 and st["accuracy"] == 0.75
    assert st["workers"]["1"]["stepTime"] == 0.5


def test_a_worker_with_a_different_model_is_refused() -> None:
    shard, sent = make_shard()
    shard.handle(msg(Header(op=Op.HELLO, token=TOKEN, worker=0, step=3, aux=7.0)))
    assert parse_header(sent.messages[0][1].pack(), token=TOKEN).error == ErrorCode.BAD_SIZE


def test_a_hello_with_a_fractional_parameter_count_is_refused() -> None:
    shard, sent = make_shard()
    shard.handle(msg(Header(op=Op.HELLO, token=TOKEN, worker=0, step=3, aux=6.5)))
    assert parse_header(sent.messages[0][1].pack(), token=TOKEN).error == ErrorCode.BAD_SIZE
