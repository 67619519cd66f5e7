"""A worker's connections to every shard: hello, push, pull, report, done.

One DEALER per shard. Requests go out to all shards before any reply is read, so the shards
work in parallel, and replies are taken in the order they arrive, so each slice is copied in
as soon as its shard answers. Received parameter frames are copied exactly once, into the
caller's flat host buffer; outgoing gradient slices are zero-copy views whose trackers are
awaited before the caller may overwrite the buffer (``wait_sent``). ``push_part`` sends one
part of a slice that backward finished while the rest of backward still runs.

In a 1-bit job each slice travels as ``sgdjob.onebit_wire`` lays it out: the trainable part
1-bit with this worker's error feedback, the buffers (BatchNorm statistics) raw float32, both
in a push and in a serverToWorker update.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import zmq

from sgdjob.api.types import CompressionSpec
from sgdjob.compression import ErrorFeedback
from sgdjob.onebit_wire import SliceSplit, apply_update, push_frames, validate
from sgdjob.protocol import (
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
)
from sgdjob.slicing import Slice, partition
from sgdjob.transport import CurveClient, Incoming, connect_dealer, frame_array, vector_frames


class ShardUnavailable(RuntimeError):
    """A shard did not answer within the communication timeout."""


class ShardRejected(RuntimeError):
    """A shard answered ERROR: this worker is misconfigured (wrong model, token, ...)."""


class ShardRestarted(RuntimeError):
    """Shard ``shard`` is a new process (new incarnation); the client already said hello again.

    ``version`` is the version the shard restored; in sync mode it may have gone back, and the
    worker resumes from there.
    """

    def __init__(self, shard: int, version: int = 0) -> None:
        super().__init__(f"shard {shard} restarted (now at version {version})")
        self.shard = shard
        self.version = version


RETRY_S = 2.0  # an unanswered request is re-sent this often (it may have died with a shard)


@dataclass(frozen=True)
class Welcome:
    slice: Slice
    version: int
    incarnation: int
    resume_step: int


class ShardClient:
    """The worker's side of the protocol, for all shards at once."""

    def __init__(
        self,
        *,
        ctx: zmq.Context[zmq.Socket[bytes]],
        addrs: tuple[str, ...],
        token: bytes,
        worker: int,
        timeout_s: float | None,
        chunk_bytes: int,
        compression: CompressionSpec | None = None,
        ef_device: torch.device | str = "cpu",
        curve: CurveClient | None = None,
    ) -> None:
        comp = compression or CompressionSpec()
        self.onebit = comp.kind == "onebit"
        self.bucket_size = comp.bucket_size
        self.error_feedback = comp.error_feedback
        self.server_to_worker = self.onebit and comp.server_to_worker
        self.ef_device = ef_device
        self.efs: list[ErrorFeedback] = []  # one residual per slice's trainable part (1-bit)
        self.trainable: int | None = None  # trainable elements of the vector (None: all)
        self.recon: np.ndarray | None = None  # serverToWorker: what the shards think we hold
        self.token = token
        self.worker = worker
        # None: wait as long as it takes (the executor enforces the job's deadlines).
        self.timeout_s = timeout_s
        self.chunk_bytes = chunk_bytes
        self.endpoints = [connect_dealer(ctx, a, curve=curve) for a in addrs]
        self.slices: list[Slice] = []
        self.incarnations: list[int] = []
        self.trackers: list[zmq.MessageTracker] = []
        self.seq = 0  # pull request number, echoed by the shards to tell stale replies apart
        self.total_size = 0
        self.total_steps = 0

    @property
    def bytes_sent(self) -> int:
        return sum(e.counters.bytes_sent for e in self.endpoints)

    @property
    def bytes_received(self) -> int:
        return sum(e.counters.bytes_received for e in self.endpoints)

    def _header(self, op: Op, shard: int, **kw: object) -> Header:
        return Header(op=op, token=self.token, worker=self.worker, shard=shard, **kw)  # type: ignore[arg-type]

    def _recv(
        self,
        shard: int,
        expect: Op,
        *,
        resend: Callable[[], None] | None = None,
        seq: int | None = None,
        check_incarnation: bool = True,
    ) -> tuple[Header, Incoming]:
        """The next ``expect`` reply from ``shard``; stale replies to older requests are skipped.

        Raises ShardRestarted when the reply comes from another incarnation than the one we
        greeted (or the shard no longer knows us), ShardRejected on any other ERROR, and
        ShardUnavailable after the communication timeout.
        """
        ep = self.endpoints[shard]
        limit = self.timeout_s
        deadline = math.inf if limit is None else time.monotonic() + limit
        next_resend = time.monotonic() + RETRY_S
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise ShardUnavailable(f"shard {shard} sent no {expect.name} for {limit:.0f}s")
            until = min(deadline, next_resend) if resend is not None else deadline
            if not ep.poll(max(1, int(min(until - now, RETRY_S) * 1000))):
                if resend is not None and time.monotonic() >= next_resend:
                    resend()
                    next_resend = time.monotonic() + RETRY_S
                continue
            msg = ep.recv()
            if msg is None:
                continue
            h = parse_header(msg.header, token=self.token)
            if check_incarnation:
                h = self._check_reply(shard, msg)
            if h.op == Op.ERROR:
                if h.error == ErrorCode.UNKNOWN_WORKER:
                    raise ShardRestarted(shard)
                raise ShardRejected(f"shard {shard} rejected a request: {h.error.name}")
            if h.op != expect or (seq is not None and h.step < seq):
                continue  # a late answer to a request we already gave up on or re-sent
            return h, msg

    def hello(self, total_size: int, *, total_steps: int, trainable: int | None = None) -> Welcome:
        """Register with every shard; they learn the model size and the steps per worker.
        ``trainable``: how many leading elements are trainable, the rest are buffers (the
        shards derive the same from the model; None: every element is trainable)."""
        self.total_size, self.total_steps = total_size, total_steps
        self.trainable = trainable
        for k in range(len(self.endpoints)):
            self._send_hello(k)
        slices, incs, versions, steps = [], [], [], []
        for k in range(len(self.endpoints)):
            h, _ = self._recv(k, Op.WELCOME, resend=functools.partial(self._send_hello, k))
            slices.append(Slice(shard=k, offset=h.offset, count=h.count))
            incs.append(h.incarnation)
            versions.append(h.version)
            steps.append(h.step)
        # The shards' slices must tile our vector exactly as we would cut it ourselves.
        if slices != partition(total_size, len(self.endpoints)):
            raise ShardRejected(f"shard slices {slices} do not tile {total_size} parameters")
        self.slices, self.incarnations = slices, incs
        if self.onebit:
            self.efs = [
                ErrorFeedback(
                    self.split(s).trainable,
                    self.bucket_size,
                    enabled=self.error_feedback,
                    device=self.ef_device,
                )
                for s in slices
            ]
        if self.server_to_worker:
            self.recon = np.zeros(total_size, dtype=np.float32)
        # Shards restored from checkpoints may stand at different versions (a resumed run,
        # interrupted between two shards' saves): resume at the oldest; the others drop the
        # replayed steps they already closed.
        return Welcome(
            slice=slices[0], version=min(versions), incarnation=incs[0], resume_step=min(steps)
        )

    def split(self, s: Slice) -> SliceSplit:
        """How a slice travels in a 1-bit job: trainable part 1-bit, buffers raw."""
        return SliceSplit.of(s, self.trainable)

    def _send_hello(self, k: int) -> None:
        self.endpoints[k].send(
            self._header(Op.HELLO, k, step=self.total_steps, aux=float(self.total_size))
        )

    def resync(self, k: int) -> int:
        """Say hello again to a restarted shard; returns the version it restored."""
        self._send_hello(k)
        h, _ = self._recv(
            k, Op.WELCOME, resend=lambda: self._send_hello(k), check_incarnation=False
        )
        if Slice(shard=k, offset=h.offset, count=h.count) != self.slices[k]:
            raise ShardRejected(f"restarted shard {k} owns another slice")
        self.incarnations[k] = h.incarnation
        # Our 1-bit residual for that slice stays valid (it lives here); the shard kept no
        # mirror of us, so its next answer is full parameters (see sgdjob.mirror).
        return h.version

    def push(self, grads: np.ndarray | torch.Tensor, *, versions: list[int], step: int) -> None:
        """Send each shard its slice of ``grads`` computed on that shard's ``versions[k]``.

        float32: zero-copy, so ``grads`` must not be written until ``wait_sent`` (called by
        the next push). 1-bit: each slice's trainable part is quantised with this worker's
        error feedback (on the device ``grads`` lives on) and only the packed bits and scales
        travel, then the slice's buffer changes as float32 (zero-copy from host memory).
        """
        self.wait_sent()
        for k, (s, version) in enumerate(zip(self.slices, versions, strict=True)):
            self.push_part(grads, k, s.offset, s.end, version=version, step=step)

    def push_part(
        self,
        grads: np.ndarray | torch.Tensor,
        shard: int,
        start: int,
        end: int,
        *,
        version: int,
        step: int,
    ) -> None:
        """Send shard ``shard`` the elements ``[start, end)`` of ``grads`` (inside its slice),
        as ``push`` sends a whole slice: a part that backward finished (``sgdjob.overlap``).
        The caller must not write those elements until ``wait_sent``. In a 1-bit job a part
        with trainable elements should start at a multiple of ``bucket_size`` from the slice's
        start, so that the parts encode as the whole slice would (any start decodes right).
        The shard closes the step once a worker's parts cover its slice."""
        s = self.slices[shard]
        if not s.offset <= start < end <= s.end:
            raise ValueError(f"part [{start}, {end}) outside shard {shard}'s slice")
        part = grads[start:end]
        if not self.onebit:
            assert isinstance(part, np.ndarray), "float32 pushes come from host memory"
            frames: list[memoryview] = vector_frames(part, self.chunk_bytes)
            borrowed = True
            kw: dict[str, object] = {"dtype": DType.FLOAT32}
        else:
            at = start - s.offset
            frames, borrowed = push_frames(
                self.efs[shard],
                part,
                split=self.split(s).part(at, end - s.offset),
                chunk_bytes=self.chunk_bytes,
                at=at,
            )
            kw = {
                "dtype": DType.ONEBIT,
                "compression": Compression.ONEBIT,
                "bucket_size": self.bucket_size,
            }
        h = self._header(
            Op.PUSH,
            shard,
            version=version,
            step=step,
            offset=start,
            count=end - start,
            nbytes=sum(f.nbytes for f in frames),
            nframes=len(frames),
            **kw,
        )
        tracker = self.endpoints[shard].send(h, frames, track=borrowed)
        if tracker is not None:
            self.trackers.append(tracker)

    def wait_sent(self) -> None:
        for t in self.trackers:
            t.wait()
        self.trackers.clear()

    def pull(
        self,
        params: np.ndarray,
        *,
        min_version: int,
        final: bool = False,
        while_waiting: Callable[[], None] | None = None,
    ) -> tuple[list[int], bool]:
        """Fill ``params`` from every shard; returns (each shard's version, finished).

        ``while_waiting`` runs once the requests are out, while the shards close the step
        (the worker zeroes its gradient buffer there, off the critical path).

        Raises ShardRestarted (after resyncing with that shard) when a shard turned out to be
        a new process: the caller decides where to resume and pulls again.
        """
        flags = Flags.FINISHED if final else Flags.NONE
        self.seq += 1
        seq = self.seq

        def send_pull(k: int) -> None:
            self.endpoints[k].send(
                self._header(Op.PULL, k, version=min_version, flags=flags, step=seq)
            )

        for k in range(len(self.endpoints)):
            send_pull(k)
        if while_waiting is not None:
            while_waiting()
        versions: list[int] = [0] * len(self.endpoints)
        finished = True
        waiting = set(range(len(self.endpoints)))
        while waiting:
            try:
                k, h, msg = self._recv_any(waiting, Op.PARAMS, resend=send_pull, seq=seq)
            except ShardRestarted as err:
                raise ShardRestarted(err.shard, self.resync(err.shard)) from None
            s = self.slices[k]
            check_range(h, offset=s.offset, count=s.count)
            if h.count != s.count:
                raise ProtocolError(ErrorCode.BAD_RANGE, f"shard {k} sent {h.count} elements")
            if h.flags & Flags.DELTA:
                self._apply_delta(k, h, msg, params)
            else:
                check_float32_payload(h, msg.frame_sizes())
                start = s.offset
                for frame in msg.frames:
                    arr = frame_array(frame)
                    params[start : start + arr.shape[0]] = arr
                    if self.recon is not None:
                        self.recon[start : start + arr.shape[0]] = arr
                    start += arr.shape[0]
            versions[k] = h.version
            finished = finished and bool(h.flags & Flags.FINISHED)
            waiting.discard(k)
        return versions, finished

    def _recv_any(
        self, shards: set[int], expect: Op, *, resend: Callable[[int], None], seq: int
    ) -> tuple[int, Header, Incoming]:
        """The first ``expect`` reply from any of ``shards`` (see ``_recv``); an unanswered
        request is re-sent every RETRY_S, and ShardUnavailable is raised when none of them
        answered for the communication timeout."""
        limit = self.timeout_s
        deadline = math.inf if limit is None else time.monotonic() + limit
        next_resend = time.monotonic() + RETRY_S
        while True:
            for k in sorted(shards):
                got = self._take(k, expect, seq=seq)
                if got is not None:
                    return k, *got
            now = time.monotonic()
            if now >= deadline:
                raise ShardUnavailable(
                    f"shards {sorted(shards)} sent no {expect.name} for {limit:.0f}s"
                )
            if now >= next_resend:
                for k in shards:
                    resend(k)
                next_resend = now + RETRY_S
            timeout_ms = max(1, int((min(deadline, next_resend) - now) * 1000))
            zmq.select([self.endpoints[k].sock for k in shards], [], [], timeout_ms / 1000)

    def _take(self, k: int, expect: Op, *, seq: int) -> tuple[Header, Incoming] | None:
        """One waiting message from shard ``k`` if it is the reply we want (stale ones are
        skipped; errors and new incarnations raise as in ``_recv``)."""
        ep = self.endpoints[k]
        while ep.poll(0):
            msg = ep.recv()
            if msg is None:
                continue
            h = self._check_reply(k, msg)
            if h.op == expect and h.step >= seq:
                return h, msg
        return None

    def _check_reply(self, shard: int, msg: Incoming) -> Header:
        h = parse_header(msg.header, token=self.token)
        known = self.incarnations[shard] if self.incarnations else None
        if known is not None and h.incarnation != known:
            raise ShardRestarted(shard)
        if h.op == Op.ERROR:
            if h.error == ErrorCode.UNKNOWN_WORKER:
                raise ShardRestarted(shard)
            raise ShardRejected(f"shard {shard} rejected a request: {h.error.name}")
        return h

    def _apply_delta(self, k: int, h: Header, msg: Incoming, params: np.ndarray) -> None:
        """serverToWorker: add the shard's 1-bit update to what we hold and take its buffer
        values (``sgdjob.onebit_wire``), then copy the slice to ``params``."""
        s = self.slices[k]
        if self.recon is None or h.dtype != DType.ONEBIT or h.bucket_size != self.bucket_size:
            raise ProtocolError(ErrorCode.BAD_DTYPE, f"shard {k} sent an unexpected update")
        check_frames(h, msg.frame_sizes())
        split = self.split(s)
        try:
            payload = validate(
                [f.buffer for f in msg.frames], split=split, bucket_size=self.bucket_size
            )
        except ProtocolError as err:
            raise ProtocolError(err.code, f"shard {k}: {err}") from None
        view = self.recon[s.offset : s.end]
        apply_update(view, payload, split=split, bucket_size=self.bucket_size)
        params[s.offset : s.end] = view

    def report(self, report: Report) -> None:
        payload = report.pack()
        self.endpoints[0].send(
            self._header(Op.REPORT, 0, step=report.step, nbytes=len(payload), nframes=1), [payload]
        )

    def done(self) -> None:
        self.wait_sent()
        for k, ep in enumerate(self.endpoints):
            ep.send(self._header(Op.DONE, k))

    def close(self) -> None:
        for ep in self.endpoints:
            ep.close()
