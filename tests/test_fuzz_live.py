"""A live shard process on 127.0.0.1 under more than ten thousand random and mutated messages.

The shard is started exactly as tests/test_shard_process.py starts it. Messages come from the
mutations of tests/fuzzing.py applied to valid messages, over several DEALER sockets (some with
chosen identities), with every multipart length from 1 to 6 frames. Each message is first
handed to an in-process twin of the shard (same spec, slice, token, no HELLO yet): only those
the twin rejects are sent, so the live shard must reject every one of them, for the twin's
reason, with an ERROR reply for exactly the non-silent ones, and must end with its parameters
and step unchanged and still answer a HELLO.

A DEALER cannot send a message of zero frames, so the ROUTER never sees an identity alone
(``Endpoint.recv`` would count that as TRUNCATED); an empty header frame is sent instead and is
counted TRUNCATED by ``parse_header``.
"""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from sgdjob.api.types import SGDJobSpec
from sgdjob.api.validation import parse_job
from sgdjob.protocol import DType, ErrorCode, Header, Op, parse_header, token_digest
from sgdjob.shard import SILENT, Shard
from sgdjob.slicing import partition
from sgdjob.stats import ShardStats
from tests.conftest import job_doc
from tests.fuzzing import BUCKET, Wire, checks_for, random_change
from tests.live_shard import curve_client, shard_process, status
from tests.test_fuzz_shard import Rig

SECRET = "t"  # the token of tests.test_shard, which the message builders use
SIZE = 64 * 32 + 32 + 32 * 10 + 10  # the digits MLP with one hidden layer of 32
MESSAGES = 10_000
JOBS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "fp32 async": {"training": {"mode": "async", "staleness": "zhang"}},
    "1-bit": {"compression": {"kind": "onebit", "bucketSize": BUCKET, "serverToWorker": True}},
}


@pytest.fixture(params=sorted(JOBS))
def live(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    job = parse_job(job_doc("fuzz", **JOBS[request.param]))
    # The attackers below hold the job's CURVE keys: insiders whose frames reach the checks.
    with shard_process(job.spec, tmp_path, token=SECRET) as live:
        yield {
            **live,
            "spec": job.spec,
            "onebit": request.param == "1-bit",
            "async": "async" in request.param,
        }


def twin(spec: SGDJobSpec) -> Shard:
    """A shard like the live one before any HELLO: it decides what the live one must reject."""
    (slice_,) = partition(SIZE, 1)
    return Shard(
        spec=spec,
        slice_=slice_,
        initial=np.zeros(SIZE, np.float32),
        total_size=SIZE,
        token=token_digest(SECRET),
        send=lambda *a, **k: None,
        stats=ShardStats(shard=0, workers=1, mode=spec.training.mode),
        incarnation=0,
        chunk_bytes=4 << 20,
    )


def rejected_messages(spec: SGDJobSpec, onebit: bool, n: int, seed: int) -> list[tuple[Wire, str]]:
    """``n`` random and mutated messages that a fresh shard rejects, with the reason."""
    rig = Rig(random.Random(seed), onebit=onebit, shard=twin(spec))
    rng, checks = rig.rng, checks_for(rig)
    out: list[tuple[Wire, str]] = []
    while len(out) < n:
        roll = rng.random()
        if roll < 0.4:
            _, base, mutate = rng.choice(checks)
            wire = mutate(rig, base())[0]
        elif roll < 0.9:
            wire = random_change(rig, rig.valid())
            for _ in range(rng.choice([0, 1, 2])):
                wire = random_change(rig, wire)
        else:  # a multipart message of random frames; an empty header among them
            wire = rng.choice([b"", rng.randbytes(96)]), [rng.randbytes(7)] * rng.randrange(6)
        if not wire[0] and not wire[1] and rng.random() < 0.5:
            wire = b"", [b""]
        code = rig.deliver(wire, identity=b"twin")  # also checks the twin changed nothing
        if code is None:  # accepted (a HELLO, a push, ...): not for the live shard
            rig.shard = twin(spec)
            rig.shard.send = rig.send
            continue
        out.append((wire, code.name))
    return out


def test_ten_thousand_random_and_mutated_messages_are_each_rejected_counted_and_change_nothing(
    live: dict[str, Any],
) -> None:
    t0 = time.monotonic()
    messages = rejected_messages(live["spec"], live["onebit"], MESSAGES, seed=7)
    t_gen = time.monotonic() - t0
    before = status(live["status"])
    assert before["step"] == 0 and not before["rejected"]
    ctx = zmq.Context()
    socks = []
    for ident in (None, None, b"attacker", b"\x01\xff\x00", b"w" * 255, bytes(range(1, 40))):
        s = ctx.socket(zmq.DEALER)
        curve_client(s)
        if ident is not None:
            s.setsockopt(zmq.ROUTING_ID, ident)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(live["endpoint"])
        socks.append(s)
    rng = random.Random(11)
    want_errors: dict[int, list[str]] = defaultdict(list)  # per socket, in order
    got_errors: dict[int, list[str]] = defaultdict(list)
    token = token_digest(SECRET)

    def drain(i: int, timeout_ms: int = 0) -> None:
        while socks[i].poll(timeout_ms):
            reply = socks[i].recv_multipart()
            assert len(reply) == 1, "an ERROR reply carries no payload"
            h = parse_header(reply[0], token=token)
            assert h.op == Op.ERROR and h.error != ErrorCode.OK
            got_errors[i].append(h.error.name)

    sizes: Counter[int] = Counter()
    for n, ((header, frames), code) in enumerate(messages):
        i = rng.randrange(len(socks))
        socks[i].send_multipart([header, *frames])
        sizes[1 + len(frames)] += 1
        if ErrorCode[code] not in SILENT:
            want_errors[i].append(code)
        if n % 250 == 0:
            for j in range(len(socks)):
                drain(j)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        after = status(live["status"])
        if sum(after["rejected"].values()) >= len(messages):
            break
        time.sleep(0.2)
    for j in range(len(socks)):
        while len(got_errors[j]) < len(want_errors[j]) and time.monotonic() < deadline:
            drain(j, 200)
    elapsed = time.monotonic() - t0
    print(
        f"{len(messages)} messages {dict(sorted(sizes.items()))} frames each; "
        f"generated in {t_gen:.1f}s, all answered in {elapsed:.1f}s"
    )

    assert live["proc"].poll() is None, "the shard process died"
    assert sum(after["rejected"].values()) == len(messages)
    assert after["rejected"] == dict(Counter(code for _, code in messages))
    assert after["paramsChecksum"] == before["paramsChecksum"]
    assert after["step"] == 0 and after["totalSteps"] is None
    assert all(w["pushes"] == w["pulls"] == w["hellos"] == 0 for w in after["workers"].values())
    for j in range(len(socks)):
        assert got_errors[j] == want_errors[j], f"socket {j}: ERROR replies differ"
    assert set(range(1, 7)) <= set(sizes)  # messages of 1 to 6 frames at least

    # ... and it kept working: a valid HELLO is still answered WELCOME.
    hello = Header(op=Op.HELLO, token=token, worker=0, step=60, aux=float(SIZE))
    socks[0].send(hello.pack())
    drain_deadline = time.monotonic() + 10
    while time.monotonic() < drain_deadline and socks[0].poll(500):
        welcome = parse_header(socks[0].recv(), token=token)
        if welcome.op == Op.WELCOME:
            break
    assert welcome.op == Op.WELCOME
    assert (welcome.offset, welcome.count, welcome.aux) == (0, SIZE, float(SIZE))
    assert status(live["status"])["totalSteps"] == 60
    for s in socks:
        s.close()
    ctx.term()


@pytest.mark.parametrize("live", ["fp32 async"], indirect=True)
def test_an_async_shard_process_survives_a_push_claiming_the_last_u64_step(
    live: dict[str, Any],
) -> None:
    """Before the fix the next WELCOME could not be packed and the process exited 1."""
    token = token_digest(SECRET)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    curve_client(sock)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(live["endpoint"])
    hello = Header(op=Op.HELLO, token=token, worker=0, step=60, aux=float(SIZE)).pack()
    push = Header(
        op=Op.PUSH,
        token=token,
        worker=0,
        version=0,
        step=2**64 - 1,
        count=SIZE,
        nbytes=4 * SIZE,
        nframes=1,
        dtype=DType.FLOAT32,
    )
    for frames in (
        [hello],
        [push.pack(), bytes(4 * SIZE)],
        [replace(push, version=5).pack(), bytes(4 * SIZE)],
        [hello],
    ):
        sock.send_multipart(frames)
    replies: list[Header] = []
    while len(replies) < 3 and sock.poll(10_000):
        replies.append(parse_header(sock.recv(), token=token))
    assert [r.op for r in replies] == [Op.WELCOME, Op.ERROR, Op.WELCOME]
    assert replies[1].error == ErrorCode.BAD_STATE and replies[2].step == 60
    assert live["proc"].poll() is None
    assert status(live["status"])["step"] == 1  # the valid push was applied
    sock.close()
    ctx.term()
