"""1-bit gradients on the wire: the shard's checks, buffers as raw float32 next to the 1-bit
trainable part (``sgdjob.onebit_wire``), and whole jobs in every mode."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch
import zmq

from sgdjob.api.types import CompressionSpec
from sgdjob.client import ShardClient
from sgdjob.compression import ErrorFeedback, decode_into, quantize
from sgdjob.onebit_wire import SliceSplit, push_frames
from sgdjob.protocol import Compression, DType, ErrorCode, Flags, Header, Op
from sgdjob.slicing import Slice
from sgdjob.transport import Incoming
from tests.conftest import job_doc
from tests.test_shard import TOKEN, make_shard, msg

BUCKET = 8


def onebit_push(
    worker: int,
    grad: np.ndarray,
    version: int,
    *,
    bits: bytes | None = None,
    scales: bytes | None = None,
    bucket: int = BUCKET,
) -> Incoming:
    enc = quantize(grad.astype(np.float32), bucket)
    b = enc.bits.tobytes() if bits is None else bits
    s = enc.scales.tobytes() if scales is None else scales
    h = Header(
        op=Op.PUSH,
        token=TOKEN,
        worker=worker,
        version=version,
        step=version,
        offset=0,
        count=grad.size,
        nbytes=len(b) + len(s),
        nframes=2,
        dtype=DType.ONEBIT,
        compression=Compression.ONEBIT,
        bucket_size=bucket,
    )
    return Incoming(identity=b"w%d" % worker, header=h.pack(), frames=[zmq.Frame(b), zmq.Frame(s)])


def onebit_shard(
    *,
    trainable: int | None = None,
    workers: int = 2,
    server_to_worker: bool = False,
    **training: Any,
) -> Any:
    return make_shard(
        count=20,
        workers=workers,
        trainable=trainable,
        compression={"kind": "onebit", "bucketSize": BUCKET, "serverToWorker": server_to_worker},
        training={"momentum": 0.0, "lr": 1.0, **training},
    )


def test_a_sync_step_decodes_every_push_into_one_accumulator() -> None:
    shard, _ = onebit_shard()
    g0 = np.linspace(-1, 1, 20, dtype=np.float32)
    g1 = np.arange(20, dtype=np.float32) - 7
    shard.handle(onebit_push(0, g0, 0))
    shard.handle(onebit_push(1, g1, 0))
    q = np.zeros(20, np.float32)
    for g in (g0, g1):
        enc = quantize(g, BUCKET)
        decode_into(q, enc.bits, enc.scales, count=20, bucket_size=BUCKET)
    np.testing.assert_allclose(shard.params, 1.0 - q / 2, rtol=1e-6)
    assert shard.version == 1


GOOD = np.linspace(-1, 1, 20, dtype=np.float32)
ENC = quantize(GOOD, BUCKET)
BAD_ONEBIT = {
    "short bits": lambda: onebit_push(0, GOOD, 0, bits=ENC.bits.tobytes()[:-1]),
    "long scales": lambda: onebit_push(0, GOOD, 0, scales=ENC.scales.tobytes() + bytes(8)),
    "nan scale": lambda: onebit_push(
        0, GOOD, 0, scales=np.array([[np.nan, 1.0]] * 3, np.float32).tobytes()
    ),
    "inf scale": lambda: onebit_push(
        0, GOOD, 0, scales=np.array([[-1.0, np.inf]] * 3, np.float32).tobytes()
    ),
    "a bucket that does not exist": lambda: onebit_push(
        0, GOOD, 0, scales=np.array([[-1.0, 1.0]] * 4, np.float32).tobytes()
    ),
    "another bucket size": lambda: onebit_push(0, GOOD, 0, bucket=16),
}


@pytest.mark.parametrize("name", sorted(BAD_ONEBIT))
def test_a_bad_onebit_payload_is_rejected_counted_and_changes_nothing(name: str) -> None:
    shard, _ = onebit_shard()
    before = shard.checksum()
    acc_before = shard._acc.copy()
    shard.handle(BAD_ONEBIT[name]())
    assert sum(shard.stats.rejected.values()) == 1
    assert shard.checksum() == before
    np.testing.assert_array_equal(shard._acc, acc_before)
    assert not shard.pending


def test_a_float32_push_to_a_onebit_job_is_rejected() -> None:
    from tests.test_shard import push

    shard, _ = onebit_shard()
    shard.handle(push(0, np.ones(20), 0))
    assert shard.stats.rejected["BAD_DTYPE"] == 1


def test_error_feedback_keeps_everything_that_was_not_sent() -> None:
    ef = ErrorFeedback(1000, 64)
    rng = np.random.default_rng(1)
    sent = np.zeros(1000)
    raw = np.zeros(1000)
    from sgdjob.compression import decode_into

    for _ in range(100):
        g = rng.standard_normal(1000).astype(np.float32)
        raw += g
        enc = ef.encode(g)
        q = np.zeros(1000, np.float32)
        decode_into(q, enc.bits, enc.scales, count=1000, bucket_size=64)
        sent += q
    np.testing.assert_allclose(sent + ef.residual.numpy(), raw, atol=1e-3)


@pytest.mark.slow  # three accuracy runs: make test-slow
def test_onebit_with_error_feedback_ends_within_a_point_of_fp32(run_job: Any) -> None:
    common = {
        "parameterServers": {"shards": 2},
        "workers": {"replicas": 2},
        "model": {"builtin": "mlp", "hidden": [64]},
        "training": {"maxSteps": 400},
    }
    fp32, _ = run_job(job_doc("fp32", **common), subdir="f")
    ob, _ = run_job(job_doc("ob", compression={"kind": "onebit"}, **common), subdir="o")
    no_ef, _ = run_job(
        job_doc("noef", compression={"kind": "onebit", "errorFeedback": False}, **common),
        subdir="n",
    )
    print(
        f"fp32 {fp32['finalAccuracy']:.4f}  onebit+EF {ob['finalAccuracy']:.4f}  "
        f"onebit without EF {no_ef['finalAccuracy']:.4f}"
    )
    assert ob["finalAccuracy"] >= fp32["finalAccuracy"] - 0.01
    assert no_ef["finalAccuracy"] <= ob["finalAccuracy"]  # why error feedback matters


@pytest.mark.slow  # two accuracy runs: make test-slow
def test_with_adam_sending_the_workers_updates_trains_where_sending_gradients_stalls(
    run_job: Any,
) -> None:
    # A deep, narrow MLP: Adam on decoded 1-bit gradients (error feedback cannot correct a
    # step that divides by the second moment) falls far behind; 1-bit updates of each worker's
    # own Adam stay near fp32 (bench/onebit_optimizers.py measures the same on Fashion-MNIST).
    common = {
        "workers": {"replicas": 2},
        "model": {"builtin": "mlp", "hidden": [64] * 8},
        "training": {"maxSteps": 200, "optimizer": "adam", "lr": 0.001, "momentum": 0.9},
    }
    onebit = {"kind": "onebit", "bucketSize": 64}
    fp32, _ = run_job(job_doc("fp32", **common), subdir="f")
    grads, _ = run_job(job_doc("grads", compression=onebit, **common), subdir="g")
    updates, _ = run_job(
        job_doc("updates", compression={**onebit, "send": "updates"}, **common), subdir="u"
    )
    acc = {k: s["finalAccuracy"] for k, s in (("fp32", fp32), ("g", grads), ("u", updates))}
    print(acc)
    assert acc["u"] >= acc["fp32"] - 0.05
    assert acc["u"] >= acc["g"] + 0.1
    assert not updates["rejectedMessages"]


def test_onebit_sends_at_most_a_28th_of_fp32_bytes_per_step(run_job: Any) -> None:
    # A ~600k-parameter model, so the 96-byte headers and per-step reports are negligible.
    common = {
        "model": {"builtin": "mlp", "hidden": [1024, 512]},
        "training": {"maxSteps": 6, "evalInterval": 100},
        "parameterServers": {"shards": 2},
        "workers": {"replicas": 1},
    }
    fp32, _ = run_job(job_doc("b32", **common), subdir="f")
    ob, _ = run_job(job_doc("b1", compression={"kind": "onebit"}, **common), subdir="o")
    sent_fp32 = fp32["workerStats"]["0"]["bytesSent"]
    sent_ob = ob["workerStats"]["0"]["bytesSent"]
    assert sent_ob * 28 <= sent_fp32


@pytest.mark.parametrize(
    "training",
    [
        {"backupWorkers": 1},
        # Downlink 1-bit noise plus momentum 0.9 degrades async training (~0.65); 0.5 holds.
        {"mode": "async", "staleness": "zhang", "momentum": 0.5},
        # Momentum 0.9 plus Downpour's local steps, staleness and 1-bit noise in both
        # directions overshoots on digits (~0.6-0.75); Downpour as published used no momentum.
        {"mode": "downpour", "fetchEvery": 2, "pushEvery": 2, "momentum": 0.0, "lr": 0.1},
    ],
    ids=["backup", "async", "downpour"],
)
def test_onebit_works_in_every_mode_both_directions(run_job: Any, training: dict) -> None:
    doc = job_doc(
        "modes",
        workers={"replicas": 2},
        parameterServers={"shards": 2},
        compression={"kind": "onebit", "serverToWorker": True, "bucketSize": 64},
        training={"maxSteps": 120, **training},
    )
    summary, _ = run_job(doc)
    assert summary["finalAccuracy"] > 0.8
    assert not summary["rejectedMessages"]


# --- slices that end in buffers: trainable part 1-bit, buffers raw float32 ---------------------

COUNT, TRAINABLE = 20, 14  # the slice's elements 14..19 are buffers (BatchNorm statistics)


def wire_frames(grad: np.ndarray, trainable: int = TRAINABLE) -> list[bytes]:
    """What a worker sends for a slice: its real encoder, without error feedback."""
    ef = ErrorFeedback(trainable, BUCKET, enabled=False)
    split = SliceSplit(count=grad.size, trainable=trainable)
    frames, _ = push_frames(ef, torch.from_numpy(grad.copy()), split=split, chunk_bytes=1 << 20)
    return [bytes(f) for f in frames]


def frames_push(
    worker: int, frames: list[bytes], version: int = 0, *, start: int = 0, end: int = COUNT
) -> Incoming:
    """A 1-bit push of ``frames`` for elements ``[start, end)`` of the slice."""
    h = Header(
        op=Op.PUSH,
        token=TOKEN,
        worker=worker,
        version=version,
        step=version,
        offset=start,
        count=end - start,
        nbytes=sum(map(len, frames)),
        nframes=len(frames),
        dtype=DType.ONEBIT,
        compression=Compression.ONEBIT,
        bucket_size=BUCKET,
    )
    return msg(h, frames, ident=b"w%d" % worker)


def decoded(grad: np.ndarray) -> np.ndarray:
    """The 1-bit reconstruction of ``grad``."""
    q = np.zeros(grad.size, np.float32)
    enc = quantize(grad, BUCKET)
    decode_into(q, enc.bits, enc.scales, count=grad.size, bucket_size=BUCKET)
    return q


G0: np.ndarray = np.linspace(-1, 1, COUNT, dtype=np.float32)
G1: np.ndarray = (np.arange(COUNT, dtype=np.float32) - 7) / 3


@pytest.mark.parametrize("trainable", [TRAINABLE, 0], ids=["some buffers", "only buffers"])
def test_a_sync_onebit_step_decodes_the_trainable_part_and_averages_the_exact_buffers(
    trainable: int,
) -> None:
    shard, _ = onebit_shard(trainable=trainable)
    shard.handle(frames_push(0, wire_frames(G0, trainable)))
    shard.handle(frames_push(1, wire_frames(G1, trainable)))
    assert shard.version == 1 and not shard.stats.rejected
    t = trainable
    q = decoded(G0[:t]) + decoded(G1[:t])
    np.testing.assert_allclose(shard.params[:t], 1.0 - q / 2, rtol=1e-6)
    # Buffers: the mean of the workers' changes, with no learning rate, bit for bit.
    mean = (G0[t:] + G1[t:]) * np.float32(0.5)
    np.testing.assert_array_equal(shard.params[t:], np.float32(1.0) + mean)


def test_an_async_onebit_push_adds_its_exact_buffer_change_at_once() -> None:
    shard, _ = onebit_shard(trainable=TRAINABLE, mode="async")
    shard.handle(frames_push(0, wire_frames(G0)))
    assert shard.version == 1 and not shard.stats.rejected
    np.testing.assert_allclose(shard.params[:TRAINABLE], 1.0 - decoded(G0[:TRAINABLE]), rtol=1e-6)
    np.testing.assert_array_equal(shard.params[TRAINABLE:], np.float32(1.0) + G0[TRAINABLE:])


GOOD_FRAMES = wire_frames(G0)
RAW = GOOD_FRAMES[2]


def with_raw(index: int, value: float) -> list[bytes]:
    raw = np.frombuffer(RAW, np.float32).copy()
    raw[index] = value
    return [*GOOD_FRAMES[:2], raw.tobytes()]


BAD_BUFFERS: dict[str, tuple[list[bytes], ErrorCode]] = {
    "the buffer frame missing": (GOOD_FRAMES[:2], ErrorCode.BAD_PAYLOAD),
    "the whole slice 1-bit, as protocol 1 sent it": (wire_frames(G0, COUNT), ErrorCode.BAD_PAYLOAD),
    "the buffers an element short": ([*GOOD_FRAMES[:2], RAW[:-4]], ErrorCode.BAD_SIZE),
    "the buffers an element long": ([*GOOD_FRAMES, bytes(4)], ErrorCode.BAD_SIZE),
    "a frame splitting an element": ([*GOOD_FRAMES[:2], RAW[:6], RAW[6:]], ErrorCode.BAD_SIZE),
    "an empty buffer frame": ([*GOOD_FRAMES, b""], ErrorCode.BAD_SIZE),
    "NaN in the buffers": (with_raw(2, np.nan), ErrorCode.NOT_FINITE),
    "infinity in the buffers": (with_raw(5, -np.inf), ErrorCode.NOT_FINITE),
    "a NaN scale": (
        [GOOD_FRAMES[0], np.array([[np.nan, 1.0]] * 2, np.float32).tobytes(), RAW],
        ErrorCode.NOT_FINITE,
    ),
}


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("name", sorted(BAD_BUFFERS))
def test_a_bad_buffer_payload_is_refused_with_its_reason_and_changes_nothing(
    name: str, mode: str
) -> None:
    shard, sent = onebit_shard(trainable=TRAINABLE, mode=mode)
    before, acc_before = shard.checksum(), shard._acc.copy()
    frames, code = BAD_BUFFERS[name]
    shard.handle(frames_push(0, frames))
    assert dict(shard.stats.rejected) == {code.name: 1}
    ((_, reply, _),) = sent.messages
    assert reply.op == Op.ERROR and reply.error == code
    assert shard.checksum() == before and shard.version == 0
    np.testing.assert_array_equal(shard._acc, acc_before)
    assert not shard.pending and not shard.partial.kept
    # ... and the same worker's good push goes through afterwards.
    shard.handle(frames_push(0, GOOD_FRAMES))
    assert sum(shard.stats.rejected.values()) == 1


def test_the_worker_keeps_error_feedback_for_the_trainable_part_and_sends_buffers_as_they_are() -> (
    None
):
    grads = torch.from_numpy(G0.copy())
    ef = ErrorFeedback(TRAINABLE, BUCKET)
    split = SliceSplit.of(Slice(0, 0, COUNT), TRAINABLE)
    frames, borrowed = push_frames(ef, grads, split=split, chunk_bytes=8)
    # The buffers are views of the gradient (tracked sends), cut like every float32 vector.
    assert borrowed and [f.nbytes for f in frames[2:]] == [8, 8, 8]
    assert b"".join(bytes(f) for f in frames[2:]) == G0[TRAINABLE:].tobytes()
    q = decoded(G0[:TRAINABLE])
    np.testing.assert_allclose(ef.residual.numpy(), G0[:TRAINABLE] - q, atol=1e-6)
    assert SliceSplit.of(Slice(1, 10, 10), TRAINABLE) == SliceSplit(count=10, trainable=4)
    assert SliceSplit.of(Slice(2, 20, 10), TRAINABLE).trainable == 0
    assert SliceSplit.of(Slice(0, 0, 10), None).buffers == 0


def test_a_server_to_worker_update_gives_the_worker_the_shards_exact_buffers() -> None:
    shard, sent = onebit_shard(trainable=TRAINABLE, workers=1, server_to_worker=True)
    client = ShardClient(
        ctx=zmq.Context.instance(),
        addrs=(),
        token=TOKEN,
        worker=0,
        timeout_s=1.0,
        chunk_bytes=64,
        compression=CompressionSpec.model_validate(
            {"kind": "onebit", "bucketSize": BUCKET, "serverToWorker": True}
        ),
    )
    client.slices, client.trainable = [Slice(0, 0, COUNT)], TRAINABLE
    client.recon = shard.params.copy()  # the full answer to its first pull
    shard.handle(msg(Header(op=Op.PULL, token=TOKEN, worker=0, step=1), ident=b"w0"))
    assert not sent.messages[-1][1].flags & Flags.DELTA
    params = np.full(COUNT, 9.0, np.float32)
    for step in range(3):
        shard.handle(frames_push(0, wire_frames(G0 * (step + 1)), version=step))
        seq = step + 2
        shard.handle(
            msg(Header(op=Op.PULL, token=TOKEN, worker=0, version=step + 1, step=seq), ident=b"w0")
        )
        _, h, frames = sent.messages[-1]
        # [bits, scales], then 6 buffer values in this shard's 8-byte frames
        assert h.flags & Flags.DELTA and h.count == COUNT and h.nframes == 2 + 3
        client._apply_delta(0, h, Incoming(None, h.pack(), [zmq.Frame(f) for f in frames]), params)
        np.testing.assert_array_equal(params[TRAINABLE:], shard.params[TRAINABLE:])
        np.testing.assert_array_equal(params[:TRAINABLE], shard.downlink.mirrors[0].mirror)
    assert not shard.stats.rejected


# --- parts of a slice, pushed during backward (sgdjob.overlap) -----------------------------


def part_frames(ef: ErrorFeedback, grad: np.ndarray, start: int, end: int) -> list[bytes]:
    """What a worker sends for ``[start, end)`` of the slice: its real encoder, with ``ef``."""
    split = SliceSplit(count=COUNT, trainable=TRAINABLE).part(start, end)
    g = torch.from_numpy(grad[start:end].copy())
    frames, _ = push_frames(ef, g, split=split, chunk_bytes=1 << 20, at=start)
    return [bytes(f) for f in frames]


def whole_then_parts(
    cuts: dict[int, list[int]], mode: str = "sync"
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Parameters after one step of whole pushes and after the same step pushed in parts
    cut at ``cuts[worker]`` (scrambled order), and the workers' residuals after the parts."""
    grads = [G0, G1][: len(cuts)]
    whole, _ = onebit_shard(trainable=TRAINABLE, workers=len(cuts), mode=mode)
    for w, g in enumerate(grads):
        ef = ErrorFeedback(TRAINABLE, BUCKET)
        whole.handle(frames_push(w, part_frames(ef, g, 0, COUNT)))
    parted, _ = onebit_shard(trainable=TRAINABLE, workers=len(cuts), mode=mode)
    residuals: list[np.ndarray] = []
    for w in reversed(range(len(grads))):  # the later worker's parts wait for their turn
        ef = ErrorFeedback(TRAINABLE, BUCKET)
        bounds = [0, *cuts[w], COUNT]
        for a, b in reversed(list(itertools.pairwise(bounds))):  # backward: the last part first
            parted.handle(frames_push(w, part_frames(ef, grads[w], a, b), start=a, end=b))
        residuals.insert(0, ef.residual.numpy().copy())
    assert not whole.stats.rejected and not parted.stats.rejected
    assert whole.version == parted.version == 1
    return whole.params.copy(), parted.params.copy(), residuals


def test_a_slice_pushed_in_bucket_aligned_parts_ends_on_the_whole_pushes_model_bit_for_bit() -> (
    None
):
    # Parts cut at multiples of the codec bucket (8) encode as the whole slice does; the
    # buffers (14..19) travel in a part of their own and in one that also holds trainables.
    whole, parted, residuals = whole_then_parts({0: [8, 14], 1: [8]})
    np.testing.assert_array_equal(parted, whole)
    ef = ErrorFeedback(TRAINABLE, BUCKET)
    ef.encode(torch.from_numpy(G0[:TRAINABLE].copy()))
    np.testing.assert_array_equal(residuals[0], ef.residual.numpy())


def test_parts_cut_differently_by_two_workers_are_still_summed_in_worker_order() -> None:
    # Worker 1's part [0, 16) arrives first and waits; worker 0's [8, 16) lets its upper half
    # be added before [0, 8) comes: that piece is decoded from the whole part into scratch.
    whole, parted, _ = whole_then_parts({0: [8, 16], 1: [16]})
    np.testing.assert_array_equal(parted, whole)


def test_an_async_push_in_parts_is_applied_once_they_cover_the_slice() -> None:
    whole, parted, _ = whole_then_parts({0: [8, 14]}, mode="async")
    np.testing.assert_array_equal(parted, whole)


@pytest.mark.parametrize(
    ("start", "end", "frames", "code"),
    [
        (14, 20, [b"", b""], ErrorCode.BAD_PAYLOAD),  # buffers only, their frame missing
        (8, 14, [b"\0", bytes(8), bytes(24)], ErrorCode.BAD_PAYLOAD),  # raw frames, no buffers
        (8, 14, [b"\0\0", bytes(8)], ErrorCode.BAD_PAYLOAD),  # 6 elements: one byte of bits
        (16, 24, [b"", b"", bytes(32)], ErrorCode.BAD_RANGE),  # past the slice
        (4, 4, [b"", b""], ErrorCode.BAD_RANGE),  # empty
    ],
)
def test_a_part_laid_out_for_another_range_is_refused_and_changes_nothing(
    start: int, end: int, frames: list[bytes], code: ErrorCode
) -> None:
    shard, _ = onebit_shard(trainable=TRAINABLE)
    before = shard.checksum()
    shard.handle(frames_push(0, frames, start=start, end=end))
    assert dict(shard.stats.rejected) == {code.name: 1}
    assert shard.checksum() == before and 0 not in shard.pending
