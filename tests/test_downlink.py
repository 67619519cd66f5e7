"""A shard's answers to pulls with serverToWorker: full parameters, then 1-bit updates whose
mirror stays bit for bit what each worker holds, encoded once for workers that hold the same."""

from __future__ import annotations

import random

import numpy as np
import pytest

from sgdjob.compression import Encoded
from sgdjob.downlink import Downlink, Reply
from sgdjob.mirror import ParameterMirror
from sgdjob.onebit_wire import SliceSplit, apply_update, validate
from sgdjob.protocol import Flags, Header, Op

COUNT, TRAINABLE, BUCKET = 1000, 990, 64  # the last 10 elements are buffers
SPLIT = SliceSplit(count=COUNT, trainable=TRAINABLE)


class Worker:
    """What a worker does with each answer: load full parameters, or apply an update."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.held: np.ndarray | None = None
        self.seq = 0

    def pull(self, down: Downlink, version: int) -> Reply:
        self.seq += 1
        base = Header(
            op=Op.PARAMS, token=b"t" * 16, worker=self.index, version=version, step=self.seq
        )
        reply = down.answer(base, final=False)
        frames = [bytes(f) for f in reply.frames]
        if reply.header.flags & Flags.DELTA:
            assert self.held is not None
            payload = validate(frames, split=SPLIT, bucket_size=BUCKET)
            apply_update(self.held, payload, split=SPLIT, bucket_size=BUCKET)
        else:
            self.held = np.frombuffer(b"".join(frames), np.float32).copy()
        return reply


def downlink(params: np.ndarray) -> Downlink:
    return Downlink(params, split=SPLIT, bucket_size=BUCKET, chunk_bytes=1 << 20)


def step(params: np.ndarray, rng: np.random.Generator) -> None:
    params += (rng.standard_normal(COUNT) * 1e-2).astype(np.float32)


def test_workers_in_step_get_one_encoding_and_the_same_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    encodes: list[int] = []
    real = ParameterMirror.encode_update

    def counted(mirror: ParameterMirror, params: np.ndarray) -> Encoded:
        encodes.append(1)
        return real(mirror, params)

    monkeypatch.setattr(ParameterMirror, "encode_update", counted)
    rng = np.random.default_rng(0)
    params = rng.standard_normal(COUNT).astype(np.float32)
    down, workers = downlink(params), [Worker(i) for i in range(3)]
    for w in workers:
        w.pull(down, 0)  # full parameters
    for version in range(1, 6):
        step(params, rng)
        replies = [w.pull(down, version) for w in workers]
        assert all(r.header.flags & Flags.DELTA for r in replies)
        assert len({b"".join(bytes(f) for f in r.frames) for r in replies}) == 1
    assert len(encodes) == 5  # one per version, not one per worker
    assert len(down.mirror_of) == 1 and len(set(down.state_of.values())) == 1
    for w in workers:
        assert w.held is not None
        np.testing.assert_array_equal(w.held[:TRAINABLE], down.mirrors[w.index].mirror)
        np.testing.assert_array_equal(w.held[TRAINABLE:], params[TRAINABLE:])


@pytest.mark.parametrize("seed", range(5))
def test_workers_that_pull_other_versions_keep_a_mirror_of_exactly_what_they_hold(
    seed: int,
) -> None:
    # Async-like: each worker pulls whenever it likes, skipping versions, re-joining; after
    # every answer the shard's mirror of that worker is bit for bit what it holds.
    rng, pick = np.random.default_rng(seed), random.Random(seed)
    params = rng.standard_normal(COUNT).astype(np.float32)
    down, workers, version = downlink(params), [Worker(i) for i in range(3)], 0
    for _ in range(60):
        action = pick.random()
        if action < 0.3:
            step(params, rng)
            version += 1
        elif action < 0.35:
            w = pick.choice(workers)
            down.forget(w.index)  # it restarted: the next answer is full
        else:
            w = pick.choice(workers)
            w.pull(down, version)
            assert w.held is not None
            np.testing.assert_array_equal(w.held[:TRAINABLE], down.mirrors[w.index].mirror)
    # Nothing is kept for states no worker holds.
    assert set(down.mirror_of) == set(down.state_of.values())
    assert {s for s, _ in down.updates} <= set(down.state_of.values())


def test_a_worker_ahead_leaves_the_others_their_state_and_they_catch_up_on_the_same_bytes() -> None:
    rng = np.random.default_rng(3)
    params = rng.standard_normal(COUNT).astype(np.float32)
    down, a, b = downlink(params), Worker(0), Worker(1)
    a.pull(down, 0)
    b.pull(down, 0)
    step(params, rng)
    ra = a.pull(down, 1)
    assert len(down.mirror_of) == 2  # a's new state, and b's old one kept for b
    rb = b.pull(down, 1)
    assert [bytes(f) for f in ra.frames] == [bytes(f) for f in rb.frames]
    assert len(down.mirror_of) == 1  # b caught up: its old state is dropped
    assert a.held is not None and b.held is not None
    np.testing.assert_array_equal(a.held, b.held)
