"""What a shard answers a pull with: its slice in float32, or (serverToWorker) an update.

Without ``compression.serverToWorker`` every answer is the shard's float32 slice, sent
zero-copy (tracked: the shard waits for the send before it writes the slice again, ``Shard
.flush_sends``). With it, in a 1-bit job, a worker that holds parameters from an earlier
answer gets the 1-bit update of the slice's trainable part towards the parameters, relative
to what that worker holds (``sgdjob.mirror``), and the slice's buffers as raw float32
(``sgdjob.onebit_wire``), so every worker loads the shards' exact running statistics. A
worker's first pull after hello, and the final pull, get full float32 parameters.

``Downlink`` owns that per-worker state: the mirror of what each worker holds, the request
number it answered last and, if that answer was an update, its bytes: a re-sent request
gets the same bytes again, since encoding anew would advance the mirror a second time while
the worker applies one answer. It sends nothing itself: the shard sends what it returns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sgdjob.mirror import ParameterMirror
from sgdjob.onebit_wire import SliceSplit, update_frames
from sgdjob.protocol import Compression, DType, Flags, Header
from sgdjob.transport import vector_frames


@dataclass(frozen=True)
class Reply:
    """One PARAMS message to send; ``track``: its frames are views of the shard's slice."""

    header: Header
    frames: Sequence[memoryview | bytes]
    track: bool = False


class Downlink:
    """A shard's answers to pulls and, with serverToWorker, what each worker holds."""

    def __init__(
        self,
        params: np.ndarray,
        *,
        split: SliceSplit | None,
        bucket_size: int,
        chunk_bytes: int,
    ) -> None:
        """``params``: the shard's slice (updated in place by the shard); ``split``: the
        slice's 1-bit layout with serverToWorker, None when every answer is float32."""
        self.params = params
        self.split = split
        self.bucket_size = bucket_size
        self.chunk_bytes = chunk_bytes
        self.mirrors: dict[int, ParameterMirror] = {}  # worker -> what it holds (trainable)
        self.answered: dict[int, int] = {}  # worker -> request number last answered
        self.last_update: dict[int, Reply] = {}

    def forget(self, worker: int) -> None:
        """The worker (re)joined and holds no parameters: its next answer is full."""
        self.mirrors.pop(worker, None)
        self.answered.pop(worker, None)
        self.last_update.pop(worker, None)

    def repeat(self, worker: int, seq: int) -> list[Reply] | None:
        """None if request ``seq`` is new; else what to send again: the update it got, or
        nothing after a full answer (which set the mirror to the parameters of then)."""
        if self.split is None or self.answered.get(worker) != seq:
            return None
        cached = self.last_update.get(worker)
        return [] if cached is None else [cached]

    def answer(self, base: Header, *, final: bool) -> Reply:
        """The PARAMS reply whose common fields ``base`` holds (``step``: the request
        number) for the slice as it is now."""
        worker, split = base.worker, self.split
        mirror = self.mirrors.get(worker)
        if split is not None and mirror is not None and not final:
            # The worker holds `mirror`: send the 1-bit update towards the parameters.
            enc = mirror.encode_update(self.params[: split.trainable])
            frames = update_frames(enc, self.params, split=split, chunk_bytes=self.chunk_bytes)
            h = dataclasses.replace(
                base,
                nbytes=sum(map(len, frames)),
                nframes=len(frames),
                dtype=DType.ONEBIT,
                compression=Compression.ONEBIT,
                bucket_size=self.bucket_size,
                flags=base.flags | Flags.DELTA,
            )
            reply = Reply(h, frames)
            self.answered[worker] = base.step
            self.last_update[worker] = reply
            return reply
        if split is not None:
            self.answered[worker] = base.step
            self.last_update.pop(worker, None)
            held = self.params[: split.trainable]
            if mirror is None:
                self.mirrors[worker] = ParameterMirror(held, self.bucket_size)
            else:
                mirror.reset(held)
        frames_ = vector_frames(self.params, self.chunk_bytes)
        h = dataclasses.replace(
            base, nbytes=self.params.nbytes, nframes=len(frames_), dtype=DType.FLOAT32
        )
        return Reply(h, frames_, track=True)
