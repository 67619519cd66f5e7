"""Messages for fuzzing a shard: header fields by name, and mutations of valid messages.

A mutation in a ``*_CHECKS`` table changes one thing that the protocol forbids and says which
``ErrorCode`` the shard must reject it with; ``random_change`` changes something at random and
promises nothing. Both take the rig of ``tests.test_fuzz_shard`` (a shard plus valid messages
for its current state) and a message ``(header bytes, payload frames)``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from sgdjob.protocol import (
    HEADER,
    HEADER_SIZE,
    MAX_FRAME_BYTES,
    MAX_FRAMES,
    MAX_WORKERS,
    PROTOCOL_VERSION,
    Compression,
    DType,
    ErrorCode,
    Op,
    Report,
)
from tests.test_shard import TOKEN

if TYPE_CHECKING:
    from tests.test_fuzz_shard import Rig

FIELDS = [
    "magic",
    "proto_version",
    "op",
    "dtype",
    "compression",
    "flags",
    "error",
    "token",
    "worker",
    "shard",
    "incarnation",
    "version",
    "step",
    "offset",
    "count",
    "nbytes",
    "nframes",
    "bucket_size",
    "aux",
]
IDX = {name: i for i, name in enumerate(FIELDS)}
U8, U16, U32, U64 = 0xFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF
FIELD_MAX = dict(proto_version=U16, op=U8, dtype=U8, compression=U8, flags=U8, error=U16)
FIELD_MAX.update(worker=U32, shard=U32, incarnation=U32, nframes=U32, bucket_size=U32)
FIELD_MAX.update(version=U64, step=U64, offset=U64, count=U64, nbytes=U64)
STEPS = 1000  # steps per worker: the sync shard never finishes during a run
COUNT = 20
BUCKET = 8
REQUESTS = (Op.HELLO, Op.PUSH, Op.PULL, Op.REPORT, Op.DONE)

Wire = tuple[bytes, list[bytes]]  # header, payload frames (a message as it comes off a socket)


def set_field(header: bytes, name: str, value: object) -> bytes:
    fields = list(HEADER.unpack(header))
    fields[IDX[name]] = value
    return HEADER.pack(*fields)


def get_field(header: bytes, name: str) -> Any:
    return HEADER.unpack(header)[IDX[name]]


# ----------------------------------------------------------------------------- mutations

Mutate = Callable[["Rig", Wire], tuple[Wire, ErrorCode | None]]
E = ErrorCode


def field_to(name: str, *values: Any, code: ErrorCode) -> Mutate:
    """Set one header field to one of ``values`` (a callable gets the rig and the header)."""

    def mutate(rig: Rig, wire: Wire) -> tuple[Wire, ErrorCode | None]:
        value = rig.rng.choice(values)
        if callable(value):
            value = value(rig, wire[0])
        return (set_field(wire[0], name, value), wire[1]), code

    return mutate


def frames_to(
    change: Callable[[Rig, list[bytes]], list[bytes]], *, code: ErrorCode, keep_header: bool = False
) -> Mutate:
    """Change the payload frames; the header follows (nframes, nbytes) unless kept."""

    def mutate(rig: Rig, wire: Wire) -> tuple[Wire, ErrorCode | None]:
        frames = change(rig, list(wire[1]))
        h = wire[0]
        if not keep_header:
            h = set_field(set_field(h, "nframes", len(frames)), "nbytes", sum(map(len, frames)))
        return (h, frames), code

    return mutate


def report_with(**fields: Any) -> Callable[[Rig, list[bytes]], list[bytes]]:
    names = [
        "step",
        "loss",
        "step_time",
        "samples",
        "bytes_sent",
        "bytes_received",
        "acc",
        "eval_loss",
        "final",
    ]

    def change(rig: Rig, frames: list[bytes]) -> list[bytes]:
        values = list(Report.STRUCT.unpack(frames[0]))
        name, choices = rig.rng.choice(sorted(fields.items()))
        values[names.index(name)] = rig.rng.choice(choices)
        return [Report.STRUCT.pack(*values)]

    return change


def with_scale(index: int, *values: float) -> Callable[[Rig, list[bytes]], list[bytes]]:
    def change(rig: Rig, frames: list[bytes]) -> list[bytes]:
        scales = np.frombuffer(frames[1], np.float32).copy()
        scales[rig.rng.randrange(index, scales.size, 2)] = rig.rng.choice(values)
        return [frames[0], scales.tobytes(), *frames[2:]]  # buffer frames, if any, as they were

    return change


def nonfinite_element(rig: Rig, frames: list[bytes]) -> list[bytes]:
    grad = np.frombuffer(b"".join(frames), np.float32).copy()
    grad[rig.rng.randrange(COUNT)] = rig.rng.choice([np.nan, np.inf, -np.inf])
    return [grad.tobytes()]


def nonfinite_buffer(rig: Rig, frames: list[bytes]) -> list[bytes]:
    raw = np.frombuffer(b"".join(frames[2:]), np.float32).copy()
    raw[rig.rng.randrange(raw.size)] = rig.rng.choice([np.nan, np.inf, -np.inf])
    return [*frames[:2], raw.tobytes()]


def split_off_buffer_element(rig: Rig, frames: list[bytes]) -> list[bytes]:
    return [*frames[:2], *split_off_element(rig, frames[2:])]


def split_off_element(rig: Rig, frames: list[bytes]) -> list[bytes]:
    raw = b"".join(frames)
    cut = rig.rng.choice([p for p in range(1, len(raw)) if p % 4])
    return [raw[:cut], raw[cut:]]


def shorten_a_frame(rig: Rig, frames: list[bytes]) -> list[bytes]:
    i = rig.rng.choice([i for i, f in enumerate(frames) if f])
    return [*frames[:i], frames[i][: rig.rng.randrange(len(frames[i]))], *frames[i + 1 :]]


def bad_magic(rig: Rig, header: bytes) -> bytes:
    return rig.rng.choice([b"SGDj", b"\0\0\0\0", b"JDGS", rig.rng.randbytes(4) + b"!"])[:4]


def flip_token_bit(rig: Rig, header: bytes) -> bytes:
    tok = bytearray(get_field(header, "token"))
    tok[rig.rng.randrange(16)] ^= 1 << rig.rng.randrange(8)
    return bytes(tok)


HEADER_CHECKS: list[tuple[str, Mutate]] = [
    ("truncated header", lambda r, w: ((w[0][: r.rng.randrange(HEADER_SIZE)], w[1]), E.TRUNCATED)),
    (
        "extended header",
        lambda r, w: ((w[0] + r.rng.randbytes(r.rng.randint(1, 9)), w[1]), E.TRUNCATED),
    ),
    ("bad magic", field_to("magic", bad_magic, code=E.BAD_MAGIC)),
    ("another protocol version", field_to("proto_version", 0, 1, 2, 4, U16, code=E.BAD_VERSION)),
    ("unknown op", field_to("op", 0, 9, 10, U8, code=E.BAD_OP)),
    ("a reply op", field_to("op", Op.WELCOME, Op.PARAMS, Op.ERROR, code=E.BAD_OP)),
    ("unknown dtype", field_to("dtype", 3, U8, code=E.BAD_DTYPE)),
    ("unknown compression", field_to("compression", 2, U8, code=E.BAD_DTYPE)),
    ("unknown error code", field_to("error", 15, U16, code=E.BAD_PAYLOAD)),
    ("unknown flags", field_to("flags", 4, 8, 0x80, U8, code=E.BAD_PAYLOAD)),
    ("wrong token", field_to("token", flip_token_bit, code=E.BAD_TOKEN)),
    ("worker beyond the protocol", field_to("worker", MAX_WORKERS, U32, code=E.BAD_WORKER)),
    (
        "worker beyond the job",
        field_to(
            "worker",
            lambda r, h: r.n_workers,
            lambda r, h: r.n_workers + 1,
            MAX_WORKERS - 1,
            code=E.BAD_WORKER,
        ),
    ),
    ("wrong shard", field_to("shard", 1, 2, U32, code=E.BAD_SHARD)),
    ("too many frames", field_to("nframes", MAX_FRAMES + 1, U32, code=E.BAD_SIZE)),
    (
        "more bytes than frames hold",
        field_to(
            "nbytes",
            lambda r, h: get_field(h, "nframes") * MAX_FRAME_BYTES + 1,
            U64,
            code=E.BAD_SIZE,
        ),
    ),
    ("aux not finite", field_to("aux", math.nan, math.inf, -math.inf, code=E.NOT_FINITE)),
]
NO_PAYLOAD_CHECKS: list[tuple[str, Mutate]] = [
    (
        "a payload frame",
        frames_to(lambda r, f: [r.rng.randbytes(r.rng.randrange(9))], code=E.BAD_SIZE),
    ),
    ("announced frames", field_to("nframes", 1, 2, code=E.BAD_SIZE)),
    ("announced bytes", field_to("nbytes", 1, 4, code=E.BAD_SIZE)),
]
HELLO_CHECKS: list[tuple[str, Mutate]] = [
    (
        "another model size",
        field_to("aux", COUNT - 1, COUNT + 1, 0.0, -COUNT, 1e300, 2.0**64, code=E.BAD_SIZE),
    ),
    ("another step count", field_to("step", 0, STEPS - 1, STEPS + 1, U64, code=E.BAD_STATE)),
]
REPORT_CHECKS: list[tuple[str, Mutate]] = [
    ("short report", frames_to(lambda r, f: [f[0][: r.rng.randrange(65)]], code=E.BAD_PAYLOAD)),
    ("long report", frames_to(lambda r, f: [f[0] + b"\0"], code=E.BAD_PAYLOAD)),
    ("two report frames", frames_to(lambda r, f: [f[0], f[0]], code=E.BAD_PAYLOAD)),
    ("no report frame", frames_to(lambda r, f: [], code=E.BAD_PAYLOAD)),
    (
        "report not finite",
        frames_to(
            report_with(loss=[math.nan, math.inf], step_time=[-1.0, math.nan, math.inf]),
            code=E.NOT_FINITE,
        ),
    ),
    (
        "report nonsense",
        frames_to(
            report_with(acc=[-1.5, -0.1, math.inf, -math.inf], final=[2, U8]), code=E.BAD_PAYLOAD
        ),
    ),
]
PUSH_CHECKS: list[tuple[str, Mutate]] = [
    ("offset off the slice", field_to("offset", 1, COUNT - 1, COUNT, U64, code=E.BAD_RANGE)),
    ("count off the slice", field_to("count", 0, COUNT + 1, U64, code=E.BAD_RANGE)),
    (
        "gradient from the future",
        field_to("version", lambda r, h: r.shard.version + 1, U64, code=E.BAD_STATE),
    ),
    ("a missing frame", frames_to(lambda r, f: f[:-1], code=E.TRUNCATED, keep_header=True)),
    ("an extra frame", frames_to(lambda r, f: [*f, b"\0" * 4], code=E.TRUNCATED, keep_header=True)),
    (
        "a frame announced but not sent",
        field_to("nframes", lambda r, h: get_field(h, "nframes") + 1, code=E.TRUNCATED),
    ),
    (
        "bytes off by one",
        field_to(
            "nbytes",
            lambda r, h: get_field(h, "nbytes") + 1,
            lambda r, h: get_field(h, "nbytes") - 1,
            code=E.TRUNCATED,
        ),
    ),
    ("a short frame", frames_to(shorten_a_frame, code=E.TRUNCATED, keep_header=True)),
]
FP32_CHECKS: list[tuple[str, Mutate]] = [
    # A part of the slice is a valid push (overlap with backward), but not with these bytes.
    ("count not the bytes", field_to("count", 1, COUNT - 1, code=E.BAD_SIZE)),
    ("NaN or inf in the gradient", frames_to(nonfinite_element, code=E.NOT_FINITE)),
    ("not float32", field_to("dtype", DType.NONE, DType.ONEBIT, code=E.BAD_DTYPE)),
    ("a frame splits an element", frames_to(split_off_element, code=E.BAD_SIZE)),
    ("more bytes than elements", frames_to(lambda r, f: [*f, b"\0" * 4], code=E.BAD_SIZE)),
]
ONEBIT_CHECKS: list[tuple[str, Mutate]] = [
    ("float32 to a 1-bit job", field_to("dtype", DType.FLOAT32, DType.NONE, code=E.BAD_DTYPE)),
    ("uncompressed to a 1-bit job", field_to("compression", Compression.NONE, code=E.BAD_DTYPE)),
    (
        "another bucket size",
        field_to("bucket_size", 0, BUCKET - 1, BUCKET + 1, U32, code=E.BAD_PAYLOAD),
    ),
    ("bits without scales", frames_to(lambda r, f: f[:1], code=E.BAD_PAYLOAD)),
    (
        "a byte of bits too many",
        frames_to(lambda r, f: [f[0] + b"\0", *f[1:]], code=E.BAD_PAYLOAD),
    ),
    ("a byte of bits too few", frames_to(lambda r, f: [f[0][:-1], *f[1:]], code=E.BAD_PAYLOAD)),
    (
        "padding bits set",
        frames_to(lambda r, f: [f[0][:-1] + bytes([f[0][-1] | 0x80]), *f[1:]], code=E.BAD_PAYLOAD),
    ),
    (
        "a scale not finite",
        frames_to(with_scale(0, math.nan, math.inf, -math.inf), code=E.NOT_FINITE),
    ),
    ("a positive mu_minus", frames_to(with_scale(0, 0.5, 1e30), code=E.BAD_PAYLOAD)),
    ("a negative mu_plus", frames_to(with_scale(1, -0.5, -1e-30), code=E.BAD_PAYLOAD)),
    (
        "a bucket too many",
        frames_to(lambda r, f: [f[0], f[1] + bytes(8), *f[2:]], code=E.BAD_PAYLOAD),
    ),
]
# A slice with no buffer elements is exactly [bits, scales] (sgdjob.onebit_wire) ...
WHOLE_SLICE_CHECKS: list[tuple[str, Mutate]] = [
    ("three frames", frames_to(lambda r, f: [*f, b""], code=E.BAD_PAYLOAD)),
]
# ... and one that ends in buffers has them as float32 frames after the 1-bit part.
BUFFER_CHECKS: list[tuple[str, Mutate]] = [
    ("the buffer frames missing", frames_to(lambda r, f: f[:2], code=E.BAD_PAYLOAD)),
    ("an empty buffer frame", frames_to(lambda r, f: [*f, b""], code=E.BAD_SIZE)),
    ("a buffer element too many", frames_to(lambda r, f: [*f, bytes(4)], code=E.BAD_SIZE)),
    ("a buffer element too few", frames_to(lambda r, f: [*f[:2], f[2][:-4]], code=E.BAD_SIZE)),
    ("a frame splits a buffer element", frames_to(split_off_buffer_element, code=E.BAD_SIZE)),
    ("NaN or inf in the buffers", frames_to(nonfinite_buffer, code=E.NOT_FINITE)),
]


def checks_for(rig: Rig) -> list[tuple[str, Callable[[], Wire], Mutate]]:
    """(name, base message, mutation) for every mutation that must be rejected."""
    out = [(n, rig.valid, m) for n, m in HEADER_CHECKS]
    for base in (rig.hello, rig.pull, rig.done):
        out += [(f"{base.__name__}: {n}", base, m) for n, m in NO_PAYLOAD_CHECKS]
    out += [(f"hello: {n}", rig.hello, m) for n, m in HELLO_CHECKS]
    out += [(f"report: {n}", rig.report, m) for n, m in REPORT_CHECKS]
    if rig.onebit:
        push_checks = PUSH_CHECKS + ONEBIT_CHECKS
        push_checks += BUFFER_CHECKS if rig.split.buffers else WHOLE_SLICE_CHECKS
    else:
        push_checks = PUSH_CHECKS + FP32_CHECKS
    return out + [(f"push: {n}", rig.push, m) for n, m in push_checks]


def boundary(rng: random.Random, name: str, header: bytes) -> Any:
    if name == "aux":
        return rng.choice([0.0, -0.0, float(COUNT), COUNT + 0.5, 1e308, -1e-308, math.nan])
    if name in ("magic", "token"):
        return rng.randbytes(len(get_field(header, name)))
    top, now = FIELD_MAX[name], get_field(header, name)
    return rng.choice([0, 1, top - 1, top, min(top, now + 1), max(0, now - 1), rng.randint(0, top)])


def random_change(rig: Rig, wire: Wire) -> Wire:
    """One random change: no promise about the outcome."""
    rng, (header, frames) = rig.rng, wire
    kind = rng.randrange(8)
    if len(header) != HEADER_SIZE and kind in (0, 1, 2, 4):
        kind = 0 if header else 7  # no fields to set in a header of the wrong size
    if kind == 0:  # flip a few bytes anywhere in the header
        buf = bytearray(header)
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] ^= rng.randint(1, 255)
        return bytes(buf), frames
    if kind in (1, 2):  # one or two fields set to a boundary value
        for name in rng.sample(FIELDS[1:], rng.randint(1, 2)):
            header = set_field(header, name, boundary(rng, name, header))
        return header, frames
    if kind == 3 and any(frames):  # flip bytes inside the payload
        i = rng.choice([i for i, f in enumerate(frames) if f])
        buf = bytearray(frames[i])
        buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        return header, [*frames[:i], bytes(buf), *frames[i + 1 :]]
    if kind == 4:  # random frames, sometimes with a header that announces them
        frames = [
            rng.randbytes(rng.choice([0, 1, 3, 4, 8, 65, 80, rng.randrange(200)]))
            for _ in range(rng.randrange(4))
        ]
        if rng.random() < 0.5:
            header = set_field(
                set_field(header, "nframes", len(frames)), "nbytes", sum(map(len, frames))
            )
        return header, frames
    if kind == 5:  # another valid message's header over these frames
        return rig.valid()[0], frames
    if kind == 6:  # random fields behind a right magic, version and token
        fields = list(HEADER.unpack(rng.randbytes(HEADER_SIZE)))
        fields[0], fields[1], fields[7] = b"SGDJ", PROTOCOL_VERSION, TOKEN
        fields[2] = rng.choice([*REQUESTS, fields[2]])
        return HEADER.pack(*fields), frames
    return rng.randbytes(rng.choice([0, HEADER_SIZE, rng.randrange(300)])), frames
