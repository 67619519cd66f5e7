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

Workers that were sent the same answers hold the same parameters, bit for bit: in sync mode
that is every worker, every step. Their mirror is kept once, as a *state* (an id) shared by
them, and the update from a state to a version is encoded once and its bytes kept until no
worker is left in that state: the others get the same bytes, and so the same parameters. The
cost of the downlink is then one encode per step and shard, not one per worker. The first
worker to leave a state that others still hold takes a copy of the mirror along (a memcpy,
far cheaper than an encode), so a worker that later asks for another version (async, backup
workers) still gets an update from exactly what it holds.
"""

from __future__ import annotations

import dataclasses
import itertools
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
        self.state_of: dict[int, int] = {}  # worker -> the state it holds
        self.mirror_of: dict[int, ParameterMirror] = {}  # state -> its mirror (trainable part)
        self.full_at: dict[int, int] = {}  # version -> the state of full parameters sent then
        # (state, version) -> the update's frames and the state they lead to
        self.updates: dict[tuple[int, int], tuple[list[bytes], int]] = {}
        self._ids = itertools.count()
        self.answered: dict[int, int] = {}  # worker -> request number last answered
        self.last_update: dict[int, Reply] = {}

    @property
    def mirrors(self) -> dict[int, ParameterMirror]:
        """Worker -> the mirror of what it holds (shared by workers in one state)."""
        return {w: self.mirror_of[s] for w, s in self.state_of.items()}

    def forget(self, worker: int) -> None:
        """The worker (re)joined and holds no parameters: its next answer is full."""
        self.state_of.pop(worker, None)
        self.answered.pop(worker, None)
        self.last_update.pop(worker, None)
        self._prune()

    def repeat(self, worker: int, seq: int) -> list[Reply] | None:
        """None if request ``seq`` is new; else what to send again: the update it got, or
        nothing after a full answer (which set the mirror to the parameters of then)."""
        if self.split is None or self.answered.get(worker) != seq:
            return None
        cached = self.last_update.get(worker)
        return [] if cached is None else [cached]

    def answer(self, base: Header, *, final: bool) -> Reply:
        """The PARAMS reply whose common fields ``base`` holds (``step``: the request
        number; ``version``: the slice's version now) for the slice as it is now."""
        worker, split = base.worker, self.split
        state = self.state_of.get(worker)
        if split is not None and state is not None and not final:
            # The worker holds `state`: send the 1-bit update towards the parameters.
            frames, self.state_of[worker] = self._update(state, base.version, split)
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
            self._prune()
            return reply
        if split is not None:
            self.answered[worker] = base.step
            self.last_update.pop(worker, None)
            self.state_of[worker] = self._full(base.version, split)
            self._prune()
        frames_ = vector_frames(self.params, self.chunk_bytes)
        h = dataclasses.replace(
            base, nbytes=self.params.nbytes, nframes=len(frames_), dtype=DType.FLOAT32
        )
        return Reply(h, frames_, track=True)

    def _update(self, state: int, version: int, split: SliceSplit) -> tuple[list[bytes], int]:
        """The update from ``state`` to the parameters of ``version`` and the state it leads
        to: encoded once, the first time any worker in ``state`` asks for that version."""
        done = self.updates.get((state, version))
        if done is not None:
            return done
        mirror = self.mirror_of.pop(state)
        if sum(s == state for s in self.state_of.values()) > 1:
            # Others still hold `state`: keep it for them, advance a copy for this worker.
            self.mirror_of[state] = mirror
            mirror = ParameterMirror(mirror.mirror, self.bucket_size)
        enc = mirror.encode_update(self.params[: split.trainable])
        frames = update_frames(enc, self.params, split=split, chunk_bytes=self.chunk_bytes)
        after = next(self._ids)
        self.mirror_of[after] = mirror
        self.updates[(state, version)] = (frames, after)
        return frames, after

    def _full(self, version: int, split: SliceSplit) -> int:
        """The state of a worker sent the full parameters of ``version`` (shared by every
        worker sent them)."""
        state = self.full_at.get(version)
        if state is None or state not in self.mirror_of:
            state = next(self._ids)
            held = self.params[: split.trainable]
            self.mirror_of[state] = ParameterMirror(held, self.bucket_size)
            self.full_at = {version: state}
        return state

    def _prune(self) -> None:
        """Drop mirrors and kept updates of states no worker holds any more."""
        held = set(self.state_of.values())
        for state in [s for s in self.mirror_of if s not in held]:
            del self.mirror_of[state]
        for key in [k for k in self.updates if k[0] not in held]:
            del self.updates[key]
