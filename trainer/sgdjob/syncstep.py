"""The gradient parts a shard keeps for a step, and their in-place, worker-ordered sum.

A worker pushes its gradient for a shard's slice as one message or, overlapping with its
backward pass (``spec.training.bucketMB``), as several parts: disjoint sub-ranges that
together cover the slice. ``Coverage`` checks a part against what that worker already sent
for the step (exactly the same range again is a re-send, kept once; a partial overlap is
refused). ``PendingStep`` is sync mode's open step: it keeps each part as received
(zero-copy frames; 1-bit frames are 1/32 of the part's trainable elements, plus its buffers as
float32) and sums it into the shard's accumulator as soon as it is that range's turn, in
worker order, so the shard adds while the workers still compute and a fixed-seed run stays
bit-for-bit reproducible: every element is ``g[w0] + g[w1] + ...`` over the step's
contributors in ascending worker order, whatever order the parts arrived in.
``sgdjob.shard`` decides when a step closes and applies it.

With backup workers, which workers contribute is known only at close (the first ``replicas``
to cover their slice), so the parts are summed then; without, every worker that pushes for
the open step contributes, and a part is added on arrival when the workers before it in
order have added theirs for that range (else it waits, zero-copy, for its turn).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import zmq

from sgdjob.onebit_wire import OnebitPayload, SliceSplit, add_gradient, validate
from sgdjob.protocol import (
    Compression,
    DType,
    ErrorCode,
    Header,
    ProtocolError,
    check_float32_payload,
    check_frames,
    check_range,
)
from sgdjob.slicing import Slice
from sgdjob.transport import Incoming, frame_array


class Coverage:
    """The disjoint slice-local ranges ``[start, end)`` one worker pushed for one step."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.covered = 0

    def check(self, start: int, end: int) -> bool:
        """True if new, False for an exact re-send; ProtocolError on a partial overlap."""
        i = bisect.bisect_right(self.starts, start) - 1
        if i >= 0 and self.starts[i] == start and self.ends[i] == end:
            return False
        if (i >= 0 and self.ends[i] > start) or (
            i + 1 < len(self.starts) and self.starts[i + 1] < end
        ):
            raise ProtocolError(
                ErrorCode.BAD_RANGE, f"part [{start}, {end}) overlaps one pushed for this step"
            )
        return True

    def add(self, start: int, end: int) -> None:
        i = bisect.bisect_right(self.starts, start)
        self.starts.insert(i, start)
        self.ends.insert(i, end)
        self.covered += end - start


@dataclass
class Part:
    """One pushed range, slice-local, with its frames as received."""

    start: int
    end: int
    frames: list[zmq.Frame]
    # float32: (slice-local start, view) of every frame, no copy; 1-bit: of the raw buffers
    views: list[tuple[int, np.ndarray]] = field(default_factory=list)
    onebit: OnebitPayload | None = None  # 1-bit: the validated views of the frames
    split: SliceSplit | None = None  # 1-bit: the range's own split (``SliceSplit.part``)


def float_part(start: int, frames: list[zmq.Frame]) -> Part:
    views, at = [], start
    for frame in frames:
        arr = frame_array(frame)
        views.append((at, arr))
        at += arr.shape[0]
    return Part(start, at, frames, views)


def float_push(h: Header, msg: Incoming, slice_: Slice) -> Part:
    """Validate a float32 push of a sub-range of the slice; a view of its frames."""
    if h.count == 0:
        raise ProtocolError(ErrorCode.BAD_RANGE, "a push covers at least one element")
    check_range(h, offset=slice_.offset, count=slice_.count)
    check_float32_payload(h, msg.frame_sizes())
    part = float_part(h.offset - slice_.offset, list(msg.frames))
    for _, arr in part.views:
        if not all_finite(arr):
            raise ProtocolError(ErrorCode.NOT_FINITE, "gradient holds NaN or inf")
    return part


def all_finite(arr: np.ndarray) -> bool:
    """No NaN or infinity in ``arr``, in one pass and without a temporary array.

    A sum is NaN or infinite whenever an element is (inf + -inf is NaN); it can also overflow
    from finite elements, so only a non-finite sum pays for the exact elementwise check."""
    with np.errstate(over="ignore", invalid="ignore"):  # both are the answer here, not a fault
        if math.isfinite(float(np.add.reduce(arr))):
            return True
    return bool(np.isfinite(arr).all())


def onebit_push(
    h: Header, msg: Incoming, *, slice_: Slice, split: SliceSplit, bucket_size: int
) -> Part:
    """Validate a 1-bit push of the slice or of a sub-range of it (layout:
    ``sgdjob.onebit_wire``); the part keeps the frames and their validated views."""
    if h.dtype != DType.ONEBIT or h.compression != Compression.ONEBIT:
        raise ProtocolError(ErrorCode.BAD_DTYPE, "this job's gradients are 1-bit")
    if h.count == 0:
        raise ProtocolError(ErrorCode.BAD_RANGE, "a push covers at least one element")
    check_range(h, offset=slice_.offset, count=slice_.count)
    if h.bucket_size != bucket_size:
        raise ProtocolError(
            ErrorCode.BAD_PAYLOAD, f"bucket size {h.bucket_size}, job uses {bucket_size}"
        )
    check_frames(h, msg.frame_sizes())
    start = h.offset - slice_.offset
    part_split = split.part(start, start + h.count)
    payload = validate([f.buffer for f in msg.frames], split=part_split, bucket_size=bucket_size)
    raw = [(start + at, arr) for at, arr in payload.raw]
    return Part(start, start + h.count, list(msg.frames), raw, payload, part_split)


def fold(
    acc: np.ndarray,
    part: Part,
    a: int,
    b: int,
    *,
    first: bool,
    bucket_size: int,
    scale: np.float32 | None = None,
) -> None:
    """``acc[a:b] += part`` over ``[a, b)`` (slice-local, inside the part), or ``=`` when
    ``first``; then ``acc[a:b] *= scale`` if given, a frame at a time while it is in cache.
    A 1-bit part decodes straight into the accumulator when it is folded whole, as parts are
    when every worker cuts its gradient alike; a piece of one (parts that other workers cut
    elsewhere) is decoded whole into a scratch array first, since its buckets span the part."""
    if part.onebit is not None and part.split is not None:
        if (a, b) == (part.start, part.end):
            add_gradient(
                acc[a:b], part.onebit, split=part.split, bucket_size=bucket_size, first=first
            )
        else:
            scratch = np.empty(part.end - part.start, dtype=np.float32)
            add_gradient(
                scratch, part.onebit, split=part.split, bucket_size=bucket_size, first=True
            )
            piece = scratch[a - part.start : b - part.start]
            if first:
                np.copyto(acc[a:b], piece)
            else:
                acc[a:b] += piece
        if scale is not None:
            acc[a:b] *= scale
        return
    for at, view in part.views:
        lo, hi = max(a, at), min(b, at + view.shape[0])
        if lo >= hi:
            continue
        src = view[lo - at : hi - at]
        dst = acc[lo:hi]
        if first:
            np.copyto(dst, src)
        else:
            dst += src
        if scale is not None:
            dst *= scale


class PartialPushes:
    """Async modes: each worker's parts of one push, kept until they cover the slice.

    The staleness factor and the optimizer see the whole slice's gradient at once, as with
    one whole push; a push for another (step, version) from the worker replaces an unfinished
    one (the worker restarted)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.kept: dict[int, tuple[int, int, Coverage, list[Part]]] = {}

    def check(self, worker: int, *, step: int, version: int, part: Part) -> bool:
        """True if new; False for an exact re-send; ProtocolError on a partial overlap."""
        kept = self.kept.get(worker)
        if kept is None or (kept[0], kept[1]) != (step, version):
            return True
        return kept[2].check(part.start, part.end)

    def add(self, worker: int, *, step: int, version: int, part: Part) -> list[Part] | None:
        """Keep a part ``check`` accepted; all of the push's parts once they cover the slice."""
        if part.start == 0 and part.end == self.count:
            self.kept.pop(worker, None)
            return [part]
        kept = self.kept.get(worker)
        if kept is None or (kept[0], kept[1]) != (step, version):
            kept = (step, version, Coverage(), [])
            self.kept[worker] = kept
        kept[2].add(part.start, part.end)
        kept[3].append(part)
        if kept[2].covered < self.count:
            return None
        del self.kept[worker]
        return kept[3]


@dataclass
class _Segment:
    start: int
    end: int
    folded: tuple[int, ...] = ()  # workers summed into acc[start:end], in the order added
    # acc[start:end] holds the mean over ``folded`` (scaled right after the last addition,
    # while the range is still in cache), not the sum.
    averaged: bool = False


class PendingStep:
    """The open sync step: parts by worker, and the running sum in ``acc``.

    The last worker in order to be added to a range also scales it by ``1 / workers``, piece
    by piece as it adds (``fold``), so the step's mean costs no pass of its own over the slice
    at close: every element is ``(g[w0] + g[w1] + ...) * float32(1 / n)``, the same bits as
    a sum followed by a scaling."""

    def __init__(self, acc: np.ndarray, *, bucket_size: int, eager: bool) -> None:
        """``bucket_size``: the 1-bit codec's, for the parts of a 1-bit job."""
        self.acc = acc
        self.count = acc.shape[0]
        self.bucket_size = bucket_size
        self.eager = eager
        self.parts: dict[int, list[Part]] = {}
        self.coverage: dict[int, Coverage] = {}
        self.segments = [_Segment(0, self.count)]

    def __contains__(self, worker: object) -> bool:
        return worker in self.parts

    def __iter__(self) -> Iterator[int]:
        return iter(self.parts)

    def __len__(self) -> int:
        return len(self.parts)

    def complete(self) -> list[int]:
        """Workers whose parts cover the whole slice, ascending."""
        return sorted(w for w, c in self.coverage.items() if c.covered == self.count)

    def check(self, worker: int, start: int, end: int) -> bool:
        """Validate a part before it is accepted (see ``Coverage.check``)."""
        cov = self.coverage.get(worker)
        return True if cov is None else cov.check(start, end)

    def add(self, worker: int, part: Part, *, order: Iterable[int]) -> None:
        """Keep a part that ``check`` accepted as new; sum what is now in turn."""
        self.coverage.setdefault(worker, Coverage()).add(part.start, part.end)
        self.parts.setdefault(worker, []).append(part)
        if self.eager:
            self._advance(sorted(set(order) | set(self.parts)))

    def close(self, contributors: list[int]) -> np.ndarray:
        """The mean of the contributors' parts (summed in ascending order) in ``acc``;
        returns ``acc``."""
        want = tuple(contributors)
        if any(not set(s.folded) <= set(want) for s in self.segments):
            # Summed a worker that does not contribute after all: start over from the kept
            # frames (not reached without backup workers, where every pusher contributes).
            # A range averaged over fewer workers than contribute is redone by _advance.
            self.segments = [_Segment(0, self.count)]
        self._advance(contributors)
        scale = np.float32(1.0 / len(want)) if len(want) > 1 else None
        for s in self.segments:
            if s.folded != want:
                raise RuntimeError(f"range [{s.start}, {s.end}) summed {s.folded}, not {want}")
            if scale is not None and not s.averaged:
                self.acc[s.start : s.end] *= scale
        return self.acc

    def clear(self) -> None:
        self.parts.clear()
        self.coverage.clear()
        self.segments = [_Segment(0, self.count)]

    # -- summing -------------------------------------------------------------------------
    def _advance(self, order: list[int]) -> None:
        """Add every part whose turn it is, until none is; segments record who was added."""
        # A range averaged over fewer workers than ``order`` now holds (a worker beyond the
        # expected ones pushed) is summed again from the kept frames.
        self.segments = [
            _Segment(s.start, s.end) if s.averaged and s.folded != tuple(order) else s
            for s in self.segments
        ]
        progress = True
        while progress:
            progress = False
            out: list[_Segment] = []
            for seg in self.segments:
                nxt = next((w for w in order if w not in seg.folded), None)
                if nxt is None or nxt not in self.parts:
                    out.append(seg)
                    continue
                # The last worker in order completes the range: it averages as it adds.
                last = nxt == order[-1] and len(order) > 1
                scale = np.float32(1.0 / len(order)) if last else None
                at = seg.start
                for part in sorted(self.parts[nxt], key=lambda p: p.start):
                    a, b = max(part.start, seg.start), min(part.end, seg.end)
                    if a >= b:
                        continue
                    if a > at:
                        out.append(_Segment(at, a, seg.folded))
                    fold(
                        self.acc, part, a, b, first=not seg.folded,
                        bucket_size=self.bucket_size, scale=scale,
                    )  # fmt: skip
                    out.append(_Segment(a, b, (*seg.folded, nxt), averaged=last))
                    at = b
                    progress = True
                if at < seg.end:
                    out.append(_Segment(at, seg.end, seg.folded))
            self.segments = _merge(out)


def _merge(segments: list[_Segment]) -> list[_Segment]:
    out: list[_Segment] = []
    for s in segments:
        prev = out[-1] if out else None
        if (
            prev is not None
            and (prev.folded, prev.averaged) == (s.folded, s.averaged)
            and prev.end == s.start
        ):
            out[-1] = _Segment(prev.start, s.end, s.folded, s.averaged)
        else:
            out.append(s)
    return out
