"""Shard checkpoints on disk: round trip, atomic files, corrupt ones skipped, background writes."""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import signal
import threading
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest

from sgdjob.checkpoint import (
    BackgroundCheckpointer,
    Checkpointer,
    CheckpointError,
    CheckpointWriteFailed,
    ShardState,
    decode,
    encode,
)


def state(version: int, count: int = 100) -> ShardState:
    rng = np.random.default_rng(version)
    return ShardState(
        shard=1,
        offset=50,
        count=count,
        version=version,
        total_steps=500,
        arrays={
            "params": rng.standard_normal(count).astype(np.float32),
            "momentum": rng.standard_normal(count).astype(np.float32),
        },
        next_step={0: version, 3: version + 1},
        extra={"samples": 7},
    )


def test_a_checkpoint_round_trips_exactly() -> None:
    s = state(40)
    back = decode(encode(s), shard=1, offset=50, count=100)
    assert back.version == 40 and back.total_steps == 500 and back.next_step == s.next_step
    for name, arr in s.arrays.items():
        np.testing.assert_array_equal(back.arrays[name], arr)
    assert back.extra == {"samples": 7}


def test_a_checkpoint_of_another_slice_is_refused() -> None:
    with pytest.raises(CheckpointError, match="not shard"):
        decode(encode(state(1)), shard=1, offset=0, count=100)


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "garbage", "empty"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(
    tmp_path: Path, damage: str
) -> None:
    c = Checkpointer(tmp_path, shard=1, offset=50, count=100, keep=3)
    c.save(state(20))
    newest = c.save(state(40))
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "flip a byte":
        i = len(data) - 17
        newest.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :])
    elif damage == "garbage":
        newest.write_bytes(b"SGDJCKPT" + b"\xff" * 64)
    else:
        newest.write_bytes(b"")
    loaded = c.load_latest()
    assert loaded is not None and loaded.version == 20
    np.testing.assert_array_equal(loaded.arrays["params"], state(20).arrays["params"])


def test_old_checkpoints_are_pruned_to_keep(tmp_path: Path) -> None:
    c = Checkpointer(tmp_path, shard=1, offset=50, count=100, keep=2)
    for v in (10, 20, 30, 40):
        c.save(state(v))
    assert [v for v, _ in c.files()] == [40, 30]
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries behind


def test_no_checkpoint_at_all_means_a_fresh_start(tmp_path: Path) -> None:
    assert Checkpointer(tmp_path / "none", shard=0, offset=0, count=5, keep=1).load_latest() is None


def ckpt(directory: Path, run_id: str, spec_hash: str = "h1") -> Checkpointer:
    return Checkpointer(
        directory, shard=1, offset=50, count=100, keep=2, run_id=run_id, spec_hash=spec_hash
    )


def test_a_new_run_never_restores_or_prunes_another_runs_checkpoints(tmp_path: Path) -> None:
    old = ckpt(tmp_path, "run-a")
    for v in (100, 200):
        old.save(state(v))
    new = ckpt(tmp_path, "run-b")
    assert new.load_latest() is None  # a fresh run starts from step 0
    for v in (10, 20, 30):
        new.save(state(v))
    assert [v for v, _ in old.files()] == [200, 100]  # untouched by run-b's pruning
    assert [v for v, _ in new.files()] == [30, 20]
    back = new.load_latest()
    assert back is not None and back.version == 30
    assert back.extra["run"] == {"id": "run-b", "specHash": "h1"}


def test_a_checkpoint_of_this_run_written_for_another_spec_is_refused(tmp_path: Path) -> None:
    from sgdjob.checkpoint import CheckpointMismatch

    ckpt(tmp_path, "run-a", "h1").save(state(10))
    with pytest.raises(CheckpointMismatch, match="another spec"):
        ckpt(tmp_path, "run-a", "h2").load_latest()


# -- background writes ------------------------------------------------------------------


class GatedCheckpointer(Checkpointer):
    """Writes the first part of each file, then blocks on ``release`` (or fails, if told)."""

    def __init__(self, directory: Path, **kw: Any) -> None:
        super().__init__(directory, shard=0, offset=0, count=kw.pop("count", 6), keep=3, **kw)
        self.started = threading.Event()
        self.release = threading.Event()
        self.fail: OSError | None = None
        self.lock = threading.Lock()
        self.running = self.most_running = 0

    def _write_parts(self, fh: IO[bytes], parts: list[bytes | memoryview]) -> None:
        with self.lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            fh.write(parts[0])
            fh.flush()
            self.started.set()
            self.release.wait()
            if self.fail is not None:
                raise self.fail
            super()._write_parts(fh, parts[1:])
        finally:
            with self.lock:
                self.running -= 1


def sync_step(shard: Any, version: int, value: float) -> None:
    from tests.test_shard import push

    for w in (0, 1):
        shard.handle(push(w, np.full(6, value, np.float32), version))


def test_the_shard_keeps_closing_steps_while_a_checkpoint_write_is_blocked(tmp_path: Path) -> None:
    from tests.test_shard import make_shard  # here: the crash test's child needs no torch

    shard, _ = make_shard(steps=10)
    gate = GatedCheckpointer(tmp_path)
    writer = BackgroundCheckpointer(gate, every=4, version=0)
    sync_step(shard, 0, 1.0)
    sync_step(shard, 1, 2.0)
    assert writer.due(shard.version)
    writer.submit(shard.state())
    saved = shard.params.copy()
    assert gate.started.wait(10)
    # The write is stuck inside the file; the step loop goes on and moves the parameters.
    for v in range(2, 5):
        sync_step(shard, v, 3.0)
    assert shard.version == 5 and writer.in_flight
    assert not np.array_equal(shard.params, saved)
    assert gate.files() == []  # nothing renamed into place yet: no half file is visible
    gate.release.set()
    path = writer.wait()
    assert path is not None and gate.files() == [(2, path)]
    back = gate.load_latest()
    assert back is not None and back.version == 2
    np.testing.assert_array_equal(back.arrays["params"], saved)  # the snapshot, not today's


def test_a_restore_after_a_background_write_gives_the_state_of_the_snapshot(
    tmp_path: Path,
) -> None:
    gate = GatedCheckpointer(tmp_path, count=100)
    gate.shard, gate.offset = 1, 50
    writer = BackgroundCheckpointer(gate, every=10, version=0)
    live = state(7)
    expected = {k: v.copy() for k, v in live.arrays.items()}
    writer.submit(live)
    assert gate.started.wait(10)
    for arr in live.arrays.values():  # what the optimizer does to them in place meanwhile
        arr += 1.0
    live.next_step[0] = 99
    live.extra["samples"] = 1000
    gate.release.set()
    writer.close()
    back = gate.load_latest()
    assert back is not None and back.next_step == {0: 7, 3: 8} and back.extra["samples"] == 7
    for name, arr in expected.items():
        np.testing.assert_array_equal(back.arrays[name], arr)


def test_a_checkpoint_point_waits_for_the_write_in_flight(tmp_path: Path) -> None:
    gate = GatedCheckpointer(tmp_path, count=100)
    gate.shard, gate.offset = 1, 50
    writer = BackgroundCheckpointer(gate, every=10, version=0)
    writer.submit(state(5))
    assert gate.started.wait(10)
    second = threading.Thread(target=writer.submit, args=(state(10),))
    second.start()
    second.join(0.3)
    assert second.is_alive()  # still waiting for the first write
    gate.release.set()
    second.join(10)
    writer.close()
    assert gate.most_running == 1
    assert [v for v, _ in gate.files()] == [10, 5]


def test_points_come_every_half_interval_and_at_milestones_and_every_1_is_synchronous(
    tmp_path: Path,
) -> None:
    writer = BackgroundCheckpointer(
        Checkpointer(tmp_path, shard=1, offset=50, count=100, keep=5), every=20, version=0
    )
    assert [v for v in range(1, 31) if writer.due(v)] == list(range(10, 31))
    writer.submit(state(10))
    assert not writer.due(19) and writer.due(20) and writer.due(11, milestone=(1, False))
    writer.close()
    sync = BackgroundCheckpointer(
        Checkpointer(tmp_path / "one", shard=1, offset=50, count=100, keep=5), every=1, version=0
    )
    assert sync.due(1) and not sync.due(0)
    sync.submit(state(1))
    assert not sync.in_flight and [v for v, _ in sync.ckpt.files()] == [1]  # durable already
    with pytest.raises(ValueError, match="every"):
        BackgroundCheckpointer(sync.ckpt, every=0, version=0)


def test_a_failed_background_write_fails_the_next_checkpoint_point(tmp_path: Path) -> None:
    gate = GatedCheckpointer(tmp_path, count=100)
    gate.shard, gate.offset = 1, 50
    writer = BackgroundCheckpointer(gate, every=10, version=0)
    writer.submit(state(5))
    gate.fail = OSError(errno.ENOSPC, "No space left on device")
    gate.release.set()
    with pytest.raises(CheckpointWriteFailed, match=r"version 5 .*No space left"):
        writer.submit(state(10))
    assert gate.files() == [] and not list(tmp_path.glob("*.tmp"))
    gate.fail = None
    writer.submit(state(15))  # raised once; the next point writes again
    writer.close()
    assert [v for v, _ in gate.files()] == [15]


def test_a_failed_write_is_raised_at_close_unless_the_shard_is_already_failing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for raise_error in (True, False):
        gate = GatedCheckpointer(tmp_path / str(raise_error), count=100)
        gate.shard, gate.offset = 1, 50
        gate.fail = OSError(errno.EIO, "I/O error")
        gate.release.set()
        writer = BackgroundCheckpointer(gate, every=10, version=0)
        writer.submit(state(5))
        if raise_error:
            with pytest.raises(CheckpointWriteFailed, match="I/O error"):
                writer.close()
        else:
            writer.close(raise_error=False)
            assert "checkpoint of version 5" in caplog.text


def _write_then_die_mid_write(directory: str, ready: Any) -> None:
    """Child: save version 20, then start version 40 and hang inside its file."""
    gate = GatedCheckpointer(Path(directory), count=100)
    gate.shard, gate.offset = 1, 50
    gate.release.set()  # version 20 goes through whole
    gate.save(state(20))
    writer = BackgroundCheckpointer(gate, every=10, version=20)
    gate.release.clear()
    gate.started.clear()
    writer.submit(state(40))
    gate.started.wait()
    ready.set()
    threading.Event().wait()  # until SIGKILL


def test_a_crash_mid_write_leaves_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=_write_then_die_mid_write, args=(str(tmp_path), ready))
    child.start()
    try:
        assert ready.wait(60), "the child never reached the middle of its write"
        os.kill(child.pid or 0, signal.SIGKILL)
    finally:
        child.join(30)
    assert child.exitcode == -signal.SIGKILL
    assert list(tmp_path.glob(".ckpt-000000000040*.tmp"))  # it did die inside version 40
    back = Checkpointer(tmp_path, shard=1, offset=50, count=100, keep=3).load_latest()
    assert back is not None and back.version == 20
    for name, arr in state(20).arrays.items():
        np.testing.assert_array_equal(back.arrays[name], arr)
