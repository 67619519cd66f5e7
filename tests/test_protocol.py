import contextlib
import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sgdjob.protocol import (
    HEADER,
    HEADER_SIZE,
    PROTOCOL_VERSION,
    DType,
    ErrorCode,
    Header,
    Op,
    ProtocolError,
    Report,
    check_float32_payload,
    check_range,
    parse_header,
    token_digest,
)

TOKEN = token_digest("job-token")


def push(**kw: object) -> Header:
    base = dict(
        op=Op.PUSH,
        token=TOKEN,
        worker=1,
        shard=0,
        version=3,
        step=3,
        offset=0,
        count=10,
        nbytes=40,
        nframes=1,
        dtype=DType.FLOAT32,
    )
    base.update(kw)
    return Header(**base)  # type: ignore[arg-type]


def test_a_header_round_trips_through_pack_and_parse() -> None:
    h = push()
    assert parse_header(h.pack(), token=TOKEN) == h
    assert len(h.pack()) == HEADER_SIZE


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda b: b[:-1], ErrorCode.TRUNCATED),
        (lambda b: b + b"x", ErrorCode.TRUNCATED),
        (lambda b: b"XXXX" + b[4:], ErrorCode.BAD_MAGIC),
        (lambda b: b[:4] + struct.pack("<H", 99) + b[6:], ErrorCode.BAD_VERSION),
        (lambda b: b[:6] + bytes([200]) + b[7:], ErrorCode.BAD_OP),
        (lambda b: b[:7] + bytes([77]) + b[8:], ErrorCode.BAD_DTYPE),
        (lambda b: b[:12] + bytes(16) + b[28:], ErrorCode.BAD_TOKEN),
    ],
)
def test_a_malformed_header_is_rejected_with_its_reason(mutate, code) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ProtocolError) as err:
        parse_header(mutate(push().pack()), token=TOKEN)
    assert err.value.code == code


def test_another_jobs_token_is_rejected() -> None:
    with pytest.raises(ProtocolError) as err:
        parse_header(push().pack(), token=token_digest("other-job"))
    assert err.value.code == ErrorCode.BAD_TOKEN


def test_a_payload_must_match_the_announced_sizes() -> None:
    h = push(count=10, nbytes=40, nframes=2)
    check_float32_payload(h, [24, 16])
    for sizes, code in (
        ([24], ErrorCode.TRUNCATED),
        ([24, 12], ErrorCode.TRUNCATED),
        ([22, 18], ErrorCode.BAD_SIZE),
    ):
        with pytest.raises(ProtocolError) as err:
            check_float32_payload(h, sizes)
        assert err.value.code == code
    with pytest.raises(ProtocolError) as err:
        check_float32_payload(push(count=11, nbytes=40), [40])
    assert err.value.code == ErrorCode.BAD_SIZE


def test_a_range_outside_the_slice_is_rejected() -> None:
    check_range(push(offset=5, count=5), offset=5, count=10)
    with pytest.raises(ProtocolError) as err:
        check_range(push(offset=4, count=5), offset=5, count=10)
    assert err.value.code == ErrorCode.BAD_RANGE
    with pytest.raises(ProtocolError):
        check_range(push(offset=12, count=5), offset=5, count=10)


def test_a_report_round_trips_and_rejects_nonsense() -> None:
    r = Report(
        step=4,
        loss=0.5,
        step_time=0.01,
        samples=32,
        bytes_sent=10,
        bytes_received=20,
        eval_metric=0.9,
        eval_loss=0.3,
        final=True,
    )
    assert Report.unpack(r.pack()) == r
    with pytest.raises(ProtocolError):
        Report.unpack(r.pack()[:-1])
    bad = Report(step=4, loss=math.inf, step_time=0.01, samples=1, bytes_sent=0, bytes_received=0)
    with pytest.raises(ProtocolError):
        Report.unpack(bad.pack())
    with pytest.raises(ProtocolError):
        Report.unpack(Report(1, 0.1, 0.1, 1, 0, 0, eval_metric=-0.5).pack())
    with pytest.raises(ProtocolError):
        Report.unpack(Report(1, 0.1, 0.1, 1, 0, 0, eval_metric=math.inf).pack())
    assert Report.unpack(Report(1, 0.1, 0.1, 1, 0, 0, eval_metric=2.5).pack()).eval_metric == 2.5


@given(st.binary(max_size=2 * HEADER_SIZE))
def test_random_bytes_never_parse_as_a_header_of_this_job(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_header(data, token=TOKEN)


@given(st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE))
def test_random_header_sized_bytes_raise_only_protocol_errors(data: bytes) -> None:
    # Keep the magic, version and token right so the deeper checks are exercised too.
    fields = list(HEADER.unpack(data))
    fields[0], fields[1], fields[7] = b"SGDJ", PROTOCOL_VERSION, TOKEN
    with contextlib.suppress(ProtocolError):
        parse_header(HEADER.pack(*fields), token=TOKEN)


def test_a_float32_payload_that_claims_compression_is_rejected() -> None:
    from sgdjob.protocol import Compression

    for h in (push(compression=Compression.ONEBIT), push(bucket_size=512)):
        with pytest.raises(ProtocolError) as err:
            check_float32_payload(h, [40])
        assert err.value.code == ErrorCode.BAD_DTYPE
