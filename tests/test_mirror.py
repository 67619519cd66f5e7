"""Tests for sgdjob.mirror: the shard-side state of server-to-worker compression."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sgdjob.compression import CompressionError, decode_into, quantize
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


def test_a_mirror_of_full_parameters_sends_a_zero_update_and_wrong_shapes_are_refused() -> None:
    # A worker sent full parameters gets a new mirror of them (sgdjob.downlink).
    fresh = np.arange(100, dtype=np.float32)
    shard = ParameterMirror(fresh, 16)
    np.testing.assert_array_equal(shard.mirror, fresh)
    enc = shard.encode_update(fresh)  # nothing changed: the update decodes to zeros
    assert not enc.scales.any()
    with pytest.raises(CompressionError):
        shard.encode_update(np.zeros(99, np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_fused_update_equals_subtract_quantize_decode_bit_for_bit(dtype: type) -> None:
    # encode_update runs one fused kernel for float32 params; it must give exactly what the
    # plain sequence gives (and what a worker's decode_into reproduces), on non-grid floats.
    rng = np.random.default_rng(1)
    n, bucket = 70_001, 512
    params: np.ndarray = (rng.standard_normal(n) * np.exp(rng.uniform(-20, 5, n))).astype(dtype)
    shard = ParameterMirror(params, bucket)
    plain = shard.mirror.copy()
    for _ in range(4):
        params += (rng.standard_normal(n) * 1e-3).astype(dtype)
        same = rng.random(n) < 0.1
        params[same] = shard.mirror[same]  # some deltas exactly zero
        enc = shard.encode_update(params)
        delta = np.subtract(params, plain, out=np.empty_like(plain))
        ref = quantize(delta, bucket)
        decode_into(plain, ref.bits, ref.scales, count=n, bucket_size=bucket)
        np.testing.assert_array_equal(enc.bits, ref.bits)
        np.testing.assert_array_equal(enc.scales.view(np.uint32), ref.scales.view(np.uint32))
        np.testing.assert_array_equal(shard.mirror.view(np.uint32), plain.view(np.uint32))


def test_a_non_finite_parameter_is_refused_and_the_mirror_is_untouched() -> None:
    shard = ParameterMirror(np.zeros(1000, dtype=np.float32), 100)
    before = shard.mirror.copy()
    params = np.ones(1000, dtype=np.float32)
    params[555] = np.inf
    with pytest.raises(CompressionError, match="bucket 5"):
        shard.encode_update(params)
    np.testing.assert_array_equal(shard.mirror, before)
