"""1-bit gradients on the wire: the shard's checks, and whole jobs in every mode."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import zmq

from sgdjob.compression import ErrorFeedback, quantize
from sgdjob.protocol import Compression, DType, Header, Op
from sgdjob.transport import Incoming
from tests.conftest import job_doc
from tests.test_shard import TOKEN, make_shard

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


def onebit_shard(**training: Any) -> Any:
    return make_shard(
        count=20,
        compression={"kind": "onebit", "bucketSize": BUCKET},
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
        from sgdjob.compression import decode_into

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
def test_onebit_works_in_every_mode_both_directions(run_job: Any, training: dict) -> None:  # type: ignore[type-arg]
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
