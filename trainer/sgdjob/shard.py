"""A parameter-server shard: owns one slice of the flat vector and applies the update rule.

``Shard`` is the state machine with no sockets: ``handle(msg)`` validates one incoming
message and calls ``send`` for the replies, so tests can drive it directly. ``run_shard`` in
``roles`` wires it to a ROUTER socket.

Modes (``spec.training.mode``):
- ``sync``: a worker's gradient for version t comes whole or in parts (sub-ranges, pushed
  during its backward pass); parts are summed into the accumulator as they arrive, in worker
  order (``sgdjob.syncstep``: a fixed-seed run is bit-for-bit reproducible). Once the first
  ``replicas`` distinct workers have covered the slice the sum is averaged and applied, and
  the version becomes t+1. With ``backupWorkers`` b, N+b workers run and late pushes for a
  closed version are dropped and counted (Chen et al. 2017). A pull for version v is
  answered once the shard reached v.
- ``async`` / ``downpour``: each gradient is applied once it is whole, scaled by the staleness rule;
  tau = version now - version the gradient was computed on; gradients with tau above
  ``maxStaleness`` are dropped and counted. Pulls are answered at once.

With ``compression.kind: onebit`` a push (of the slice, or of a part of it sent during
backward) is [packed sign bits, (mu-, mu+) per bucket] of its trainable elements, then its
buffers as raw float32 (``sgdjob.onebit_wire``); it is validated whole on arrival, then
decoded straight into the one float32 accumulator (sync: in worker order, from the kept
1/32-size frames; async: once the parts cover the slice), never into a per-worker full-size
copy. The buffers' part then follows the same rule as in a float32 job
(``sgdjob.optim``). With ``serverToWorker`` a pull is answered with the 1-bit update of the
trainable part and the buffers' values (``sgdjob.downlink``); a worker's first pull after
hello, and the final pull, get full float32 parameters.

Nothing from a rejected message ever reaches the parameters: every check runs before any
write, and non-finite gradients are rejected.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from sgdjob.api.types import SGDJobSpec
from sgdjob.checkpoint import ShardState
from sgdjob.downlink import Downlink
from sgdjob.onebit_wire import SliceSplit
from sgdjob.optim import AppliedUpdates, SliceOptimizer
from sgdjob.protocol import (
    ErrorCode,
    Flags,
    Header,
    Op,
    ProtocolError,
    Report,
    check_frames,
    parse_header,
)
from sgdjob.schedule import Schedule, equivalent_step
from sgdjob.slicing import Slice
from sgdjob.staleness import StalenessRule
from sgdjob.stats import ShardStats
from sgdjob.syncstep import Part, PartialPushes, PendingStep, float_push, fold, onebit_push
from sgdjob.transport import Incoming

log = logging.getLogger("sgdjob.shard")

# Rejections where the sender could not be authenticated are dropped silently (counted).
SILENT = {ErrorCode.BAD_MAGIC, ErrorCode.BAD_TOKEN, ErrorCode.TRUNCATED}

Send = Callable[..., "zmq.MessageTracker | None"]


@dataclass
class PendingPull:
    identity: bytes
    worker: int
    min_version: int
    final: bool
    seq: int  # the worker's request number, echoed in PARAMS (``step``)


class Shard:
    """One shard's parameters, optimizer state and protocol handling."""

    def __init__(
        self,
        *,
        spec: SGDJobSpec,
        slice_: Slice,
        initial: np.ndarray,
        total_size: int,
        token: bytes,
        send: Send,
        stats: ShardStats,
        incarnation: int,
        chunk_bytes: int,
        trainable: int | None = None,
    ) -> None:
        if initial.shape != (slice_.count,) or initial.dtype != np.float32:
            raise ValueError("initial parameters must be float32 of the slice's length")
        t = spec.training
        comp = spec.compression
        self.spec = spec
        self.slice = slice_
        self.params = np.ascontiguousarray(initial).copy()
        self.total_size = total_size
        self.total_steps: int | None = None  # learned from the workers' HELLO
        self.token = token
        self.send = send
        self.stats = stats
        self.incarnation = incarnation
        self.chunk_bytes = chunk_bytes
        self.mode = t.mode
        self.replicas = spec.workers.replicas
        self.n_workers = spec.workers.replicas + t.backup_workers
        self.max_staleness = t.max_staleness
        # Elements past `trainable` (of the whole vector) are buffers: see sgdjob.models.flat.
        split = SliceSplit.of(slice_, trainable)
        self.opt: SliceOptimizer | AppliedUpdates = (
            AppliedUpdates(self.params, trainable=split.trainable)
            if comp.send == "updates"  # the workers ran the optimizer (sgdjob.optim)
            else SliceOptimizer(self.params, trainable=split.trainable, spec=t)
        )
        self.schedule = Schedule(t.lr, t.schedule)
        self.rule = StalenessRule(t.staleness, count=slice_.count, odena_scale=t.odena_scale)
        self.version = 0
        self._acc = np.empty(slice_.count, dtype=np.float32)
        # sync: the parts kept for `version`, summed into _acc as they come (sgdjob.syncstep)
        self.onebit = comp.kind == "onebit"
        # 1-bit jobs: the trainable part of the slice travels 1-bit, the buffers raw.
        self.split = split if self.onebit else None
        self.pending = PendingStep(
            self._acc, bucket_size=comp.bucket_size, eager=t.backup_workers == 0
        )
        self.partial = PartialPushes(slice_.count)  # async: parts until they cover the slice
        self.pulls: list[PendingPull] = []
        self.done: set[int] = set()
        self.exited: set[int] = set()  # workers that sent DONE or that the executor saw succeed
        self.next_step: dict[int, int] = {}  # worker -> step after its last push
        self.trackers: list[zmq.MessageTracker] = []
        self.bucket_size = comp.bucket_size
        self.downlink = Downlink(
            self.params,
            split=split if self.onebit and comp.server_to_worker else None,
            bucket_size=comp.bucket_size,
            chunk_bytes=chunk_bytes,
        )
        self.greeted: set[int] = set()  # workers that said hello to this process
        self.last_pull_seq: dict[int, int] = {}
        self.restored_from: int | None = None  # version of the checkpoint this process loaded
        stats.incarnation = incarnation

    # -- state ---------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        if self.mode == "sync":
            # Every worker done and nothing left to close: nobody will push again (a shard
            # restored behind the others after the workers exited).
            ran_all = self.total_steps is not None and self.version >= self.total_steps
            return ran_all or (len(self.done) >= self.n_workers and not self.pending)
        return len(self.done) >= self.n_workers

    def milestone(self) -> tuple[int, bool]:
        """Changes when a worker leaves or the training finishes: worth a checkpoint then."""
        return len(self.exited), self.finished

    def workers_exited(self, workers: Sequence[int]) -> None:
        """These workers are gone for good (DONE, or the executor saw them succeed)."""
        new = {w for w in workers if 0 <= w < self.n_workers}
        self.exited |= new
        self.done |= new
        self._maybe_close()
        self._serve_pulls()

    def _expected(self) -> set[int]:
        """Sync: workers that may still push for the open step; gone ones push no more."""
        return (set(range(self.n_workers)) - self.done) | set(self.pending)

    def _needed(self) -> int:
        """Sync: whole slices that close a step."""
        return max(1, min(self.replicas, len(self._expected())))

    def _maybe_close(self) -> None:
        if self.mode == "sync" and self.pending:
            complete = self.pending.complete()
            if len(complete) >= self._needed():
                self._close_step(complete)

    def should_exit(self) -> bool:
        return len(self.done) >= self.n_workers and not self.pulls

    def state(self) -> ShardState:
        """What a checkpoint holds (copies are made by the encoder, not here)."""
        arrays = {"params": self.params, **self.opt.state_arrays()}
        if self.rule.odena is not None:
            arrays["odenaMeanAbs"] = self.rule.odena.mean_abs
        with self.stats.lock:
            extra: dict[str, Any] = {"samples": self.stats.samples, "started": self.stats.started}
        extra["exited"] = sorted(self.exited)
        extra.update(self.opt.state_extra())
        return ShardState(
            shard=self.slice.shard,
            offset=self.slice.offset,
            count=self.slice.count,
            version=self.version,
            total_steps=self.total_steps,
            arrays=arrays,
            next_step=dict(self.next_step),
            extra=extra,
        )

    def restore(self, state: ShardState) -> None:
        """Continue from a checkpoint of this slice (``checkpoint.decode`` verified it)."""
        np.copyto(self.params, state.arrays["params"])
        self.opt.load_state(state.arrays, state.extra)
        if self.rule.odena is not None and "odenaMeanAbs" in state.arrays:
            np.copyto(self.rule.odena.mean_abs, state.arrays["odenaMeanAbs"])
        self.version = state.version
        self.total_steps = state.total_steps
        self.next_step = dict(state.next_step)
        self.restored_from = state.version
        exited = [int(w) for w in state.extra.get("exited", [])]
        self.exited |= set(exited)
        self.done |= set(exited)
        with self.stats.lock:
            self.stats.version = state.version
            self.stats.total_steps = state.total_steps
            self.stats.samples = int(state.extra.get("samples", 0))
            self.stats.started = float(state.extra.get("started", self.stats.started))
            self.stats.restored_from = state.version

    def checksum(self) -> int:
        """CRC-32 of the parameters, read in place (no copy of the slice)."""
        import zlib

        return zlib.crc32(self.params.data)

    # -- dispatch ------------------------------------------------------------------------
    def handle(self, msg: Incoming) -> None:
        try:
            header = parse_header(msg.header, token=self.token)
            self._dispatch(header, msg)
        except ProtocolError as err:
            self.stats.reject(err.code.name)
            log.debug("rejected message: %s", err)
            if err.code not in SILENT and msg.identity is not None:
                self.send(
                    Header(
                        op=Op.ERROR,
                        token=self.token,
                        shard=self.slice.shard,
                        incarnation=self.incarnation,
                        error=err.code,
                    ),
                    identity=msg.identity,
                )

    def _dispatch(self, h: Header, msg: Incoming) -> None:
        if h.worker >= self.n_workers:
            raise ProtocolError(ErrorCode.BAD_WORKER, f"worker {h.worker} >= {self.n_workers}")
        if h.shard != self.slice.shard:
            raise ProtocolError(ErrorCode.BAD_SHARD, f"shard {h.shard} sent to {self.slice.shard}")
        if msg.identity is None:
            raise ProtocolError(ErrorCode.BAD_STATE, "no peer identity")
        if h.op in (Op.PUSH, Op.PULL, Op.REPORT) and h.worker not in self.greeted:
            # This shard process never met the worker: it restarted since. The ERROR reply
            # carries the new incarnation, so the worker says hello again and resyncs.
            raise ProtocolError(ErrorCode.UNKNOWN_WORKER, f"worker {h.worker} must say hello")
        if h.op == Op.HELLO:
            self._hello(h, msg.identity, msg)
        elif h.op == Op.PUSH:
            self._push(h, msg)
        elif h.op == Op.PULL:
            self._pull(h, msg.identity, msg)
        elif h.op == Op.REPORT:
            self._report(h, msg)
        elif h.op == Op.DONE:
            self._expect_no_payload(h, msg)
            self.workers_exited([h.worker])
        else:
            raise ProtocolError(ErrorCode.BAD_OP, f"{h.op.name} is not a request")

    @staticmethod
    def _expect_no_payload(h: Header, msg: Incoming) -> None:
        if msg.frames or h.nframes or h.nbytes:
            raise ProtocolError(ErrorCode.BAD_SIZE, f"{h.op.name} carries no payload")

    # -- ops -----------------------------------------------------------------------------
    def _hello(self, h: Header, identity: bytes, msg: Incoming) -> None:
        self._expect_no_payload(h, msg)
        if h.aux != float(self.total_size):
            raise ProtocolError(
                ErrorCode.BAD_SIZE,
                f"worker model has {h.aux:g} parameters, the job has {self.total_size}",
            )
        if self.total_steps is None:
            self.total_steps = h.step
            with self.stats.lock:
                self.stats.total_steps = h.step
        elif h.step != self.total_steps:
            raise ProtocolError(
                ErrorCode.BAD_STATE,
                f"worker runs {h.step} steps, the other workers run {self.total_steps}",
            )
        self.greeted.add(h.worker)
        self.done.discard(h.worker)  # a restarted worker is back in the game
        self.exited.discard(h.worker)
        self.downlink.forget(h.worker)  # ... and holds no parameters: next pull is full
        self.stats.record_hello(h.worker)
        # A worker never resumes past its last step (h.step, the job's step count by now): the
        # WELCOME's u64 step field must hold it even after a push that claimed step 2**64 - 1.
        resume = (
            self.version if self.mode == "sync" else min(self.next_step.get(h.worker, 0), h.step)
        )
        self.send(
            Header(
                op=Op.WELCOME,
                token=self.token,
                worker=h.worker,
                shard=self.slice.shard,
                incarnation=self.incarnation,
                version=self.version,
                step=resume,
                offset=self.slice.offset,
                count=self.slice.count,
                aux=float(self.total_size),
            ),
            identity=identity,
        )

    def _push(self, h: Header, msg: Incoming) -> None:
        if self.split is not None:
            part = onebit_push(
                h, msg, slice_=self.slice, split=self.split, bucket_size=self.bucket_size
            )
        else:
            part = float_push(h, msg, self.slice)
        if h.version > self.version:
            raise ProtocolError(
                ErrorCode.BAD_STATE, f"gradient for version {h.version}, shard is at {self.version}"
            )
        # A step's parts are counted once, by the one that starts the slice.
        first = part.start == 0
        if self.mode == "sync":
            # A backup worker lost the race for this step, or the step is closed here
            # already: another shard restarted from an older checkpoint and the workers
            # replay its lost steps (steps < version), or this shard ran every step.
            late = h.version < self.version or h.step < self.version or self.finished
            # A part overlapping one this worker sent for the open step is refused; exactly
            # the same range again is a restarted worker's re-send: the same gradient, keep one.
            new = late or self.pending.check(h.worker, part.start, part.end)
            self._accepted(h, first)
            if late:
                if first:
                    self.stats.record_drop(h.worker)
                return
            if new:
                # Kept as received (zero-copy) and summed in worker order as its turn comes,
                # so a fixed-seed run is reproducible bit for bit (sgdjob.syncstep).
                self.pending.add(h.worker, part, order=self._expected())
                self._maybe_close()
            return
        parts = self._async_parts(h, part, first)
        if parts is None:
            return
        tau = self.version - h.version
        self.stats.record_staleness(tau)
        if self.max_staleness is not None and tau > self.max_staleness:
            self.stats.record_drop(h.worker)
            return
        self.flush_sends()
        for p in parts:  # the optimizer steps the whole slice at once: gather the parts
            fold(self._acc, p, p.start, p.end, first=True, bucket_size=self.bucket_size)
        factor = self.rule.factor(self._acc, tau=tau)
        self.opt.step(self._acc, lr=self.lr(), scale=factor)
        self._advance()

    def _accepted(self, h: Header, first: bool) -> None:
        """Only now is the push accepted (applied, kept or dropped): a rejected one changes
        nothing."""
        self.next_step[h.worker] = max(self.next_step.get(h.worker, 0), h.step + 1)
        if first:
            self.stats.record_push(h.worker)

    def _async_parts(self, h: Header, part: Part, first: bool) -> list[Part] | None:
        """Async: the parts of a push once they cover the slice, else None (kept)."""
        new = self.partial.check(h.worker, step=h.step, version=h.version, part=part)
        self._accepted(h, first)
        return (
            self.partial.add(h.worker, step=h.step, version=h.version, part=part) if new else None
        )

    def _close_step(self, contributors: list[int]) -> None:
        """Sync: the step's mean (summed in worker order) applied; bump the version."""
        acc = self.pending.close(contributors)
        self.pending.clear()
        self.flush_sends()
        self.opt.step(acc, lr=self.lr())
        self._advance()

    def lr(self) -> float:
        """The scheduled learning rate of the update about to be applied."""
        total = self.total_steps or 0
        t = equivalent_step(
            self.version,
            mode=self.mode,
            total_steps=total,
            workers=self.n_workers,
            push_every=self.spec.training.push_every,
        )
        return self.schedule.lr_at(t, total_steps=total)

    def _advance(self) -> None:
        self.version += 1
        with self.stats.lock:
            self.stats.version = self.version
        self._serve_pulls()

    def _pull(self, h: Header, identity: bytes, msg: Incoming) -> None:
        self._expect_no_payload(h, msg)
        final = bool(h.flags & Flags.FINISHED)
        if final:
            self.done.add(h.worker)  # "give me the final parameters" is the last request
        # A worker re-sends a pull that went unanswered for a while (the reply or the request
        # may have died with a previous shard process); keep only its newest request.
        self.pulls = [p for p in self.pulls if p.worker != h.worker]
        if self.last_pull_seq.get(h.worker) != h.step:  # a re-sent request is not a new pull
            self.last_pull_seq[h.worker] = h.step
            self.stats.record_pull(h.worker)
        again = self.downlink.repeat(h.worker, h.step)
        if again is not None:  # answered already (serverToWorker): the same bytes, if any
            for r in again:
                self.send(r.header, r.frames, identity=identity)
            return
        self.pulls.append(PendingPull(identity, h.worker, h.version, final, h.step))
        self._serve_pulls()

    def _report(self, h: Header, msg: Incoming) -> None:
        if len(msg.frames) != 1 or h.nframes != 1:
            raise ProtocolError(ErrorCode.BAD_PAYLOAD, "a report is one frame")
        check_frames(h, msg.frame_sizes())  # its nbytes too, like every other payload's
        report = Report.unpack(msg.frames[0].buffer)
        self.stats.record_report(h.worker, report)

    # -- replies -------------------------------------------------------------------------
    def _ready(self, p: PendingPull) -> bool:
        if p.final:
            return self.finished
        return self.finished or p.min_version <= self.version

    def _serve_pulls(self) -> None:
        if not self.pulls:
            return
        waiting: list[PendingPull] = []
        for p in self.pulls:
            if self._ready(p):
                self._send_params(p)
            else:
                waiting.append(p)
        self.pulls = waiting

    def _send_params(self, p: PendingPull) -> None:
        base = Header(
            op=Op.PARAMS,
            token=self.token,
            worker=p.worker,
            shard=self.slice.shard,
            incarnation=self.incarnation,
            version=self.version,
            step=p.seq,
            offset=self.slice.offset,
            count=self.slice.count,
            flags=Flags.FINISHED if self.finished else Flags.NONE,
        )
        r = self.downlink.answer(base, final=p.final)
        tracker = self.send(r.header, r.frames, identity=p.identity, track=r.track)
        if tracker is not None:
            self.trackers.append(tracker)

    def flush_sends(self) -> None:
        """ZeroMQ may still be reading ``params`` for replies in flight: wait before writing."""
        for t in self.trackers:
            t.wait()
        self.trackers.clear()
