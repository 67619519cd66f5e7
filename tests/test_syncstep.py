"""Pushes in parts (overlap with backward): validation, in-place worker-ordered sums, async
completion; driven through the shard state machine with real zmq.Frame payloads."""

from __future__ import annotations

import random

import numpy as np
import pytest
import zmq

from sgdjob.protocol import DType, ErrorCode, Header, Op
from sgdjob.syncstep import Coverage, Part, PendingStep, all_finite, float_part
from tests.test_shard import TOKEN, make_shard, msg, push

N = 12


def part(
    worker: int, grad: np.ndarray, start: int, end: int, version: int, *, step: int | None = None
) -> object:
    """A float32 push of grad[start:end] (slice-local == global here: the slice is [0, N))."""
    frames = [p.tobytes() for p in np.array_split(grad[start:end].astype(np.float32), 2) if p.size]
    h = Header(
        op=Op.PUSH,
        token=TOKEN,
        worker=worker,
        version=version,
        step=version if step is None else step,
        offset=start,
        count=end - start,
        nbytes=(end - start) * 4,
        nframes=len(frames),
        dtype=DType.FLOAT32,
    )
    return msg(h, frames, ident=b"w%d" % worker)


def grads(workers: int, steps: int, seed: int = 0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        [rng.standard_normal(N).astype(np.float32) for _ in range(workers)] for _ in range(steps)
    ]


RANGES = [(8, 12), (5, 8), (0, 5)]  # reverse order, as a worker's buckets fire


def test_parts_in_any_arrival_order_give_the_same_bits_as_whole_pushes() -> None:
    g = grads(3, 3)
    whole, _ = make_shard(count=N, workers=3)
    parts, _ = make_shard(count=N, workers=3)
    rnd = random.Random(1)
    for step, gs in enumerate(g):
        for w in (2, 0, 1):
            whole.handle(push(w, gs[w], step))
        arrivals = [(w, r) for w in range(3) for r in RANGES]
        rnd.shuffle(arrivals)
        for w, (a, b) in arrivals:
            parts.handle(part(w, gs[w], a, b, step))  # type: ignore[arg-type]
        assert parts.version == whole.version == step + 1
    assert parts.params.tobytes() == whole.params.tobytes()


def test_a_part_is_summed_on_arrival_once_the_workers_before_it_have_added_theirs() -> None:
    shard, _ = make_shard(count=N, workers=3)
    (gs,) = grads(3, 1)
    shard.handle(part(1, gs[1], 8, 12, 0))  # type: ignore[arg-type]
    shard.handle(part(0, gs[0], 8, 12, 0))  # type: ignore[arg-type]
    # Worker 0's range, then worker 1's, already in the accumulator: the step is still open.
    assert shard.version == 0
    np.testing.assert_array_equal(shard._acc[8:12], gs[0][8:12] + gs[1][8:12])
    assert [s.folded for s in shard.pending.segments] == [(), (0, 1)]


@pytest.mark.parametrize(
    ("start", "end", "code"),
    [
        (6, 10, ErrorCode.BAD_RANGE),  # overlaps [8, 12) sent before
        (8, 10, ErrorCode.BAD_RANGE),  # inside it but not the same range
        (10, 14, ErrorCode.BAD_RANGE),  # past the slice
        (3, 3, ErrorCode.BAD_RANGE),  # empty
    ],
)
def test_a_bad_part_is_rejected_and_changes_nothing(start: int, end: int, code: ErrorCode) -> None:
    shard, sent = make_shard(count=N)
    (gs,) = grads(2, 1)
    shard.handle(part(0, gs[0], 8, 12, 0))  # type: ignore[arg-type]
    acc, nxt = shard._acc.copy(), dict(shard.next_step)
    big = np.ones(16, np.float32)
    shard.handle(part(0, big, start, end, 0))  # type: ignore[arg-type]
    assert sent.messages[-1][1].op == Op.ERROR and sent.messages[-1][1].error == code
    np.testing.assert_array_equal(shard._acc, acc)
    assert shard.next_step == nxt and shard.pending.coverage[0].covered == 4


def test_a_part_whose_size_disagrees_with_its_header_is_rejected() -> None:
    shard, sent = make_shard(count=N)
    h = Header(
        op=Op.PUSH,
        token=TOKEN,
        worker=0,
        offset=0,
        count=4,
        nbytes=12,
        nframes=1,
        dtype=DType.FLOAT32,
    )
    shard.handle(msg(h, [np.ones(3, np.float32).tobytes()], ident=b"w0"))
    assert sent.messages[-1][1].error == ErrorCode.BAD_SIZE
    assert not shard.pending


def test_a_re_sent_part_is_kept_once() -> None:
    shard, _ = make_shard(count=N, training={"momentum": 0.0, "lr": 1.0})
    (gs,) = grads(2, 1)
    for w in (0, 1):
        shard.handle(part(w, gs[w], 0, 6, 0))  # type: ignore[arg-type]
    shard.handle(part(0, gs[0], 0, 6, 0))  # type: ignore[arg-type]
    for w in (0, 1):
        shard.handle(part(w, gs[w], 6, 12, 0))  # type: ignore[arg-type]
    assert shard.version == 1
    expect = np.ones(N, np.float32) - (gs[0] + gs[1]) * np.float32(0.5)
    np.testing.assert_allclose(shard.params, expect, rtol=1e-6)


def test_a_step_closes_only_when_every_worker_covered_its_whole_slice() -> None:
    shard, _ = make_shard(count=N)
    (gs,) = grads(2, 1)
    shard.handle(push(0, gs[0], 0))
    shard.handle(part(1, gs[1], 0, 11, 0))  # type: ignore[arg-type]
    assert shard.version == 0
    shard.handle(part(1, gs[1], 11, 12, 0))  # type: ignore[arg-type]
    assert shard.version == 1


def test_with_a_backup_worker_the_first_workers_to_cover_their_slice_close_the_step() -> None:
    shard, _ = make_shard(count=N, training={"backupWorkers": 1, "momentum": 0.0, "lr": 1.0})
    (gs,) = grads(3, 1)
    shard.handle(part(0, gs[0], 0, 6, 0))  # type: ignore[arg-type]  # worker 0 is slow
    shard.handle(push(2, gs[2], 0))
    shard.handle(push(1, gs[1], 0))
    assert shard.version == 1
    expect = np.ones(N, np.float32) - (gs[1] + gs[2]) * np.float32(0.5)
    np.testing.assert_array_equal(shard.params, expect)
    shard.handle(part(0, gs[0], 6, 12, 0))  # type: ignore[arg-type]  # the late rest: dropped
    assert shard.version == 1 and not shard.pending
    assert shard.stats.workers[0].dropped == 0 and shard.stats.workers[0].pushes == 1


def test_async_applies_a_push_once_its_parts_cover_the_slice_as_one_whole_push() -> None:
    whole, _ = make_shard(count=N, training={"mode": "async"})
    parts, _ = make_shard(count=N, training={"mode": "async"})
    (gs,) = grads(2, 1)
    whole.handle(push(0, gs[0], 0))
    for a, b in RANGES:
        assert parts.version == 0
        parts.handle(part(0, gs[0], a, b, 0))  # type: ignore[arg-type]
    assert parts.version == whole.version == 1
    assert parts.params.tobytes() == whole.params.tobytes()


def test_async_a_new_push_from_a_restarted_worker_replaces_its_unfinished_one() -> None:
    shard, _ = make_shard(count=N, training={"mode": "async"})
    (gs,) = grads(2, 1)
    shard.handle(part(0, gs[0], 0, 6, 0, step=3))  # type: ignore[arg-type]
    shard.handle(part(0, gs[0], 6, 12, 0, step=4))  # type: ignore[arg-type]
    assert shard.version == 0  # step 3's half is gone, step 4's half waits
    shard.handle(part(0, gs[0], 0, 6, 0, step=4))  # type: ignore[arg-type]
    assert shard.version == 1


def test_coverage_tells_new_ranges_from_re_sends_and_refuses_overlaps() -> None:
    c = Coverage()
    assert c.check(4, 8)
    c.add(4, 8)
    assert not c.check(4, 8)
    assert c.check(0, 4) and c.check(8, 9)
    for a, b in ((3, 5), (7, 9), (5, 6), (0, 12)):
        with pytest.raises(ValueError, match="overlaps"):
            c.check(a, b)


@pytest.mark.parametrize(
    ("values", "finite"),
    [
        ([], True),
        ([0.0, -1.5, 1e-30], True),
        ([3e38, 3e38, 3e38], True),  # the sum overflows, every element is finite
        ([1.0, np.nan, 2.0], False),
        ([np.inf], False),
        ([-np.inf, 1.0], False),
        ([np.inf, -np.inf], False),  # the sum is NaN
        ([3e38, 3e38, np.nan], False),
    ],
)
def test_all_finite_agrees_with_the_elementwise_check(values: list[float], finite: bool) -> None:
    arr = np.array(values, dtype=np.float32)
    assert all_finite(arr) is finite
    assert bool(np.isfinite(arr).all()) is finite


def test_a_part_of_huge_finite_values_is_summed_not_refused() -> None:
    shard, sent = make_shard(count=N)
    big = np.full(N, 3e38, np.float32)
    shard.handle(part(0, big, 0, N, 0))  # type: ignore[arg-type]
    assert not any(m[1].op == Op.ERROR for m in sent.messages)
    assert shard.pending.coverage[0].covered == N


def float_part_of(grad: np.ndarray, start: int, end: int) -> Part:
    """A float32 part of grad[start:end] in two frames, as a push's frames arrive."""
    chunks = [c for c in np.array_split(grad[start:end], 2) if c.size]
    return float_part(start, [zmq.Frame(c.tobytes()) for c in chunks])


def mean_in_order(gs: list[np.ndarray]) -> np.ndarray:
    total = gs[0].copy()
    for g in gs[1:]:
        total += g
    total *= np.float32(1.0 / len(gs))
    return total


@pytest.mark.parametrize("seed", range(4))
def test_a_closed_step_holds_the_mean_bit_for_bit_however_the_parts_arrived(seed: int) -> None:
    # The last worker in order averages each range as it adds it; close() averages the rest.
    rng = random.Random(seed)
    gs = grads(3, 1, seed)[0]
    step = PendingStep(np.zeros(N, np.float32), bucket_size=0, eager=True)
    arrivals = [(w, a, b) for w in range(3) for a, b in RANGES]
    rng.shuffle(arrivals)
    for w, a, b in arrivals:
        step.add(w, float_part_of(gs[w], a, b), order=[0, 1, 2])
    assert np.array_equal(step.close([0, 1, 2]), mean_in_order(gs))


def test_a_range_averaged_over_the_expected_workers_is_summed_again_for_a_late_contributor() -> (
    None
):
    gs = grads(3, 1, 1)[0]
    step = PendingStep(np.zeros(N, np.float32), bucket_size=0, eager=True)
    for w in (0, 1):  # both expected workers: every range is averaged over two
        step.add(w, float_part_of(gs[w], 0, N), order=[0, 1])
    step.add(2, float_part_of(gs[2], 0, N), order=[0, 1])  # a third pusher contributes too
    assert np.array_equal(step.close([0, 1, 2]), mean_in_order(gs))
    step.clear()
    for w in (0, 1):  # and a step closed by the expected workers alone is their mean
        step.add(w, float_part_of(gs[w], 0, N), order=[0, 1])
    assert np.array_equal(step.close([0, 1]), mean_in_order(gs[:2]))
