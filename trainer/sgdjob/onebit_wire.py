"""The payload of a 1-bit job's slice: trainable elements as 1-bit, buffers as raw float32.

A shard's slice of the flat vector (``sgdjob.models.flat``) may end in non-trainable buffers
(BatchNorm running statistics and batch counters): elements past the model's trainable count.
Sign quantisation suits gradients, which error feedback corrects over the next steps, but not
buffer changes and values: a quantised change can drive a running variance below zero
(BatchNorm then yields NaN), and a worker must load the shards' exact statistics. So in a
1-bit job only the trainable prefix of a slice is 1-bit; the buffer part travels as float32.

Both sides know the split without the header saying it: the slice (``offset``, ``count``,
from the WELCOME) and the model's trainable count (both build the model from the same spec).
``SliceSplit.of`` computes it. This module owns the layout of one PUSH or one PARAMS update
(``Flags.DELTA``). An update covers the whole slice. A PUSH covers the slice or, when the
worker pushes while backward runs (``sgdjob.overlap``), a part of it: a sub-range whose own
split (``SliceSplit.part``) says how many of its elements are trainable. The header's
``count`` is the range, ``nbytes`` the sum of all frames; for a range of ``count`` elements
of which ``trainable`` come first:

* frame 0: the prefix's packed sign bits, frame 1: its scales (``sgdjob.compression``'s layout
  for ``count = trainable`` elements, buckets counted from the range's first element; both
  frames are empty in a part that holds buffer elements only);
* frames 2 and on, only when the slice holds buffer elements: those elements as little-endian
  float32, in order, cut into non-empty frames of whole elements (``transport.vector_frames``,
  4 MiB each, as every float32 vector).
  In a PUSH they are the change of the worker's buffers since its pull (added by the shard
  with no learning rate, exactly as in a float32 job); in an update they are the shard's
  buffer values themselves, which the worker loads as they are.

A slice with no buffer elements is therefore exactly ``[bits, scales]``, as before buffers
travelled raw. ``validate`` checks an untrusted payload whole before anything is written and
raises ``ProtocolError``: wrong frame count ``BAD_PAYLOAD``, a bad 1-bit part ``BAD_PAYLOAD``
or ``NOT_FINITE``, raw frames of the wrong size ``BAD_SIZE``, a non-finite raw value
``NOT_FINITE``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sgdjob.compression import (
    CompressionError,
    Encoded,
    ErrorFeedback,
    NotFiniteError,
    Payload,
    Vector,
    decode_into,
    validate_payload,
)
from sgdjob.protocol import ErrorCode, ProtocolError
from sgdjob.slicing import Slice
from sgdjob.transport import vector_frames


@dataclass(frozen=True)
class SliceSplit:
    """One slice in a 1-bit job: ``trainable`` 1-bit elements first, then raw buffer ones."""

    count: int
    trainable: int

    @classmethod
    def of(cls, slice_: Slice, trainable: int | None) -> SliceSplit:
        """``trainable``: the trainable elements of the whole vector (None: every element)."""
        local = slice_.count if trainable is None else trainable - slice_.offset
        return cls(count=slice_.count, trainable=max(0, min(slice_.count, local)))

    @property
    def buffers(self) -> int:
        return self.count - self.trainable

    def part(self, start: int, end: int) -> SliceSplit:
        """The split of the slice-local range ``[start, end)``."""
        if not 0 <= start < end <= self.count:
            raise ValueError(f"part [{start}, {end}) outside [0, {self.count})")
        return SliceSplit(count=end - start, trainable=max(0, min(end, self.trainable) - start))


@dataclass(frozen=True)
class OnebitPayload:
    """A validated payload: zero-copy views of the received frames."""

    bits: np.ndarray
    scales: np.ndarray
    # (start in the pushed range, float32 view) of every raw frame: [trainable, count)
    raw: list[tuple[int, np.ndarray]]


def validate(frames: Sequence[Payload], *, split: SliceSplit, bucket_size: int) -> OnebitPayload:
    """Check the payload frames of a 1-bit message over a range laid out as ``split`` (their
    count and sum of bytes already match the header: ``protocol.check_frames``)."""
    if split.buffers == 0 and len(frames) != 2:
        raise ProtocolError(ErrorCode.BAD_PAYLOAD, "a 1-bit payload is [bits, scales]")
    if split.buffers and len(frames) < 3:
        raise ProtocolError(
            ErrorCode.BAD_PAYLOAD,
            f"a slice with {split.buffers} buffer elements is [bits, scales, float32 buffers]",
        )
    try:
        bits, scales = validate_payload(
            frames[0], frames[1], count=split.trainable, bucket_size=bucket_size
        )
    except NotFiniteError as err:
        raise ProtocolError(ErrorCode.NOT_FINITE, str(err)) from None
    except CompressionError as err:
        raise ProtocolError(ErrorCode.BAD_PAYLOAD, str(err)) from None
    raw: list[tuple[int, np.ndarray]] = []
    at, nbytes = split.trainable, 0
    for frame in frames[2:]:
        mv = memoryview(frame).cast("B")  # type: ignore[arg-type]  # numpy's stubs predate Buffer
        if mv.nbytes % 4 or not mv.nbytes:  # a sender cuts whole, non-empty frames
            raise ProtocolError(ErrorCode.BAD_SIZE, "a frame splits a float32 buffer element")
        nbytes += mv.nbytes
        if nbytes <= 4 * split.buffers:  # past that: refused below, with the total
            raw.append((at, np.frombuffer(mv, dtype="<f4")))
            at += mv.nbytes // 4
    if nbytes != 4 * split.buffers:
        raise ProtocolError(
            ErrorCode.BAD_SIZE,
            f"{nbytes} bytes of buffers, expected {4 * split.buffers} ({split.buffers} float32)",
        )
    if not all(np.isfinite(arr).all() for _, arr in raw):
        raise ProtocolError(ErrorCode.NOT_FINITE, "a buffer value is NaN or infinite")
    return OnebitPayload(bits=bits, scales=scales, raw=raw)


def decode_prefix(acc: Vector, payload: OnebitPayload, *, split: SliceSplit, bs: int) -> None:
    """``acc[:trainable] += q`` for an ``acc`` as long as the range (a validated payload
    cannot fail)."""
    decode_into(
        acc[: split.trainable], payload.bits, payload.scales, count=split.trainable, bucket_size=bs
    )


def add_gradient(
    acc: np.ndarray, payload: OnebitPayload, *, split: SliceSplit, bucket_size: int, first: bool
) -> None:
    """A push into the range of a shard's accumulator it covers (``acc``, as long as the
    range): ``acc += payload``, or ``acc = payload`` when ``first`` (nothing summed yet)."""
    if first:
        acc[: split.trainable].fill(0.0)
    decode_prefix(acc, payload, split=split, bs=bucket_size)
    for start, arr in payload.raw:
        dst = acc[start : start + arr.shape[0]]
        if first:
            np.copyto(dst, arr)
        else:
            dst += arr


def apply_update(
    held: np.ndarray, payload: OnebitPayload, *, split: SliceSplit, bucket_size: int
) -> None:
    """A shard's update into what a worker holds of the slice: the prefix moves by the 1-bit
    update, the buffers become the shard's values."""
    decode_prefix(held, payload, split=split, bs=bucket_size)
    for start, arr in payload.raw:
        held[start : start + arr.shape[0]] = arr


def push_frames(
    ef: ErrorFeedback, grad: Vector, *, split: SliceSplit, chunk_bytes: int, at: int = 0
) -> tuple[list[memoryview], bool]:
    """Encode a worker's gradient for a PUSH of a slice, or of the part of it that starts at
    slice-local element ``at`` (``grad`` is that range, on the worker's device; ``split`` its
    split). Returns the frames and whether any of them is a view of ``grad`` (then the send
    must be tracked and ``grad`` left alone until it is done). The error feedback covers the
    slice's trainable prefix only: ``ef`` counts from the slice's first element."""
    enc = ef.encode_range(grad[: split.trainable], at) if split.trainable else None
    empty = np.zeros(0, np.uint8).data
    frames = [enc.bits.data, enc.scales.data] if enc is not None else [empty, empty]
    if not split.buffers:
        return frames, False
    rest = grad[split.trainable :]
    borrowed = not (isinstance(rest, torch.Tensor) and rest.device.type != "cpu")
    if isinstance(rest, torch.Tensor):
        # A CPU tensor shares its memory with the array; a device tensor comes to the host
        # (its buffers only: the few elements of a BatchNorm's statistics).
        rest = rest.detach().numpy() if rest.device.type == "cpu" else rest.detach().cpu().numpy()
    return [*frames, *vector_frames(np.ascontiguousarray(rest), chunk_bytes)], borrowed


def update_frames(
    enc: Encoded, params: np.ndarray, *, split: SliceSplit, chunk_bytes: int
) -> list[bytes]:
    """A shard's PARAMS update of the slice ``params``: the encoded prefix update and the raw
    buffer values, copied (the reply is kept to answer a re-sent pull with the same bytes)."""
    frames = [enc.bits.tobytes(), enc.scales.tobytes()]
    if split.buffers:
        frames += [bytes(f) for f in vector_frames(params[split.trainable :], chunk_bytes)]
    return frames
