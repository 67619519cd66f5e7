"""Shard checkpoints on disk: round trip, atomic files, corrupt ones skipped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sgdjob.checkpoint import Checkpointer, CheckpointError, ShardState, decode, encode


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
