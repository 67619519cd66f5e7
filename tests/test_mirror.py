"""Tests for sgdjob.mirror: the shard-side state of server-to-worker compression."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sgdjob.compression import CompressionError, decode_into
from sgdjob.mirror import ParameterMirror


def test_the_mirror_stays_bit_identical_to_a_worker_applying_every_update() -> None:
    rng = np.random.default_rng(0)
    params = rng.standard_normal(5000).astype(np.float32)
    shard = ParameterMirror(params, 512)
    worker_np = params.copy()
    worker_torch = torch.from_numpy(params.copy())  # the torch path a GPU worker takes
    for _ in range(50):
        params -= 0.01 * rng.standard_normal(5000).astype(np.float32)
        enc = shard.encode_update(params)
        decode_into(
            worker_np, enc.bits.tobytes(), enc.scales.tobytes(), count=5000, bucket_size=512
        )
        decode_into(worker_torch, enc.bits, enc.scales, count=5000, bucket_size=512)
    np.testing.assert_array_equal(worker_np, shard.mirror)
    np.testing.assert_array_equal(worker_torch.numpy(), shard.mirror)


def test_the_worker_copy_follows_the_parameters_with_a_bounded_gap() -> None:
    rng = np.random.default_rng(1)
    start = rng.standard_normal(2000).astype(np.float32)
    params = start.copy()
    shard = ParameterMirror(params, 128)
    first_gap = None
    for step in range(200):
        params -= 0.01 * (1.0 + rng.standard_normal(2000).astype(np.float32))  # drift + noise
        shard.encode_update(params)
        if step == 0:
            first_gap = np.abs(params - shard.mirror).max()
    # Parameters moved by ~2 per element; the worker's copy is within a few steps' worth.
    assert np.abs(params - start).mean() > 1.5
    assert np.abs(params - shard.mirror).max() < 0.2
    assert first_gap is not None and first_gap < 0.1


def test_reset_resynchronises_and_wrong_shapes_are_refused() -> None:
    shard = ParameterMirror(np.zeros(100, np.float32), 16)
    fresh = np.arange(100, dtype=np.float32)
    shard.reset(fresh)
    np.testing.assert_array_equal(shard.mirror, fresh)
    enc = shard.encode_update(fresh)  # nothing changed: the update decodes to zeros
    assert not enc.scales.any()
    with pytest.raises(CompressionError):
        shard.encode_update(np.zeros(99, np.float32))
