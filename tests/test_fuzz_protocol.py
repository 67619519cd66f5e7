"""Property tests for everything that reads untrusted bytes: the header, the report, the
payload checks, the 1-bit payload decoder, and the worker's side of 1-bit parameter updates.

Each property compares the code with a reference written here from docs/architecture.md and the
compression module's wire layout: a message is either accepted and then means exactly what its
bytes say, or rejected with the documented error (and wrote nothing anywhere).
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import pytest
import torch
import zmq
from hypothesis import event, given, settings
from hypothesis import strategies as st

from sgdjob.api.types import CompressionSpec
from sgdjob.client import ShardClient
from sgdjob.compression import CompressionError, decode_into, quantize, validate_payload
from sgdjob.protocol import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_FRAME_BYTES,
    MAX_FRAMES,
    MAX_WORKERS,
    PROTOCOL_VERSION,
    Compression,
    DType,
    ErrorCode,
    Flags,
    Header,
    Op,
    ProtocolError,
    Report,
    check_float32_payload,
    check_frames,
    check_range,
    parse_header,
    token_digest,
)
from sgdjob.slicing import Slice
from sgdjob.transport import Incoming

TOKEN = token_digest("fuzz")
SOME = settings(max_examples=300, deadline=None)


def uint(bits: int) -> st.SearchStrategy[int]:
    """Any unsigned value of that width, with the boundaries drawn often."""
    top = (1 << bits) - 1
    return st.one_of(st.sampled_from([0, 1, top - 1, top]), st.integers(0, top))


def small_or(values: list[int], bits: int) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(values), uint(bits))


# ----------------------------------------------------------------------------- header


def mostly(valid: st.SearchStrategy[Any], wild: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually a valid value, one time in seven anything: so every check gets reached."""
    return st.integers(0, 6).flatmap(lambda i: wild if i == 0 else valid)


raw_fields = st.tuples(
    mostly(st.just(MAGIC), st.binary(min_size=4, max_size=4)),
    mostly(st.just(PROTOCOL_VERSION), uint(16)),
    mostly(st.sampled_from([int(o) for o in Op]), uint(8)),
    mostly(st.sampled_from([int(d) for d in DType]), uint(8)),
    mostly(st.sampled_from([int(c) for c in Compression]), uint(8)),
    mostly(st.integers(0, 3), uint(8)),
    mostly(st.sampled_from([int(e) for e in ErrorCode]), uint(16)),
    mostly(st.just(TOKEN), st.binary(min_size=16, max_size=16)),
    mostly(st.integers(0, MAX_WORKERS - 1), small_or([MAX_WORKERS], 32)),
    uint(32),
    uint(32),
    *[uint(64)] * 4,
    mostly(st.sampled_from([0, 4, MAX_FRAME_BYTES]), small_or([MAX_FRAME_BYTES + 1], 64)),
    mostly(st.integers(1, 4), small_or([0, MAX_FRAMES, MAX_FRAMES + 1], 32)),
    uint(32),
    mostly(st.floats(allow_nan=False, allow_infinity=False), st.floats()),
).map(list)


def expected_code(f: list[Any]) -> ErrorCode | None:
    """The reference: the header checks of docs/architecture.md, in the documented order."""
    magic, proto, op, dtype, comp, flags, error, tok, worker = f[:9]
    nbytes, nframes, aux = f[15], f[16], f[18]
    checks = [
        (magic != MAGIC, ErrorCode.BAD_MAGIC),
        (proto != PROTOCOL_VERSION, ErrorCode.BAD_VERSION),
        (op not in {int(o) for o in Op}, ErrorCode.BAD_OP),
        (dtype not in {int(d) for d in DType}, ErrorCode.BAD_DTYPE),
        (comp not in {int(c) for c in Compression}, ErrorCode.BAD_DTYPE),
        (error not in {int(e) for e in ErrorCode}, ErrorCode.BAD_PAYLOAD),
        (flags & ~3 != 0, ErrorCode.BAD_PAYLOAD),
        (tok != TOKEN, ErrorCode.BAD_TOKEN),
        (worker >= MAX_WORKERS, ErrorCode.BAD_WORKER),
        (nframes > MAX_FRAMES or nbytes > nframes * MAX_FRAME_BYTES, ErrorCode.BAD_SIZE),
        (not math.isfinite(aux), ErrorCode.NOT_FINITE),
    ]
    return next((code for bad, code in checks if bad), None)


@SOME
@given(st.one_of(st.binary(max_size=2 * HEADER_SIZE), st.binary(min_size=95, max_size=97)))
def test_any_bytes_parse_to_a_header_that_repacks_to_exactly_them_or_raise_a_protocol_error(
    data: bytes,
) -> None:
    try:
        h = parse_header(data, token=TOKEN)
    except ProtocolError as err:
        assert len(data) == HEADER_SIZE or err.code == ErrorCode.TRUNCATED
        return
    assert h.pack() == data


@SOME
@given(raw_fields)
def test_every_header_field_is_checked_exactly_as_documented(fields: list[Any]) -> None:
    data = HEADER.pack(*fields)
    want = expected_code(fields)
    try:
        h = parse_header(data, token=TOKEN)
    except ProtocolError as err:
        assert err.code == want, f"{err} but the reference says {want}"
        event(f"rejected {err.code.name}")
        return
    event("accepted")
    assert want is None
    assert h.pack() == data  # the parsed header means exactly what its bytes say
    assert (h.op, h.dtype, h.compression, h.flags, h.error) == tuple(fields[2:7])
    assert (h.worker, h.shard, h.incarnation) == tuple(fields[8:11])
    assert (h.version, h.step, h.offset, h.count, h.nbytes) == tuple(fields[11:16])
    assert (h.nframes, h.bucket_size, h.aux) == tuple(fields[16:19])


valid_headers = st.builds(
    Header,
    op=st.sampled_from(Op),
    token=st.binary(min_size=16, max_size=16),
    worker=st.integers(0, MAX_WORKERS - 1),
    shard=uint(32),
    incarnation=uint(32),
    version=uint(64),
    step=uint(64),
    offset=uint(64),
    count=uint(64),
    nbytes=st.integers(0, MAX_FRAME_BYTES),
    nframes=st.integers(1, MAX_FRAMES),
    dtype=st.sampled_from(DType),
    compression=st.sampled_from(Compression),
    flags=st.sampled_from([Flags.NONE, Flags.FINISHED, Flags.DELTA, Flags.FINISHED | Flags.DELTA]),
    error=st.sampled_from(ErrorCode),
    bucket_size=uint(32),
    aux=st.floats(allow_nan=False, allow_infinity=False),
)


@SOME
@given(valid_headers)
def test_a_valid_header_round_trips_and_only_its_own_token_opens_it(h: Header) -> None:
    data = h.pack()
    assert len(data) == HEADER_SIZE
    assert parse_header(data, token=h.token) == h
    other = bytes(b ^ 0xFF for b in h.token)
    with pytest.raises(ProtocolError) as err:
        parse_header(data, token=other)
    assert err.value.code == ErrorCode.BAD_TOKEN


@SOME
@given(valid_headers, st.integers(0, HEADER_SIZE - 1), st.integers(1, 255))
def test_one_changed_byte_gives_a_header_of_those_bytes_or_the_reason_it_cannot(
    h: Header, pos: int, xor: int
) -> None:
    data = bytearray(h.pack())
    data[pos] ^= xor
    try:
        parsed = parse_header(bytes(data), token=h.token)
    except ProtocolError as err:
        if pos < 4:
            assert err.code == ErrorCode.BAD_MAGIC
        elif pos < 6:
            assert err.code == ErrorCode.BAD_VERSION
        elif 12 <= pos < 28:
            assert err.code == ErrorCode.BAD_TOKEN
        return
    assert not (pos < 6 or 12 <= pos < 28)  # magic, version and token admit no change
    assert parsed.pack() == bytes(data)


# ----------------------------------------------------------------------------- report


def report_problem(values: tuple[Any, ...]) -> ErrorCode | None:
    _, loss, step_time, _, _, _, acc, _, final = values
    if not (math.isfinite(loss) and math.isfinite(step_time) and step_time >= 0):
        return ErrorCode.NOT_FINITE
    if not (math.isnan(acc) or (math.isfinite(acc) and acc >= 0.0)) or final > 1:
        return ErrorCode.BAD_PAYLOAD
    return None


report_fields = st.tuples(
    uint(64),
    st.floats(),
    st.floats(),
    uint(64),
    uint(64),
    uint(64),
    st.one_of(st.floats(0, 1), st.floats()),
    st.floats(),
    small_or([0, 1], 8),
)


@SOME
@given(st.one_of(report_fields.map(lambda v: Report.STRUCT.pack(*v)), st.binary(max_size=80)))
def test_a_report_unpacks_to_exactly_its_bytes_or_is_rejected_for_the_documented_reason(
    data: bytes,
) -> None:
    want = ErrorCode.BAD_PAYLOAD
    if len(data) == Report.STRUCT.size:
        want = report_problem(Report.STRUCT.unpack(data))  # type: ignore[assignment]
    try:
        r = Report.unpack(data)
    except ProtocolError as err:
        assert err.code == want
        event(f"rejected {err.code.name}")
        return
    event("accepted")
    assert want is None
    assert r.pack() == data
    assert math.isfinite(r.loss) and math.isfinite(r.step_time) and r.step_time >= 0
    assert math.isnan(r.eval_metric) or (math.isfinite(r.eval_metric) and r.eval_metric >= 0)


# ----------------------------------------------------------------------------- payload checks


@SOME
@given(uint(64), uint(64), uint(64), uint(64))
def test_a_range_is_accepted_exactly_when_it_lies_inside_the_slice(
    offset: int, count: int, s_offset: int, s_count: int
) -> None:
    h = Header(op=Op.PUSH, token=TOKEN, offset=offset, count=count)
    inside = s_offset <= offset and offset + count <= s_offset + s_count
    try:
        check_range(h, offset=s_offset, count=s_count)
    except ProtocolError as err:
        assert err.code == ErrorCode.BAD_RANGE and not inside
    else:
        assert inside


frame_lists = st.lists(
    st.one_of(st.sampled_from([0, 4, 8, MAX_FRAME_BYTES, MAX_FRAME_BYTES + 1]), st.integers(0, 99)),
    max_size=5,
)


@SOME
@given(
    frame_lists,
    st.one_of(st.integers(0, 6), uint(32)),
    st.one_of(st.integers(0, 400), uint(64)),
    st.one_of(st.integers(0, 100), uint(64)),
    st.sampled_from(DType),
    st.booleans(),
)
def test_frame_and_float32_checks_accept_exactly_what_the_header_announces(
    sizes: list[int], nframes: int, nbytes: int, count: int, dtype: DType, honest: bool
) -> None:
    if honest:  # often announce exactly what is there, so acceptance is reached too
        nframes, nbytes = len(sizes), sum(sizes)
    h = Header(op=Op.PUSH, token=TOKEN, nframes=nframes, nbytes=nbytes, count=count, dtype=dtype)
    frames_ok = len(sizes) == nframes and max(sizes, default=0) <= MAX_FRAME_BYTES
    frames_ok = frames_ok and sum(sizes) == nbytes
    fp32_ok = frames_ok and dtype == DType.FLOAT32 and nbytes == 4 * count
    fp32_ok = fp32_ok and all(s % 4 == 0 for s in sizes)
    for check, ok in ((check_frames, frames_ok), (check_float32_payload, fp32_ok)):
        try:
            check(h, sizes)
        except ProtocolError as err:
            assert not ok and err.code in (
                ErrorCode.TRUNCATED,
                ErrorCode.BAD_SIZE,
                ErrorCode.BAD_DTYPE,
            )
        else:
            assert ok, check.__name__


# ----------------------------------------------------------------------------- 1-bit payloads


def reference_decode(
    bits: bytes, scales: bytes, count: int, bucket: int, alpha: float = 1.0
) -> np.ndarray | None:
    """q per element from the wire layout in sgdjob.compression's docstring; None if invalid."""
    n_buckets = -(-count // bucket)
    if len(bits) != -(-count // 8) or len(scales) != 8 * n_buckets:
        return None
    if count % 8 and bits[-1] >> (count % 8):
        return None
    sc = struct.unpack(f"<{2 * n_buckets}f", scales)
    if not all(math.isfinite(s) for s in sc) or not math.isfinite(alpha):
        return None
    if any(sc[2 * b] > 0 or sc[2 * b + 1] < 0 for b in range(n_buckets)):
        return None
    with np.errstate(over="ignore"):
        scaled = [np.float32(s) * np.float32(alpha) for s in sc]  # alpha: a power of two
    if not all(np.isfinite(scaled)):
        return None
    bit = [(bits[j // 8] >> (j % 8)) & 1 for j in range(count)]
    return np.array([scaled[2 * (j // bucket) + bit[j]] for j in range(count)], np.float32)


def onebit_payloads(draw: st.DrawFn) -> tuple[bytes, bytes, int, int]:
    """A valid payload, a valid one with a byte changed, or random bytes."""
    count, bucket = draw(st.integers(0, 70)), draw(st.integers(1, 20))
    kind = draw(st.sampled_from(["valid", "changed", "random"]))
    if kind == "random":
        n_bits = draw(st.sampled_from([-(-count // 8), draw(st.integers(0, 12))]))
        n_scales = draw(st.sampled_from([8 * -(-count // bucket), draw(st.integers(0, 80))]))
        return (
            draw(st.binary(min_size=n_bits, max_size=n_bits)),
            draw(st.binary(min_size=n_scales, max_size=n_scales)),
            count,
            bucket,
        )
    g = np.array(
        draw(st.lists(st.floats(-(2.0**100), 2.0**100, width=32), min_size=count, max_size=count)),
        np.float32,
    )
    enc = quantize(g, bucket)
    bits, scales = bytearray(enc.bits.tobytes()), bytearray(enc.scales.tobytes())
    if kind == "changed" and bits + scales:
        buf = draw(st.sampled_from([b for b in (bits, scales) if b]))
        buf[draw(st.integers(0, len(buf) - 1))] ^= draw(st.integers(1, 255))
    return bytes(bits), bytes(scales), count, bucket


payloads = st.composite(onebit_payloads)()
ALPHAS = [1.0, 1.0, 0.5, -2.0, 2.0**100, -(2.0**-100), math.nan, math.inf]


@SOME
@given(payloads, st.sampled_from(ALPHAS), st.booleans())
def test_a_onebit_payload_decodes_exactly_as_the_reference_or_is_refused_without_a_write(
    payload: tuple[bytes, bytes, int, int], alpha: float, as_tensor: bool
) -> None:
    bits, scales, count, bucket = payload
    acc0 = np.linspace(-3, 3, count, dtype=np.float32)
    acc: np.ndarray | torch.Tensor = torch.from_numpy(acc0.copy()) if as_tensor else acc0.copy()
    want = reference_decode(bits, scales, count, bucket, alpha)
    try:
        valid = validate_payload(
            memoryview(bits), zmq.Frame(scales).buffer, count=count, bucket_size=bucket
        )
        decode_into(acc, bits, scales, count=count, bucket_size=bucket, alpha=alpha)
    except CompressionError:
        event("refused")
        assert want is None
        got = acc.numpy() if isinstance(acc, torch.Tensor) else acc
        assert got.tobytes() == acc0.tobytes()  # untouched, bit for bit
        return
    event("decoded")
    assert want is not None and valid[0].tobytes() == bits
    got = acc.numpy() if isinstance(acc, torch.Tensor) else acc
    np.testing.assert_array_equal(got, acc0 + want)


# ----------------------------------------------------------------------------- worker side


def onebit_client(count: int, bucket: int) -> ShardClient:
    """A worker's client with no sockets (no shard addresses), after a 2-shard hello."""
    spec = CompressionSpec.model_validate(
        {"kind": "onebit", "bucketSize": bucket, "serverToWorker": True}
    )
    client = ShardClient(
        ctx=zmq.Context.instance(),
        addrs=(),
        token=TOKEN,
        worker=0,
        timeout_s=1.0,
        chunk_bytes=64,
        compression=spec,
    )
    client.slices = [Slice(0, 0, 5), Slice(1, 5, count)]
    client.recon = np.linspace(-1, 1, 5 + count, dtype=np.float32)
    return client


@SOME
@given(
    payloads.filter(lambda p: p[3] >= 8),
    st.sampled_from([DType.ONEBIT, DType.ONEBIT, DType.FLOAT32, DType.NONE]),
    st.sampled_from([0, 0, 1, -1]),  # bucket size off by
    st.sampled_from(["honest", "honest", "nframes", "nbytes", "extra frame", "one frame"]),
)
def test_the_worker_applies_a_shards_onebit_update_exactly_or_refuses_it_without_a_write(
    payload: tuple[bytes, bytes, int, int], dtype: DType, bucket_off: int, framing: str
) -> None:
    bits, scales, count, bucket = payload
    client = onebit_client(count, bucket)
    assert client.recon is not None
    recon0 = client.recon.copy()
    params = np.full(5 + count, 9.0, np.float32)
    frames = {"extra frame": [bits, scales, b""], "one frame": [bits + scales]}.get(
        framing, [bits, scales]
    )
    h = Header(
        op=Op.PARAMS,
        token=TOKEN,
        shard=1,
        offset=5,
        count=count,
        dtype=dtype,
        compression=Compression.ONEBIT,
        flags=Flags.DELTA,
        bucket_size=bucket + bucket_off,
        nframes=len(frames) + (framing == "nframes"),
        nbytes=sum(map(len, frames)) + (framing == "nbytes"),
    )
    want = reference_decode(bits, scales, count, bucket)
    honest = framing == "honest" and dtype == DType.ONEBIT and bucket_off == 0
    msg = Incoming(None, h.pack(), [zmq.Frame(f) for f in frames])
    try:
        client._apply_delta(1, h, msg, params)
    except ProtocolError:
        event("refused")
        assert not (honest and want is not None)
        assert client.recon.tobytes() == recon0.tobytes()
        assert (params == 9.0).all()
        return
    event("applied")
    assert honest and want is not None
    np.testing.assert_array_equal(client.recon[5:], recon0[5:] + want)
    np.testing.assert_array_equal(params[5:], client.recon[5:])
    assert (params[:5] == 9.0).all() and client.recon[:5].tobytes() == recon0[:5].tobytes()
