"""Tests for sgdjob.compression: the 1-bit codec, error feedback and payload validation.

The codec is checked against a deliberately slow reference that walks buckets and elements
one by one in float64, written from the spec rather than from the implementation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sgdjob import compression as c
from sgdjob import onebit_kernels as kern
from sgdjob.compression import (
    CompressionError,
    ErrorFeedback,
    decode_into,
    quantize,
    validate_payload,
    wire_nbytes,
)


def reference_encode(v: np.ndarray, bucket_size: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    """(bits, scales, q) for float32 ``v``, one bucket and one element at a time, in float64."""
    n = len(v)
    bits = bytearray((n + 7) // 8)
    scales = []
    q = np.empty(n, dtype=np.float32)
    for start in range(0, n, bucket_size):
        bucket = [float(x) for x in v[start : start + bucket_size]]
        pos = [x for x in bucket if x >= 0]
        neg = [x for x in bucket if x < 0]
        plus = np.float32(math.fsum(pos) / max(len(pos), 1))
        minus = np.float32(math.fsum(neg) / max(len(neg), 1))
        scales.append((minus, plus))
        for k, x in enumerate(bucket):
            j = start + k
            if x >= 0:
                bits[j // 8] |= 1 << (j % 8)
            q[j] = plus if x >= 0 else minus
    return bytes(bits), np.array(scales, dtype=np.float32).reshape(-1, 2), q


def grid_vector(rng: np.random.Generator, n: int) -> np.ndarray:
    """Values on a 1/1024 grid: every bucket sum is exact in float64, so means must match."""
    return (rng.integers(-4096, 4096, size=n) / 1024).astype(np.float32)


def decoded(enc: c.Encoded) -> np.ndarray:
    acc = np.zeros(enc.count, dtype=np.float32)
    decode_into(acc, enc.bits, enc.scales, count=enc.count, bucket_size=enc.bucket_size)
    return acc


@pytest.mark.parametrize(
    ("n", "bucket_size"), [(1, 8), (8, 8), (4096, 512), (1037, 512), (1037, 12), (300_001, 9)]
)
def test_encode_reproduces_the_reference_bits_and_means_exactly(n: int, bucket_size: int) -> None:
    v = grid_vector(np.random.default_rng(n), n)
    bits, scales, q = reference_encode(v, bucket_size)
    residual = np.zeros(n, dtype=np.float32)
    enc = quantize(v, bucket_size, residual=residual)
    assert enc.bits.tobytes() == bits
    np.testing.assert_array_equal(enc.scales, scales)
    np.testing.assert_array_equal(decoded(enc), q)
    np.testing.assert_array_equal(residual, v - q)


def test_means_of_arbitrary_floats_agree_with_the_reference_to_float32_rounding() -> None:
    v = (np.random.default_rng(1).standard_normal(5000) * 1e3).astype(np.float32)
    bits, scales, _ = reference_encode(v, 512)
    enc = quantize(v, 512)
    assert enc.bits.tobytes() == bits
    np.testing.assert_allclose(enc.scales, scales, rtol=2e-7, atol=0)


def test_a_one_sided_bucket_has_zero_for_its_empty_side_and_zero_counts_as_non_negative() -> None:
    v = np.array([1, 2, 3, 0, -1, -2, -3, -6, 0, 0, 0, 0], dtype=np.float32)
    enc = quantize(v, 4)
    np.testing.assert_array_equal(enc.scales, [[0, 1.5], [-3, 0], [0, 0]])
    assert enc.bits.tolist() == [0b00001111, 0b00001111]
    np.testing.assert_array_equal(decoded(enc), [1.5] * 4 + [-3] * 4 + [0] * 4)


def test_the_partial_last_bucket_gets_its_own_pair_of_scales() -> None:
    v = np.concatenate([np.full(16, 2.0), np.full(16, -4.0), [1.0, -1.0, 3.0]]).astype(np.float32)
    enc = quantize(v, 16)
    assert enc.scales.shape == (3, 2)
    np.testing.assert_array_equal(enc.scales[2], [-1.0, 2.0])
    np.testing.assert_array_equal(decoded(enc)[-3:], [2.0, -1.0, 2.0])
    # 35 elements: 5 bytes, and the 5 padding bits of the last byte stay clear.
    assert len(enc.bits) == 5 and enc.bits[-1] == 0b101


def test_bit_order_is_lsb_first_within_each_byte() -> None:
    v = -np.ones(16, dtype=np.float32)
    v[[0, 3, 9, 15]] = 1.0
    assert quantize(v, 8).bits.tolist() == [0b00001001, 0b10000010]


def test_an_empty_vector_encodes_to_empty_buffers() -> None:
    enc = quantize(np.zeros(0, dtype=np.float32), 512)
    assert enc.nbytes == 0 and enc.scales.shape == (0, 2)
    decode_into(np.zeros(0, dtype=np.float32), b"", b"", count=0, bucket_size=512)


@pytest.mark.parametrize(("n", "bucket_size"), [(4096, 512), (1037, 12), (70_001, 9), (5, 8)])
def test_the_host_and_device_kernels_produce_identical_results(n: int, bucket_size: int) -> None:
    # The torch kernels are what a CUDA worker runs; on CPU tensors they must match numpy's.
    rng = np.random.default_rng(7)
    g, r0 = grid_vector(rng, n), grid_vector(rng, n)
    r_host, r_dev = r0.copy(), torch.from_numpy(r0.copy())
    host = c._quantize_host(g, bucket_size, r_host)
    dev = c._quantize_torch(torch.from_numpy(g), bucket_size, r_dev)
    np.testing.assert_array_equal(host.bits, dev.bits)
    np.testing.assert_array_equal(host.scales, dev.scales)
    np.testing.assert_array_equal(r_host, r_dev.numpy())
    acc = torch.zeros(n)
    kern.torch_decode(acc, torch.from_numpy(host.bits), torch.from_numpy(host.scales), bucket_size)
    np.testing.assert_array_equal(acc.numpy(), decoded(host))


def test_error_feedback_sends_everything_eventually_over_100_steps() -> None:
    rng = np.random.default_rng(3)
    n = 3000
    ef = ErrorFeedback(n, 512)
    sent = np.zeros(n, dtype=np.float64)
    raw = np.zeros(n, dtype=np.float64)
    for _ in range(100):
        g = rng.standard_normal(n).astype(np.float32)
        raw += g
        sent += decoded(ef.encode(torch.from_numpy(g)))
    total = sent + ef.residual.numpy()
    np.testing.assert_allclose(total, raw, rtol=0, atol=1e-3)
    # And the residual is bounded, not a growing backlog.
    assert np.abs(ef.residual.numpy()).max() < 10


def test_without_error_feedback_the_residual_stays_zero() -> None:
    ef = ErrorFeedback(1000, 64, enabled=False)
    g = np.random.default_rng(4).standard_normal(1000).astype(np.float32)
    first = ef.encode(g)
    second = ef.encode(g)
    assert not ef.residual.any()
    np.testing.assert_array_equal(first.bits, second.bits)
    np.testing.assert_array_equal(first.scales, second.scales)


def test_a_learning_rate_change_rescales_the_residual_by_lr_prev_over_lr_now() -> None:
    ef = ErrorFeedback(100, 16)
    ef.encode(np.random.default_rng(5).standard_normal(100).astype(np.float32))
    before = ef.residual.clone()
    assert before.abs().sum() > 0
    ef.rescale_lr(0.1, 0.05)
    torch.testing.assert_close(ef.residual, before * 2.0)
    with pytest.raises(ValueError):
        ef.rescale_lr(0.1, 0.0)
    ef.reset()
    assert not ef.residual.any()


def test_a_non_finite_gradient_is_refused_and_the_residual_is_untouched() -> None:
    ef = ErrorFeedback(1000, 100)
    ef.encode(np.random.default_rng(6).standard_normal(1000).astype(np.float32))
    before = ef.residual.clone()
    g = np.ones(1000, dtype=np.float32)
    g[777] = np.nan
    with pytest.raises(CompressionError, match="bucket 7"):
        ef.encode(g)
    g[777] = np.inf
    with pytest.raises(CompressionError, match="bucket 7"):
        ef.encode(g)
    torch.testing.assert_close(ef.residual, before, rtol=0, atol=0)


def test_decode_adds_alpha_times_q_into_the_existing_accumulator() -> None:
    v = grid_vector(np.random.default_rng(8), 999)
    enc = quantize(v, 100)
    q = decoded(enc)
    acc = torch.full((999,), 3.0)
    decode_into(
        acc, enc.bits.tobytes(), enc.scales.tobytes(), count=999, bucket_size=100, alpha=0.25
    )
    np.testing.assert_array_equal(acc.numpy(), 3.0 + 0.25 * q)


def test_the_wire_size_is_under_one_twenty_eighth_of_fp32_with_bucket_512() -> None:
    assert wire_nbytes(35, 16) == 5 + 3 * 8
    for count in (512 * 1000, 10_000_000, 25_557_032):
        assert wire_nbytes(count, 512) * 28 <= 4 * count
    assert c.compression_ratio(1 << 20, 512) == pytest.approx(28.44, abs=0.01)


# ----------------------------------------------------------------------------- untrusted input


def _good_payload(n: int = 100, bucket_size: int = 16) -> tuple[bytes, bytes]:
    enc = quantize(grid_vector(np.random.default_rng(9), n), bucket_size)
    return enc.bits.tobytes(), enc.scales.tobytes()


def _nan_scale(scales: bytes) -> bytes:
    arr = np.frombuffer(scales, dtype=np.float32).copy()
    arr[5] = np.nan
    return arr.tobytes()


def _inf_scale(scales: bytes) -> bytes:
    arr = np.frombuffer(scales, dtype=np.float32).copy()
    arr[3] = np.inf
    return arr.tobytes()


def _wrong_sign(scales: bytes) -> bytes:
    arr = np.frombuffer(scales, dtype=np.float32).copy()
    arr[0] = 1.0  # a positive mu_minus
    return arr.tobytes()


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda b, s: (b[:-1], s), "bits: 12 bytes, expected 13"),
        (lambda b, s: (b + b"\0", s), "bits: 14 bytes"),
        (lambda b, s: (b, s[:-4]), "scales: 52 bytes, expected 56"),
        (lambda b, s: (b, s + s), "scales: 112 bytes"),
        (lambda b, s: (b, _nan_scale(s)), "bucket 2 mu_plus is nan"),
        (lambda b, s: (b, _inf_scale(s)), "bucket 1 mu_plus is inf"),
        (lambda b, s: (b, _wrong_sign(s)), "bucket 0 has mu_minus=1.0"),
        (lambda b, s: (b[:-1] + b"\xff", s), "padding bits"),
        (lambda b, s: ("not a buffer", s), "bits: not a contiguous bytes-like"),
        (lambda b, s: (b, np.zeros((14, 4), np.float32)[:, ::2]), "scales: not a contiguous"),
    ],
)
def test_a_malformed_payload_is_rejected_and_the_accumulator_is_untouched(
    mangle: object, message: str
) -> None:
    bits, scales = mangle(*_good_payload())  # type: ignore[operator]
    acc = np.arange(100, dtype=np.float32)
    with pytest.raises(CompressionError, match=message):
        decode_into(acc, bits, scales, count=100, bucket_size=16)
    np.testing.assert_array_equal(acc, np.arange(100, dtype=np.float32))


@pytest.mark.parametrize(
    ("acc", "kwargs"),
    [
        (np.zeros(99, np.float32), {}),
        (np.zeros(100, np.float64), {}),
        (np.zeros(200, np.float32)[::2], {}),
        (torch.zeros(101), {}),
        (np.zeros(100, np.float32), {"alpha": math.nan}),
        (np.zeros(100, np.float32), {"alpha": 1e39}),
        (np.zeros(100, np.float32), {"count": True}),
    ],
)
def test_a_bad_accumulator_or_argument_is_rejected_before_any_write(
    acc: np.ndarray | torch.Tensor, kwargs: dict[str, object]
) -> None:
    bits, scales = _good_payload()
    before = torch.as_tensor(acc).clone()
    args: dict = {"count": 100, "bucket_size": 16, **kwargs}
    with pytest.raises(CompressionError):
        decode_into(acc, bits, scales, **args)
    assert torch.equal(torch.as_tensor(acc), before)


def test_validate_returns_zero_copy_views_of_read_only_socket_buffers() -> None:
    bits, scales = _good_payload()
    b, s = validate_payload(memoryview(bits), memoryview(scales), count=100, bucket_size=16)
    assert b.dtype == np.uint8 and s.shape == (7, 2) and not s.flags.writeable
    assert np.shares_memory(s, np.frombuffer(scales, dtype=np.uint8))


# ----------------------------------------------------------------------------- properties

finite_f32 = st.floats(
    width=32, allow_nan=False, allow_infinity=False, min_value=-(2.0**100), max_value=2.0**100
)


@settings(max_examples=150, deadline=None)
@given(
    v=hnp.arrays(np.float32, st.integers(0, 300), elements=finite_f32),
    bucket_size=st.integers(1, 70),
)
def test_encode_then_decode_matches_the_reference_for_any_finite_vector(
    v: np.ndarray, bucket_size: int
) -> None:
    bits, scales, _ = reference_encode(v, bucket_size)
    residual = np.zeros_like(v)
    enc = quantize(v, bucket_size, residual=residual)
    assert enc.bits.tobytes() == bits
    np.testing.assert_allclose(enc.scales, scales, rtol=1e-6, atol=1e-37)
    assert (enc.scales[:, 0] <= 0).all() and (enc.scales[:, 1] >= 0).all()
    out = decoded(enc)
    # Every decoded value is exactly one of its bucket's two scales, picked by the sign bit.
    per_elem = np.repeat(enc.scales, bucket_size, axis=0)[: len(v)]
    np.testing.assert_array_equal(out, np.where(v >= 0, per_elem[:, 1], per_elem[:, 0]))
    np.testing.assert_array_equal(residual, v - out)


@settings(max_examples=300, deadline=None)
@given(
    bits=st.binary(max_size=40),
    scales=st.binary(max_size=120),
    count=st.integers(0, 300),
    bucket_size=st.integers(1, 80),
)
def test_the_validator_accepts_exactly_the_well_formed_payloads(
    bits: bytes, scales: bytes, count: int, bucket_size: int
) -> None:
    n_buckets = -(-count // bucket_size)
    ok = len(bits) == -(-count // 8) and len(scales) == 8 * n_buckets
    if ok and count % 8:
        ok = bits[-1] >> (count % 8) == 0
    if ok:
        sc = np.frombuffer(scales, dtype="<f4").reshape(-1, 2)
        ok = bool(np.isfinite(sc).all() and (sc[:, 0] <= 0).all() and (sc[:, 1] >= 0).all())
    acc = np.full(count, 7.0, dtype=np.float32)
    try:
        decode_into(acc, bits, scales, count=count, bucket_size=bucket_size)
    except CompressionError:
        assert not ok
        assert (acc == 7.0).all()
    else:
        assert ok
        assert np.isfinite(acc).all()


def test_a_residual_that_does_not_match_the_gradient_is_refused() -> None:
    g = np.ones(10, dtype=np.float32)
    with pytest.raises(CompressionError, match=r"residual \(9,\) on cpu does not match"):
        quantize(g, 4, residual=np.zeros(9, dtype=np.float32))
    with pytest.raises(CompressionError, match="must be writable"):
        ro = np.zeros(10, dtype=np.float32)
        ro.flags.writeable = False
        quantize(g, 4, residual=ro)
    with pytest.raises(CompressionError, match="1-D float32"):
        quantize(np.ones(10, dtype=np.float64), 4)
    with pytest.raises(CompressionError, match="bucket_size"):
        quantize(g, 0)


# ----------------------------------------------------------------------------- fast host kernels
# The host kernels were rewritten for speed. They must reproduce the straightforward numpy
# kernels they replaced on arbitrary floats, not only on the exact grids above: the same bits;
# means at most one float32 ulp apart (the float64 sums add in torch's order, not numpy's);
# and, given the scales sent, exactly the residual and the decoded sums those kernels give
# (signs of zeros included). These are those kernels.


def _old_select(m2: np.ndarray, s2: np.ndarray) -> np.ndarray:
    q = np.multiply(m2, s2[:, 1:2], dtype=np.float32)
    q += np.logical_not(m2) * s2[:, 0:1]
    return q


def _old_encode(g: np.ndarray, bucket_size: int) -> tuple[np.ndarray, np.ndarray]:
    count, views = g.shape[0], kern.bucket_views
    bits = np.zeros(c.bits_nbytes(count), dtype=np.uint8)
    scales = np.empty((c.num_buckets(count, bucket_size), 2), dtype=np.float32)
    for b0, e0, e1 in kern.chunks(count, bucket_size, 1 << 16):
        v = g[e0:e1]
        m = v >= 0
        packed = np.packbits(m, bitorder="little")
        bits[e0 // 8 : e0 // 8 + packed.size] = packed
        b = b0
        for v2, m2 in zip(views(v, bucket_size), views(m, bucket_size), strict=True):
            pos = np.maximum(v2, 0).sum(axis=1, dtype=np.float64)
            neg = np.minimum(v2, 0).sum(axis=1, dtype=np.float64)
            n_pos = m2.view(np.uint8).sum(axis=1, dtype=np.int32)
            minus, plus = kern.means(pos, neg, n_pos, v2.shape[1])
            scales[b : b + v2.shape[0]] = np.stack([minus, plus], axis=1)
            b += v2.shape[0]
    return bits, scales


def _old_residual(v: np.ndarray, scales: np.ndarray, bucket_size: int) -> np.ndarray:
    """r = v - q for these scales, as the old second pass computed it."""
    r = np.empty_like(v)
    views, b = kern.bucket_views, 0
    for v2, r2 in zip(views(v, bucket_size), views(r, bucket_size), strict=True):
        np.subtract(v2, _old_select(v2 >= 0, scales[b : b + v2.shape[0]]), out=r2)
        b += v2.shape[0]
    return r


def _old_decode(acc: np.ndarray, enc: c.Encoded, alpha: float) -> None:
    scaled, bs = (enc.scales * alpha).astype(np.float32), enc.bucket_size
    for b0, e0, e1 in kern.chunks(acc.shape[0], bs, 1 << 16):
        signs = np.unpackbits(enc.bits[e0 // 8 : -(-e1 // 8)], count=e1 - e0, bitorder="little")
        b = b0
        views = kern.bucket_views
        for a2, m2 in zip(views(acc[e0:e1], bs), views(signs.view(np.bool_), bs), strict=True):
            a2 += _old_select(m2, scaled[b : b + a2.shape[0]])
            b += a2.shape[0]


def _awkward_vector(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    """Non-grid floats: rounding in the float64 sums and the float32 means is real here."""
    x = rng.standard_normal(n).astype(np.float32) * np.float32(1e-3)
    if kind == "magnitudes":  # 26 orders of magnitude: sums are far from exact
        x *= np.exp(rng.uniform(-30, 30, n)).astype(np.float32)
    elif kind == "zeros":  # +0.0 and -0.0, all-zero buckets and one-sided buckets
        x[rng.random(n) < 0.3] = 0.0
        x[rng.random(n) < 0.2] = -0.0
        x[: n // 3] = np.where(rng.random(n // 3) < 0.5, np.float32(-0.0), np.float32(0.0))
        x[n // 3 : n // 2] = np.abs(x[n // 3 : n // 2])
    return x


def _same_bits(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("kind", ["normal", "magnitudes", "zeros"])
@pytest.mark.parametrize(
    ("n", "bucket_size", "chunk"),
    [
        (1, 1, 1 << 18),
        (13, 5, 1 << 18),
        (70_001, 512, 1 << 18),
        (70_001, 512, 1000),  # many chunks and a short last one
        (200_003, 100, 1 << 18),
        (99_999, 8192, 1 << 12),
        (150_000, 70_000, 1 << 18),  # buckets wider than numpy's 8192-element sum buffer
        (12_345, 13, 64),
    ],
)
def test_the_host_kernels_match_the_kernels_they_replaced(
    n: int, bucket_size: int, chunk: int, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kern, "HOST_CHUNK_ELEMENTS", chunk)
    rng = np.random.default_rng([n, bucket_size, len(kind)])
    g = _awkward_vector(rng, n, kind)
    r0 = _awkward_vector(rng, n, kind) * np.float32(0.1)
    for residual in (None, r0):
        r_new = None if residual is None else residual.copy()
        new = c._quantize_host(g, bucket_size, r_new)
        v = g if residual is None else g + residual
        bits, scales = _old_encode(v, bucket_size)
        _same_bits(new.bits, bits)
        np.testing.assert_array_max_ulp(new.scales, scales, maxulp=1)
        if r_new is not None:
            _same_bits(r_new, _old_residual(v, new.scales, bucket_size))
        for alpha in (1.0, -0.5, 3.0):
            acc_new = _awkward_vector(rng, n, "zeros")
            acc_old = acc_new.copy()
            decode_into(
                acc_new, new.bits, new.scales, count=n, bucket_size=bucket_size, alpha=alpha
            )
            _old_decode(acc_old, new, alpha)
            _same_bits(acc_new, acc_old)


def test_a_non_finite_value_is_told_apart_from_a_malformed_payload_by_its_type() -> None:
    bits = np.zeros(1, np.uint8)
    with pytest.raises(c.NotFiniteError, match="not finite"):
        validate_payload(bits, np.array([[np.nan, 1.0]], np.float32), count=8, bucket_size=8)
    with pytest.raises(c.NotFiniteError, match="bucket 0"):
        quantize(np.array([np.inf] * 8, np.float32), 8)
    with pytest.raises(CompressionError) as err:
        validate_payload(bits, np.array([[1.0, 1.0]], np.float32), count=8, bucket_size=8)
    assert not isinstance(err.value, c.NotFiniteError)  # mu_minus > 0: malformed, not NaN


def test_the_mirror_update_refuses_a_read_only_mirror_or_another_shape() -> None:
    params = np.ones(16, np.float32)
    frozen = np.zeros(16, np.float32)
    frozen.flags.writeable = False
    with pytest.raises(CompressionError, match="mirror must be writable"):
        c.encode_mirror_update(params, frozen, 8)
    with pytest.raises(CompressionError, match="one shape"):
        c.encode_mirror_update(params, np.zeros(8, np.float32), 8)
    mirror = np.zeros(16, np.float32)
    enc = c.encode_mirror_update(params, mirror, 8)
    np.testing.assert_array_equal(mirror, decoded(enc))  # the mirror moved by what was sent
