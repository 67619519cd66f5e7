"""The shard state machine under thousands of random and mutated messages (no sockets).

Every message starts from a valid HELLO/PUSH/PULL/REPORT/DONE for the shard's current state
(fp32 and 1-bit jobs, sync and async) and is then either sent as is, changed in a way that
must be rejected (with a known reason), or changed at random. After each message: nothing
escaped ``handle``; a rejection was counted exactly once, answered with at most one ERROR
carrying its reason, and left every piece of shard state as it was; a message that was not
rejected really was valid (checked here independently of the shard), and only a valid push
may have changed the parameters. The replies are packed as the real transport packs them.
"""

from __future__ import annotations

import math
import random
import zlib
from collections import Counter
from typing import Any

import numpy as np
import pytest
import zmq

from sgdjob.compression import CompressionError, quantize, validate_payload
from sgdjob.onebit_wire import SliceSplit
from sgdjob.optim import SliceOptimizer
from sgdjob.protocol import (
    MAX_FRAME_BYTES,
    Compression,
    DType,
    ErrorCode,
    Header,
    Op,
    ProtocolError,
    Report,
    parse_header,
)
from sgdjob.shard import SILENT, Shard
from sgdjob.transport import Incoming
from tests.fuzzing import (
    BUCKET,
    COUNT,
    REQUESTS,
    STEPS,
    U64,
    Wire,
    checks_for,
    get_field,
    random_change,
    set_field,
)
from tests.test_shard import TOKEN, make_shard


class PackingSend:
    """Records replies after packing their headers, exactly as ``Endpoint.send`` would."""

    def __init__(self) -> None:
        self.replies: list[tuple[bytes | None, Header]] = []

    def __call__(
        self,
        header: Header,
        payload: Any = (),
        *,
        identity: bytes | None = None,
        track: bool = False,
    ) -> None:
        packed = header.pack()  # raises struct.error on a field that does not fit
        self.replies.append((identity, parse_header(packed, token=TOKEN)))
        for p in payload:
            assert len(memoryview(p).cast("B")) <= MAX_FRAME_BYTES


class Rig:
    """A shard (after every worker's HELLO) and the valid messages for its current state."""

    def __init__(
        self,
        rng: random.Random,
        *,
        onebit: bool,
        shard: Shard | None = None,
        trainable: int | None = None,
        **training: Any,
    ) -> None:
        """A 2-worker shard of COUNT elements, ``trainable`` of them (the rest are buffers),
        or ``shard`` (any other with no buffers, e.g. before any HELLO)."""
        spec: dict[str, Any] = {"training": {"momentum": 0.5, **training}}
        if onebit:
            spec["compression"] = {"kind": "onebit", "bucketSize": BUCKET, "serverToWorker": True}
        self.shard = (
            shard or make_shard(count=COUNT, steps=STEPS, workers=2, trainable=trainable, **spec)[0]
        )
        self.count, self.steps = self.shard.slice.count, self.shard.total_steps or STEPS
        self.split = SliceSplit.of(self.shard.slice, trainable)
        self.send = PackingSend()
        self.shard.send = self.send
        self.rng: random.Random = rng
        self.onebit = onebit
        self.n_workers = self.shard.n_workers

    # -- valid messages ------------------------------------------------------------------
    def header(self, op: Op, **kw: Any) -> bytes:
        worker = kw.pop("worker", self.rng.randrange(self.n_workers))
        return Header(op=op, token=TOKEN, worker=worker, shard=0, **kw).pack()

    def hello(self) -> Wire:
        return self.header(Op.HELLO, step=self.steps, aux=float(self.count)), []

    def pull(self) -> Wire:
        version = self.rng.randrange(self.shard.version + 3)
        return self.header(Op.PULL, version=version), []

    def done(self) -> Wire:
        return self.header(Op.DONE), []

    def report(self) -> Wire:
        r = Report(
            self.rng.randrange(STEPS),
            self.rng.random(),
            self.rng.random(),
            32,
            1,
            2,
            eval_metric=self.rng.choice([math.nan, self.rng.random()]),
        )
        payload = r.pack()
        return self.header(Op.REPORT, nbytes=len(payload), nframes=1), [payload]

    def push(self) -> Wire:
        v = self.shard.version
        version = v if self.shard.mode == "sync" else self.rng.randrange(max(0, v - 2), v + 1)
        grad = np.random.default_rng(self.rng.randrange(1 << 30)).standard_normal(self.count) * 0.1
        grad = grad.astype(np.float32)
        kw = dict(version=version, step=self.rng.randrange(self.steps), offset=0, count=self.count)
        if self.onebit:
            t = self.split.trainable
            enc = quantize(grad[:t], BUCKET)
            frames = [enc.bits.tobytes(), enc.scales.tobytes()]
            frames += [grad[t:].tobytes()] if self.split.buffers else []
            kw.update(dtype=DType.ONEBIT, compression=Compression.ONEBIT, bucket_size=BUCKET)
        else:
            cuts = sorted(self.rng.sample(range(1, self.count), self.rng.randrange(3)))
            frames = [p.tobytes() for p in np.split(grad, cuts)]
            kw.update(dtype=DType.FLOAT32)
        h = self.header(Op.PUSH, nbytes=sum(map(len, frames)), nframes=len(frames), **kw)
        return h, frames

    def valid(self) -> Wire:
        make = self.rng.choice(
            [self.hello, self.push, self.push, self.push, self.pull, self.report, self.done]
        )
        return make()

    # -- the shard's state, and sending ---------------------------------------------------
    def state(self) -> tuple[Any, ...]:
        s = self.shard
        assert isinstance(s.opt, SliceOptimizer)  # no rig sends updates
        momentum = s.opt.arrays["momentum"]
        workers = {
            w: (x.pushes, x.pulls, x.hellos, x.dropped, x.step, x.samples, x.loss)
            for w, x in s.stats.workers.items()
        }
        pulls = [(p.identity, p.worker, p.min_version, p.final) for p in s.pulls]
        return (
            s.checksum(),
            zlib.crc32(momentum.tobytes()),
            s.version,
            s.total_steps,
            frozenset(s.done),
            pulls,
            dict(s.next_step),
            sorted(s.pending),
            sorted(s.downlink.mirrors),
            workers,
            s.stats.samples,
            s.stats.metric_value,
        )

    def deliver(self, wire: Wire, identity: bytes = b"fuzz") -> ErrorCode | None:
        """Hand one message to the shard; the rejection code, or None if it was accepted."""
        before, version, steps = self.state(), self.shard.version, self.shard.total_steps
        counts_before = Counter(self.shard.stats.rejected)
        self.send.replies.clear()
        header, frames = wire
        self.shard.handle(Incoming(identity, header, [zmq.Frame(f) for f in frames]))
        bumped = Counter(self.shard.stats.rejected) - counts_before
        assert sum(bumped.values()) in (0, 1), "one message is counted at most once"
        if bumped:
            assert self.state() == before, "a rejected message changed the shard"
            code = ErrorCode[next(iter(bumped))]
            replies = self.send.replies
            if code in SILENT:
                assert not replies
            else:
                ((to, err),) = replies
                assert to == identity and err.op == Op.ERROR and err.error == code
            return code
        problem = invalid_because(self, wire, version, steps)
        assert problem is None, f"accepted an invalid message: {problem}"
        # A DONE may close a sync step too: a worker gone for good pushes no more, so the
        # gradients already kept may be all the step will get (sgdjob.shard._needed).
        if get_field(header, "op") not in (Op.PUSH, Op.DONE):
            assert self.shard.checksum() == before[0], "only a push or a DONE may change parameters"
        return None


def invalid_because(rig: Rig, wire: Wire, version_before: int, steps: int | None) -> str | None:
    """An independent statement of what a valid request is; None if ``wire`` is one."""
    header, frames = wire
    try:
        h = parse_header(header, token=TOKEN)
    except ProtocolError as err:
        return f"header: {err}"
    sizes = [len(f) for f in frames]
    if h.op not in REQUESTS or h.worker >= rig.n_workers or h.shard != 0:
        return f"op {h.op.name} worker {h.worker} shard {h.shard}"
    if h.op in (Op.HELLO, Op.PULL, Op.DONE) and (frames or h.nframes or h.nbytes):
        return "payload on a request without one"
    if h.op == Op.HELLO and (int(h.aux) != rig.count or h.step != (steps or h.step)):
        return f"hello for {h.aux} parameters, {h.step} steps"
    if h.op == Op.REPORT:
        if sizes != [Report.STRUCT.size] or h.nframes != 1 or h.nbytes != Report.STRUCT.size:
            return f"report frames {sizes}, header {h.nframes} frames {h.nbytes} bytes"
        try:
            Report.unpack(frames[0])
        except ProtocolError as err:
            return f"report: {err}"
    if h.op != Op.PUSH:
        return None
    inside = h.count > 0 and h.offset + h.count <= rig.count  # a part: overlap with backward
    if not inside or h.version > version_before:
        return f"push of [{h.offset}, +{h.count}) at version {h.version}"
    if len(frames) != h.nframes or sum(sizes) != h.nbytes:
        return f"frames {sizes} for {h.nframes} frames, {h.nbytes} bytes"
    if rig.onebit:
        if (h.dtype, h.compression, h.bucket_size) != (DType.ONEBIT, Compression.ONEBIT, BUCKET):
            return f"1-bit push as {h.dtype.name}/{h.compression.name}/{h.bucket_size}"
        # [bits, scales] of the range's trainable part, then its buffers' float32 (if any)
        t = max(0, min(h.offset + h.count, rig.split.trainable) - h.offset)
        buffers = h.count - t
        if len(frames) < 2 or (len(frames) > 2) != (buffers > 0):
            return f"{len(frames)} frames for a range with {buffers} buffer elements"
        try:
            validate_payload(frames[0], frames[1], count=t, bucket_size=BUCKET)
        except CompressionError as err:
            return f"1-bit payload: {err}"
        raw = frames[2:]
        if any(not f or len(f) % 4 for f in raw) or sum(map(len, raw)) != 4 * buffers:
            return f"buffer frames of {[len(f) for f in raw]} bytes for {buffers} elements"
        if not np.isfinite(np.frombuffer(b"".join(raw), np.float32)).all():
            return "non-finite buffer value"
        return None
    if h.dtype != DType.FLOAT32 or h.nbytes != 4 * h.count or any(s % 4 for s in sizes):
        return f"fp32 push of {sizes} as {h.dtype.name}"
    if not np.isfinite(np.frombuffer(b"".join(frames), np.float32)).all():
        return "non-finite gradient"
    return None


RIGS: dict[str, dict[str, Any]] = {
    "fp32 sync with a backup worker": dict(onebit=False, backupWorkers=1),
    "fp32 async zhang": dict(onebit=False, mode="async", staleness="zhang", maxStaleness=4),
    "1-bit sync": dict(onebit=True),
    "1-bit async serverToWorker": dict(onebit=True, mode="async"),
    # The slice ends in 6 buffer elements (BatchNorm statistics): they travel as float32.
    "1-bit sync with buffers": dict(onebit=True, trainable=COUNT - 6),
    "1-bit async with buffers": dict(onebit=True, trainable=COUNT - 6, mode="async"),
}


@pytest.mark.parametrize("rig_name", sorted(RIGS))
def test_every_message_with_one_bad_field_or_frame_is_rejected_for_that_reason(
    rig_name: str,
) -> None:
    rig = Rig(random.Random(rig_name), **RIGS[rig_name])
    checks = checks_for(rig)
    failures = []
    for _ in range(20):  # every check 20 times, from fresh valid messages of a moving state
        for name, base, mutate in checks:
            rig.deliver(rig.valid(), identity=b"w")
            wire, want = mutate(rig, base())
            got = rig.deliver(wire)
            if got != want:
                failures.append(f"{name}: {got} instead of {want}")
    assert not failures, sorted(set(failures))
    assert rig.shard.version > 10  # valid pushes kept training in between


@pytest.mark.parametrize("rig_name", sorted(RIGS))
def test_thousands_of_random_and_mutated_messages_never_crash_or_leak_into_parameters(
    rig_name: str,
) -> None:
    rig = Rig(random.Random(f"random {rig_name}"), **RIGS[rig_name])
    checks = checks_for(rig)
    outcomes: Counter[str] = Counter()
    for i in range(3000):
        ident = rig.rng.choice([b"w0", b"w1", b"\0", b"x" * 255, rig.rng.randbytes(5)])
        roll, want = rig.rng.random(), None
        if roll < 0.2:
            wire = rig.valid()
        elif roll < 0.45:
            name, base, mutate = rig.rng.choice(checks)
            wire, want = mutate(rig, base())
        else:
            wire = random_change(rig, rig.valid())
            for _ in range(rig.rng.choice([0, 0, 1, 2])):
                wire = random_change(rig, wire)
        code = rig.deliver(wire, identity=ident)
        assert want is None or code == want, name
        outcomes["accepted" if code is None else code.name] += 1
        if i % 500 == 0:  # keep the pending pulls bounded and the workers in play
            for w in range(rig.n_workers):
                rig.deliver((rig.header(Op.HELLO, worker=w, step=STEPS, aux=float(COUNT)), []))
    assert sum(rig.shard.stats.rejected.values()) == sum(
        n for k, n in outcomes.items() if k != "accepted"
    )
    print(rig_name, dict(outcomes))
    assert outcomes["accepted"] > 300 and len(outcomes) > 10, outcomes


# ----------------------------------------------------------------------------- found by fuzzing


def test_a_rejected_push_from_the_future_leaves_resume_step_and_push_count_alone() -> None:
    rig = Rig(random.Random(1), onebit=False, mode="async")
    header, frames = rig.push()
    header = set_field(set_field(header, "version", 5), "step", 700)
    before = rig.shard.stats.workers[get_field(header, "worker")].pushes
    assert rig.deliver((header, frames)) == ErrorCode.BAD_STATE  # deliver compares all state
    assert rig.shard.next_step == {}
    assert rig.shard.stats.workers[get_field(header, "worker")].pushes == before


def test_a_push_claiming_the_last_u64_step_cannot_break_the_next_welcome() -> None:
    rig = Rig(random.Random(2), onebit=False, mode="async")
    header, frames = rig.push()
    rig.deliver((set_field(header, "step", U64), frames))  # accepted: steps are not bounded
    worker = get_field(header, "worker")
    rig.deliver((rig.header(Op.HELLO, worker=worker, step=STEPS, aux=float(COUNT)), []))
    ((_, welcome),) = rig.send.replies  # packed, as the transport packs it
    assert welcome.op == Op.WELCOME and welcome.step == STEPS


def test_a_report_whose_header_announces_other_bytes_than_it_carries_is_rejected() -> None:
    rig = Rig(random.Random(3), onebit=False)
    header, frames = rig.report()
    for nbytes in (0, 64, 66, 1 << 20):
        assert rig.deliver((set_field(header, "nbytes", nbytes), frames)) == ErrorCode.TRUNCATED
