"""Wire protocol messages: the fixed binary header and the small fixed-layout payloads.

A message is a ZeroMQ multipart ``[header, payload...]``. The header is one packed
little-endian struct (``HEADER``, ``HEADER_SIZE`` = 96 bytes); payload frames are raw bytes
described by the header (``count`` elements of ``dtype``, ``nbytes`` in all, split over
``nframes`` frames).

Everything parsed here came off a socket and is untrusted: ``parse_header`` checks the
magic, the protocol version, the op, the dtype, the compression kind, the job token and every
size before any caller looks at the payload, and raises ``ProtocolError`` with a stable
``ErrorCode``. Nothing is ever unpickled. This module performs no I/O and imports no zmq.

Ops:
  HELLO   worker -> shard   register; reply WELCOME
  WELCOME shard -> worker   the shard's slice (offset, count), version, incarnation, step to
                            resume from (``step``), total vector size (``aux``)
  PUSH    worker -> shard   gradient computed on parameters ``version`` at worker ``step``,
                            for [offset, offset + count): the whole slice or a part of it
                            (1-bit too, laid out by ``sgdjob.onebit_wire``)
  PULL    worker -> shard   ask for parameters of version >= ``version``; reply PARAMS
  PARAMS  shard -> worker   the shard's parameter slice at ``version``; flag FINISHED at the end;
                            flag DELTA: a 1-bit update laid out as a 1-bit PUSH
  REPORT  worker -> shard 0 a ``Report`` payload (loss, step time, bytes, evaluation)
  DONE    worker -> shard   the worker finished; the shard may exit when all have
  ERROR   shard -> worker   ``error`` holds the ErrorCode of a rejected request
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag

MAGIC = b"SGDJ"
# 2: in 1-bit jobs the buffer elements of a slice travel as raw float32 frames after the
# 1-bit frames (sgdjob.onebit_wire); a version-1 peer would refuse or mis-size those messages.
# 3: a 1-bit PUSH may cover a part of the slice (pushed during backward, sgdjob.overlap); a
# version-2 shard would refuse every such part.
PROTOCOL_VERSION = 3
TOKEN_BYTES = 16
MAX_FRAME_BYTES = 16 << 20  # frames are cut to 1..16 MiB; anything larger is foreign
MAX_FRAMES = 1 << 16
MAX_WORKERS = 1 << 16


class Op(IntEnum):
    HELLO = 1
    WELCOME = 2
    PUSH = 3
    PULL = 4
    PARAMS = 5
    REPORT = 6
    DONE = 7
    ERROR = 8


class DType(IntEnum):
    NONE = 0  # no vector payload
    FLOAT32 = 1
    ONEBIT = 2  # packed sign bits + float32 (mu-, mu+) scales per bucket


class Compression(IntEnum):
    NONE = 0
    ONEBIT = 1


class Flags(IntFlag):
    NONE = 0
    FINISHED = 1  # PARAMS: training is over; this is the final version
    DELTA = 2  # PARAMS: payload is an update since the worker's last pull


class ErrorCode(IntEnum):
    OK = 0
    TRUNCATED = 1
    BAD_MAGIC = 2
    BAD_VERSION = 3
    BAD_OP = 4
    BAD_TOKEN = 5
    BAD_DTYPE = 6
    BAD_SIZE = 7
    BAD_RANGE = 8
    BAD_SHARD = 9
    BAD_WORKER = 10
    NOT_FINITE = 11
    BAD_PAYLOAD = 12
    UNKNOWN_WORKER = 13
    BAD_STATE = 14


# magic, proto version, op, dtype, compression, flags, error, token, worker, shard, incarnation,
# version, step, offset, count, nbytes, nframes, bucket size, aux
HEADER = struct.Struct("<4sHBBBBH16sIIIQQQQQIId")
HEADER_SIZE = HEADER.size


class ProtocolError(ValueError):
    """A message was rejected; ``code`` says why (sent back in ERROR replies)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code


def token_digest(token: str) -> bytes:
    """The 16-byte value carried in headers: a digest, so the raw token never travels."""
    return hashlib.blake2b(token.encode("utf-8"), digest_size=TOKEN_BYTES).digest()


@dataclass(frozen=True)
class Header:
    """One message header. Construct, ``pack()`` to send; ``parse_header`` to receive."""

    op: Op
    token: bytes
    worker: int = 0
    shard: int = 0
    incarnation: int = 0
    version: int = 0
    step: int = 0
    offset: int = 0
    count: int = 0
    nbytes: int = 0
    nframes: int = 0
    dtype: DType = DType.NONE
    compression: Compression = Compression.NONE
    flags: Flags = Flags.NONE
    error: ErrorCode = ErrorCode.OK
    bucket_size: int = 0
    aux: float = 0.0
    proto_version: int = field(default=PROTOCOL_VERSION)

    def pack(self) -> bytes:
        return HEADER.pack(
            MAGIC,
            self.proto_version,
            int(self.op),
            int(self.dtype),
            int(self.compression),
            int(self.flags),
            int(self.error),
            self.token,
            self.worker,
            self.shard,
            self.incarnation,
            self.version,
            self.step,
            self.offset,
            self.count,
            self.nbytes,
            self.nframes,
            self.bucket_size,
            self.aux,
        )


def _enum(cls: type[IntEnum], value: int, code: ErrorCode, what: str) -> IntEnum:
    try:
        return cls(value)
    except ValueError:
        raise ProtocolError(code, f"unknown {what} {value}") from None


def parse_header(buf: bytes | memoryview, *, token: bytes) -> Header:
    """Decode and check a header frame; raise ProtocolError on anything unexpected."""
    if len(buf) != HEADER_SIZE:
        raise ProtocolError(
            ErrorCode.TRUNCATED, f"header is {len(buf)} bytes, expected {HEADER_SIZE}"
        )
    (
        magic,
        proto,
        op,
        dtype,
        comp,
        flags,
        error,
        tok,
        worker,
        shard,
        incarnation,
        version,
        step,
        offset,
        count,
        nbytes,
        nframes,
        bucket_size,
        aux,
    ) = HEADER.unpack(buf)
    if magic != MAGIC:
        raise ProtocolError(ErrorCode.BAD_MAGIC, "not an sgdjob message")
    if proto != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.BAD_VERSION, f"protocol version {proto}, expected {PROTOCOL_VERSION}"
        )
    op_e = _enum(Op, op, ErrorCode.BAD_OP, "op")
    dtype_e = _enum(DType, dtype, ErrorCode.BAD_DTYPE, "dtype")
    comp_e = _enum(Compression, comp, ErrorCode.BAD_DTYPE, "compression")
    err_e = _enum(ErrorCode, error, ErrorCode.BAD_PAYLOAD, "error code")
    if flags & ~int(Flags.FINISHED | Flags.DELTA):
        raise ProtocolError(ErrorCode.BAD_PAYLOAD, f"unknown flags {flags:#x}")
    # Compare the token in constant time; a foreign job's traffic must not be processed.
    if not hmac.compare_digest(tok, token):
        raise ProtocolError(ErrorCode.BAD_TOKEN, "job token does not match")
    if worker >= MAX_WORKERS:
        raise ProtocolError(ErrorCode.BAD_WORKER, f"worker id {worker} out of range")
    if nframes > MAX_FRAMES or nbytes > nframes * MAX_FRAME_BYTES:
        raise ProtocolError(ErrorCode.BAD_SIZE, f"{nbytes} bytes in {nframes} frames")
    if not math.isfinite(aux):
        raise ProtocolError(ErrorCode.NOT_FINITE, "aux is not finite")
    return Header(
        op=Op(op_e),
        token=tok,
        worker=worker,
        shard=shard,
        incarnation=incarnation,
        version=version,
        step=step,
        offset=offset,
        count=count,
        nbytes=nbytes,
        nframes=nframes,
        dtype=DType(dtype_e),
        compression=Compression(comp_e),
        flags=Flags(flags),
        error=ErrorCode(err_e),
        bucket_size=bucket_size,
        aux=aux,
        proto_version=proto,
    )


def check_range(header: Header, *, offset: int, count: int) -> None:
    """A vector payload must target a sub-range of the receiver's slice."""
    if header.offset < offset or header.offset + header.count > offset + count:
        raise ProtocolError(
            ErrorCode.BAD_RANGE,
            f"range [{header.offset}, {header.offset + header.count}) outside "
            f"[{offset}, {offset + count})",
        )


def check_frames(header: Header, frame_sizes: list[int]) -> None:
    """The payload frames must be exactly what the header announced."""
    if len(frame_sizes) != header.nframes:
        raise ProtocolError(
            ErrorCode.TRUNCATED, f"{len(frame_sizes)} payload frames, header says {header.nframes}"
        )
    if any(s > MAX_FRAME_BYTES for s in frame_sizes):
        raise ProtocolError(ErrorCode.BAD_SIZE, "payload frame larger than 16 MiB")
    if sum(frame_sizes) != header.nbytes:
        raise ProtocolError(
            ErrorCode.TRUNCATED, f"{sum(frame_sizes)} payload bytes, header says {header.nbytes}"
        )


def check_float32_payload(header: Header, frame_sizes: list[int]) -> None:
    """A float32 vector payload: whole elements per frame, count * 4 bytes in all."""
    check_frames(header, frame_sizes)
    if header.dtype != DType.FLOAT32:
        raise ProtocolError(ErrorCode.BAD_DTYPE, f"expected FLOAT32, got {header.dtype.name}")
    if header.compression != Compression.NONE or header.bucket_size:
        raise ProtocolError(ErrorCode.BAD_DTYPE, "a float32 payload carries no compression")
    if header.nbytes != header.count * 4:
        raise ProtocolError(
            ErrorCode.BAD_SIZE, f"{header.nbytes} bytes for {header.count} float32 elements"
        )
    if any(s % 4 for s in frame_sizes):
        raise ProtocolError(ErrorCode.BAD_SIZE, "a frame splits a float32 element")


@dataclass(frozen=True)
class Report:
    """Per-step progress a worker sends to the coordinator (shard 0)."""

    step: int
    loss: float
    step_time: float
    samples: int
    bytes_sent: int
    bytes_received: int
    eval_metric: float = math.nan  # the task's held-out metric; NaN: no evaluation here
    eval_loss: float = math.nan
    final: bool = False

    STRUCT = struct.Struct("<QddQQQddB")

    def pack(self) -> bytes:
        return self.STRUCT.pack(
            self.step,
            self.loss,
            self.step_time,
            self.samples,
            self.bytes_sent,
            self.bytes_received,
            self.eval_metric,
            self.eval_loss,
            1 if self.final else 0,
        )

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> Report:
        if len(buf) != cls.STRUCT.size:
            raise ProtocolError(
                ErrorCode.BAD_PAYLOAD, f"report is {len(buf)} bytes, expected {cls.STRUCT.size}"
            )
        step, loss, st, samples, bs, br, acc, eloss, final = cls.STRUCT.unpack(buf)
        if not (math.isfinite(loss) and math.isfinite(st) and st >= 0):
            raise ProtocolError(ErrorCode.NOT_FINITE, "report loss/step time not finite")
        if not (math.isnan(acc) or (math.isfinite(acc) and acc >= 0.0)):
            # Accuracy, RMSE and bits per token are all >= 0; NaN means "no evaluation".
            raise ProtocolError(ErrorCode.BAD_PAYLOAD, f"metric {acc} is not a finite value >= 0")
        if final > 1:
            raise ProtocolError(ErrorCode.BAD_PAYLOAD, "final flag must be 0 or 1")
        return cls(step, loss, st, samples, bs, br, acc, eloss, bool(final))
