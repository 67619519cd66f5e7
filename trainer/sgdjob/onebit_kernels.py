"""The 1-bit codec's arithmetic: the chunked CPU kernels, and the torch kernels of other devices.

This module owns how fast the numbers of ``sgdjob.compression`` come out, on inputs that module
has already checked (1-D contiguous float32, sizes that fit, writable state). The format, the
checks, the errors and the state a sender keeps belong to ``sgdjob.compression``; nothing here
raises for bad input or does I/O.

The CPU path walks the vector in runs of whole buckets (``chunks``), so every temporary is
run-sized and reused (``_HostScratch``). Where torch's CPU ops are several times faster than
numpy's (clamp, float64 sums, int32 ops with a broadcast operand) they run on zero-copy torch
views of the same memory; every such op is exact, so the results do not depend on which library
ran them. Accelerators run the same maths as torch ops on their own device, whole vector.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

# CPU kernels walk the vector in runs of about this many elements (whole buckets) so their
# temporaries stay in cache (2 MiB per float32 buffer: L3); large fresh temporaries cost page
# faults that dominate runtime, and shorter runs pay the per-call overhead of ~20 numpy/torch
# calls per run too often (measured best at 2**19 for 10M elements on a 2-core EPYC).
HOST_CHUNK_ELEMENTS = 1 << 19
# Accelerators decode in bigger runs: fewer kernel launches, still bounded temporaries.
DEVICE_CHUNK_ELEMENTS = 1 << 22


def chunks(count: int, bucket_size: int, target: int) -> Iterator[tuple[int, int, int]]:
    """(first bucket, first element, end element) of runs of whole buckets, ~target elements.

    Every run holds a multiple of 8 elements (except the last), so every run starts on a byte
    of the bits buffer. Looping over runs (not buckets, not elements) keeps the temporaries in
    cache on the CPU and bounds them on an accelerator.
    """
    step = 8 // math.gcd(bucket_size, 8)
    span = max(step, (target // bucket_size) // step * step) * bucket_size
    for e0 in range(0, count, span):
        yield e0 // bucket_size, e0, min(count, e0 + span)


def bucket_views(x: Any, bucket_size: int) -> list[Any]:
    """A run of elements as 2-D views: (full buckets, bucket_size), then (1, partial tail)."""
    n = x.shape[0]
    full = n // bucket_size * bucket_size
    views = [x[:full].reshape(-1, bucket_size)] if full else []
    if full < n:
        views.append(x[full:].reshape(1, -1))
    return views


def means(pos_sum: Any, neg_sum: Any, n_pos: Any, width: Any) -> tuple[Any, Any]:
    """float64 sums and counts -> (mu_minus, mu_plus); an empty side divides 0 by 1, giving 0.

    Each side is summed on its own (not total - positive): a difference of two large sums
    would cancel away a small side's mean.
    """
    return neg_sum / np.maximum(width - n_pos, 1), pos_sum / np.maximum(n_pos, 1)


def _host_chunks(count: int, bucket_size: int) -> list[tuple[int, int, int]]:
    # Read at call time, so a test can shrink the runs.
    return list(chunks(count, bucket_size, HOST_CHUNK_ELEMENTS))


def _span(runs: list[tuple[int, int, int]]) -> int:
    """Elements in the longest run (the first one)."""
    return runs[0][2] - runs[0][1] if runs else 0


class _HostScratch(threading.local):
    """Run-sized work buffers, one set per thread, reused across runs and calls.

    Allocating the temporaries per run costs more than the arithmetic on them (malloc, and page
    faults above malloc's mmap threshold). 17 bytes per element of the longest run seen.
    """

    size = 0

    def get(self, span: int) -> _HostScratch:
        if span > self.size:
            self.v, self.mask = np.empty(span, np.float32), np.empty(span, np.bool_)
            self.sel = np.empty(span, np.int32)
            self.tv, self.tmask, self.tsel = map(torch.from_numpy, (self.v, self.mask, self.sel))
            self.v64 = torch.empty(span, dtype=torch.float64)
            self.size = span
        return self


_scratch = _HostScratch()
_bitwise_count = getattr(np, "bitwise_count", None)  # numpy >= 2.0


def _host_values(
    g: np.ndarray, state: np.ndarray | None, mirror: bool, e0: int, e1: int, out: np.ndarray
) -> np.ndarray:
    """``v`` for elements ``e0:e1`` into ``out``: ``g``, ``g + residual`` or ``g - mirror``."""
    if state is None:
        np.copyto(out, g[e0:e1])
        return out
    return (np.subtract if mirror else np.add)(g[e0:e1], state[e0:e1], out=out)


def _select_words(scales: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per bucket int32 words ``(minus, minus ^ plus)``: ``q = minus ^ (b * (minus ^ plus))``.

    The selected values are what ``b * plus + (1 - b) * minus`` gives in float32, i.e. ``plus +
    0 * minus`` and ``0 * plus + minus``: ``plus`` and ``minus`` up to the sign of a zero scale.
    Selecting bit patterns with an int32 multiply and xor is exact and several times faster than
    two float multiplies of a bool mask (numpy casts the mask in buffers) or any masked select.
    """
    zero = np.float32(0)
    plus = scales[:, 1] + zero * scales[:, 0]
    minus = zero * scales[:, 1] + scales[:, 0]
    base = minus.view(np.int32)
    flip = base ^ plus.view(np.int32)
    return torch.from_numpy(base.reshape(-1, 1)), torch.from_numpy(flip.reshape(-1, 1))


def _host_select(
    sel: torch.Tensor, b0: int, base: torch.Tensor, flip: torch.Tensor, bucket_size: int
) -> np.ndarray:
    """Turn ``sel`` (int32 bits 0/1 of buckets ``b0...``) into the float32 q, in place."""
    b = b0
    for s2 in bucket_views(sel, bucket_size):
        rows = s2.shape[0]
        torch.mul(s2, flip[b : b + rows], out=s2)
        torch.bitwise_xor(s2, base[b : b + rows], out=s2)
        b += rows
    return sel.numpy().view(np.float32)


def _row_sums(x: torch.Tensor, bucket_size: int) -> np.ndarray:
    """float64 sums of a run's buckets (the last may be short), in torch's order."""
    return np.concatenate([rows.sum(dim=1).numpy() for rows in bucket_views(x, bucket_size)])


def host_encode(
    g: np.ndarray,
    bucket_size: int,
    state: np.ndarray | None,
    *,
    mirror: bool,
    bits: np.ndarray,
    scales: np.ndarray,
) -> None:
    """Fill ``bits`` and ``scales`` for ``v``: ``g``, ``g + state`` or (``mirror``) ``g - state``.

    Writes nothing else; a NaN or an infinity in ``v`` leaves a non-finite scale for the caller
    to refuse. The float64 bucket sums run in torch, several times faster than numpy's float32
    -> float64 sums. Each side is summed on its own (see ``means``), over exact float64 copies
    of the float32 values; only the order of the additions differs from numpy's, which can move
    a mean by one float32 ulp at most. The receiver decodes whatever scales are sent, and the
    sender's residual is computed from those same scales, so error feedback stays exact.
    """
    runs = _host_chunks(g.shape[0], bucket_size)
    sc = _scratch.get(_span(runs))
    n_buckets = scales.shape[0]
    sums = np.empty((2, n_buckets))  # [sum of v >= 0, sum of v < 0] per bucket
    n_pos = np.empty(n_buckets, np.int32)  # bucket_size < 2**31
    for b0, e0, e1 in runs:
        n = e1 - e0
        if state is None and g.flags.writeable:  # else torch refuses to wrap it: copy it
            v, tv = g[e0:e1], torch.from_numpy(g[e0:e1])
        else:
            v, tv = _host_values(g, state, mirror, e0, e1, sc.v[:n]), sc.tv[:n]
        m = np.greater_equal(v, 0, out=sc.mask[:n])
        packed = np.packbits(m, bitorder="little")
        bits[e0 // 8 : e0 // 8 + packed.size] = packed
        # Set bits per bucket: a popcount of the packed bytes where buckets are whole bytes,
        # else a uint8 sum of the flags (several times faster than np.count_nonzero(axis=1)).
        if _bitwise_count is not None and bucket_size % 8 == 0:
            flags, width = _bitwise_count(packed), bucket_size // 8
        else:
            flags, width = m.view(np.uint8), bucket_size
        b = b0
        for m2 in bucket_views(flags, width):
            m2.sum(axis=1, dtype=np.int32, out=n_pos[b : b + m2.shape[0]])
            b += m2.shape[0]
        # Clamping in place (faster than out of place) a float64 copy of v, once per side. A
        # NaN is no v >= 0, and the clamps keep it: its bucket's mean is NaN and is refused.
        v64 = sc.v64[:n]
        pos = _row_sums(v64.copy_(tv).clamp_(min=0), bucket_size)
        neg = _row_sums(v64.copy_(tv).clamp_(max=0), bucket_size)
        sums[0, b0 : b0 + pos.size], sums[1, b0 : b0 + neg.size] = pos, neg
    widths = np.full(n_buckets, bucket_size, dtype=np.int32)
    if n_buckets:
        widths[-1] = g.shape[0] - (n_buckets - 1) * bucket_size
    sums += 0.0  # -0.0 -> +0.0: a side of zeros has the mean +0.0, whatever their signs
    scales[:] = np.stack(means(sums[0], sums[1], n_pos, widths)).astype(np.float32).T


def host_feedback(
    g: np.ndarray, bucket_size: int, state: np.ndarray, *, mirror: bool, scales: np.ndarray
) -> None:
    """The second pass, once every scale is known to be finite: ``state <- v - q`` (error
    feedback), or with ``mirror`` ``state <- state + q``, exactly the float32 add
    ``decode_into`` makes on the receiver. Recomputing ``v`` costs a re-read but needs no
    full-size scratch."""
    runs = _host_chunks(g.shape[0], bucket_size)
    sc = _scratch.get(_span(runs))
    base, flip = _select_words(scales)
    for b0, e0, e1 in runs:
        v = _host_values(g, state, mirror, e0, e1, sc.v[: e1 - e0])
        np.greater_equal(v, 0, out=sc.mask[: e1 - e0])
        sel = sc.tsel[: e1 - e0].copy_(sc.tmask[: e1 - e0])
        q = _host_select(sel, b0, base, flip, bucket_size)
        if mirror:
            np.add(state[e0:e1], q, out=state[e0:e1])
        else:
            np.subtract(v, q, out=state[e0:e1])


def host_decode(acc: np.ndarray, bits: np.ndarray, scaled: np.ndarray, bucket_size: int) -> None:
    """``acc += q`` for checked ``bits`` and already-scaled float32 scales."""
    runs = _host_chunks(acc.shape[0], bucket_size)
    sc = _scratch.get(_span(runs))
    base, flip = _select_words(scaled)
    for b0, e0, e1 in runs:
        signs = np.unpackbits(bits[e0 // 8 : -(-e1 // 8)], count=e1 - e0, bitorder="little")
        sel = sc.tsel[: e1 - e0].copy_(torch.from_numpy(signs))
        np.add(acc[e0:e1], _host_select(sel, b0, base, flip, bucket_size), out=acc[e0:e1])


def torch_pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a 1-D bool tensor on its own device, LSB first; returns uint8 of ceil(n/8)."""
    m = mask.to(torch.uint8)
    pad = (-m.numel()) % 8
    if pad:
        m = torch.cat([m, m.new_zeros(pad)])
    weights = torch.tensor([1 << k for k in range(8)], dtype=torch.uint8, device=m.device)
    # Distinct powers of two: the int32 sum is at most 255, so the uint8 cast is exact.
    return (m.view(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def torch_scales(v: torch.Tensor, mask: torch.Tensor, bucket_size: int) -> torch.Tensor:
    """(n_buckets, 2) float32 ``[mu_minus, mu_plus]`` of ``v`` on its device (``mask = v >= 0``)."""
    parts = []
    for v2, m2 in zip(bucket_views(v, bucket_size), bucket_views(mask, bucket_size), strict=True):
        pos = v2.clamp(min=0).sum(dim=1, dtype=torch.float64)
        neg = v2.clamp(max=0).sum(dim=1, dtype=torch.float64)
        n_pos = m2.sum(dim=1, dtype=torch.float64)
        minus = neg / (v2.shape[1] - n_pos).clamp(min=1)
        parts.append(torch.stack([minus, pos / n_pos.clamp(min=1)], dim=1))
    return torch.cat(parts).to(torch.float32) if parts else v.new_zeros((0, 2))


def torch_feedback(
    v: torch.Tensor, mask: torch.Tensor, scales: torch.Tensor, residual: torch.Tensor, bs: int
) -> None:
    """``residual <- v - q`` on the residual's device."""
    b = 0
    for v2, m2, r2 in zip(
        bucket_views(v, bs), bucket_views(mask, bs), bucket_views(residual, bs), strict=True
    ):
        s2 = scales[b : b + v2.shape[0]]
        torch.sub(v2, torch.where(m2, s2[:, 1:2], s2[:, 0:1]), out=r2)
        b += v2.shape[0]


def torch_decode(acc: torch.Tensor, bits: torch.Tensor, scaled: torch.Tensor, bs: int) -> None:
    """``acc += q`` on ``acc``'s device, from bits and scaled scales already copied there."""
    shifts = torch.arange(8, dtype=torch.uint8, device=acc.device)
    for b0, e0, e1 in chunks(acc.numel(), bs, DEVICE_CHUNK_ELEMENTS):
        chunk = bits[e0 // 8 : -(-e1 // 8)]
        signs = ((chunk.unsqueeze(1) >> shifts) & 1).view(-1)[: e1 - e0].bool()
        b = b0
        for a2, m2 in zip(bucket_views(acc[e0:e1], bs), bucket_views(signs, bs), strict=True):
            s2 = scaled[b : b + a2.shape[0]]
            a2 += torch.where(m2, s2[:, 1:2], s2[:, 0:1])
            b += a2.shape[0]
