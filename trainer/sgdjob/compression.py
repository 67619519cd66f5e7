"""1-bit quantization with error feedback: the codec for `compression: {kind: onebit}`.

This module owns the numbers only: how a float32 vector becomes bits plus scales, how those are
checked when they arrive from a peer, and how they are added back into an accumulator. It does
no I/O and imports no zmq; the transport frames the two buffers it produces. The arithmetic itself,
chunked for the CPU's cache or run as torch ops on an accelerator, is ``sgdjob.onebit_kernels``;
this module checks what goes in and what comes back.

Algorithm (Seide, Fu, Droppo, Li, Yu, "1-Bit Stochastic Gradient Descent and its Application to
Data-Parallel Distributed Training of Speech DNNs", Interspeech 2014):

* The sender keeps a residual ``r`` (the quantization error it still owes). For a vector ``g``
  it quantizes ``v = g + r``.
* ``v`` is cut into buckets of ``bucket_size`` contiguous elements; the last bucket holds the
  remainder and may be shorter. Buckets start at element 0 of the vector handed to the codec
  (a worker encodes each shard's slice on its own, so buckets never cross a shard boundary).
* Per bucket: ``b_i = [v_i >= 0]``; ``mu_plus`` is the mean of the ``v_i >= 0`` and ``mu_minus``
  the mean of the ``v_i < 0``. A side with no elements counts as one element of 0, so its mean
  is 0. Sums are accumulated in float64 and each mean is rounded to float32 once.
* The receiver reconstructs ``q_i = mu_plus if b_i else mu_minus``; the sender sets
  ``r <- v - q`` (error feedback). Without error feedback ``r`` stays 0.
* When the learning rate changes from ``lr_prev`` to ``lr_now``, the residual is rescaled by
  ``lr_prev / lr_now`` so that the step it still owes, ``lr * r``, is unchanged.

Wire layout of one encoded vector of ``count`` elements (two raw buffers, no header of their own;
the transport's header carries ``count``, ``bucket_size`` and a protocol version, and
``CODEC_VERSION`` below changes whenever this layout does):

* bits: ``ceil(count / 8)`` bytes. Element ``j`` is bit ``j % 8`` (LSB first, value
  ``1 << (j % 8)``) of byte ``j // 8``, i.e. ``numpy.packbits(..., bitorder="little")``. A set
  bit means ``v_j >= 0``. Padding bits after element ``count - 1`` are zero.
* scales: ``n_buckets = ceil(count / bucket_size)`` pairs of little-endian float32, laid out
  ``[mu_minus, mu_plus]`` per bucket, bucket 0 first (a C-ordered ``(n_buckets, 2)`` array).
  Both are finite, ``mu_minus <= 0 <= mu_plus``.

With ``bucket_size = 512`` that is 1 bit per element plus 64 bits per 512 elements, about 1/28.4
of the float32 size (``wire_nbytes``).

The same codec serves both directions: a worker encodes gradient slices with one
``ErrorFeedback`` per shard slice (its trainable part: buffers travel as float32 next to the
encoded part, ``sgdjob.onebit_wire``); a shard encodes the parameter update it sends back
against a ``sgdjob.mirror.ParameterMirror`` of what the worker holds, one per distinct state:
workers that were sent the same answers share one, and one encode (``sgdjob.downlink``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from typing_extensions import Buffer

from sgdjob import onebit_kernels as kernels

CODEC_VERSION = 1
"""Version of the bit order / bucket layout above; the transport puts it in the header."""

_SCALES_DTYPE = np.dtype("<f4")
Vector = torch.Tensor | np.ndarray
# What arrives off a socket (bytes, memoryview, zmq.Frame.buffer) or an Encoded's arrays.
Payload = Buffer | np.ndarray


class CompressionError(ValueError):
    """An encoded payload (or an encode input) is malformed; the message says what is wrong."""


class NotFiniteError(CompressionError):
    """The values are well formed but one is a NaN or an infinity (a scale, or an input)."""


# ----------------------------------------------------------------------------- sizes


def _check_sizes(count: int, bucket_size: int) -> None:
    # bool is an int subclass; a header decoder handing us True must not pass as 1.
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise CompressionError(f"count must be a non-negative int, got {count!r}")
    if not isinstance(bucket_size, int) or isinstance(bucket_size, bool) or bucket_size < 1:
        raise CompressionError(f"bucket_size must be a positive int, got {bucket_size!r}")


def num_buckets(count: int, bucket_size: int) -> int:
    """Number of buckets (scale pairs) for ``count`` elements; the last may be partial."""
    _check_sizes(count, bucket_size)
    return -(-count // bucket_size)


def bits_nbytes(count: int) -> int:
    """Exact byte length of the bits buffer for ``count`` elements."""
    _check_sizes(count, 1)
    return -(-count // 8)


def scales_nbytes(count: int, bucket_size: int) -> int:
    """Exact byte length of the scales buffer: two float32 per bucket."""
    return num_buckets(count, bucket_size) * 2 * _SCALES_DTYPE.itemsize


def wire_nbytes(count: int, bucket_size: int) -> int:
    """Payload bytes (bits + scales) for ``count`` elements, excluding the transport header."""
    return bits_nbytes(count) + scales_nbytes(count, bucket_size)


def compression_ratio(count: int, bucket_size: int) -> float:
    """float32 bytes divided by encoded bytes (about 28.4 for bucket 512, large counts)."""
    wire = wire_nbytes(count, bucket_size)
    return 4 * count / wire if wire else 1.0


# ----------------------------------------------------------------------------- encode


@dataclass(frozen=True)
class Encoded:
    """One encoded vector: host buffers ready to send with ``copy=False``."""

    bits: np.ndarray  # uint8, shape (ceil(count/8),)
    scales: np.ndarray  # float32, shape (n_buckets, 2): [mu_minus, mu_plus]
    count: int
    bucket_size: int

    @property
    def nbytes(self) -> int:
        return int(self.bits.nbytes + self.scales.nbytes)


def _as_vector(x: Vector, what: str) -> np.ndarray | torch.Tensor:
    """Check a 1-D contiguous float32 vector; CPU tensors become numpy views (shared memory)."""
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.float32 or x.dim() != 1 or not x.is_contiguous():
            raise CompressionError(f"{what} must be a contiguous 1-D float32 tensor")
        return x.detach().numpy() if x.device.type == "cpu" else x
    if isinstance(x, np.ndarray):
        if x.dtype != np.float32 or x.ndim != 1 or not x.flags.c_contiguous:
            raise CompressionError(f"{what} must be a contiguous 1-D float32 array")
        return x
    raise CompressionError(f"{what} must be a numpy array or torch tensor, not {type(x)}")


def _check_scales_finite(scales: np.ndarray) -> None:
    bad = ~np.isfinite(scales).all(axis=1)
    if bad.any():
        bucket = int(np.flatnonzero(bad)[0])
        raise NotFiniteError(f"cannot encode: bucket {bucket} holds a NaN or an infinity")


def _quantize_host(
    g: np.ndarray, bucket_size: int, state: np.ndarray | None, *, mirror: bool = False
) -> Encoded:
    """Encode ``v = g + state`` and set ``state <- v - q`` (error feedback); or, with ``mirror``,
    encode ``v = g - state`` and set ``state <- state + q`` (``ParameterMirror``: exactly the
    float32 add ``decode_into`` makes on the worker). No state: encode ``g``. The state is
    written only once every bucket encoded: on ``NotFiniteError`` it is untouched."""
    count = g.shape[0]
    bits = np.empty(bits_nbytes(count), dtype=np.uint8)  # every byte is written (padding: 0)
    scales = np.empty((num_buckets(count, bucket_size), 2), dtype=np.float32)
    # A NaN or an infinity in v is reported by _check_scales_finite, not as a numpy warning.
    with np.errstate(invalid="ignore"):
        kernels.host_encode(g, bucket_size, state, mirror=mirror, bits=bits, scales=scales)
    _check_scales_finite(scales)
    if state is not None:
        kernels.host_feedback(g, bucket_size, state, mirror=mirror, scales=scales)
    return Encoded(bits=bits, scales=scales, count=count, bucket_size=bucket_size)


def encode_mirror_update(params: np.ndarray, mirror: np.ndarray, bucket_size: int) -> Encoded:
    """``quantize(params - mirror)``, then ``mirror += q`` as ``decode_into`` adds it, in two
    passes: no full-size difference, no unpacking of the bits. For ``ParameterMirror``: float32
    1-D CPU arrays of one shape, ``mirror`` writable (refused otherwise)."""
    v = _as_vector(params, "params")
    m = _as_vector(mirror, "mirror")
    _check_sizes(v.shape[0], bucket_size)
    if not isinstance(v, np.ndarray) or not isinstance(m, np.ndarray) or m.shape != v.shape:
        raise CompressionError("params and mirror must be CPU vectors of one shape")
    if not m.flags.writeable:
        raise CompressionError("mirror must be writable")
    return _quantize_host(v, bucket_size, m, mirror=True)


def _quantize_torch(g: torch.Tensor, bucket_size: int, residual: torch.Tensor | None) -> Encoded:
    """Temporaries on g's device: v = g + r (float32), the sign mask, q (float32), full size."""
    v = g if residual is None else g + residual
    mask = v >= 0
    scales = kernels.torch_scales(v, mask, bucket_size)
    scales_host = scales.cpu().numpy()  # the only device->host copies: scales and bits
    _check_scales_finite(scales_host)
    bits = kernels.torch_pack_bits(mask).cpu().numpy()
    if residual is not None:
        kernels.torch_feedback(v, mask, scales, residual, bucket_size)
    return Encoded(bits=bits, scales=scales_host, count=g.numel(), bucket_size=bucket_size)


def quantize(g: Vector, bucket_size: int, *, residual: Vector | None = None) -> Encoded:
    """Encode ``v = g + residual`` (or ``g``) as 1 bit per element plus two scales per bucket.

    With ``residual`` given it is updated in place to ``v - q`` (error feedback) — but only
    after every bucket encoded: on ``CompressionError`` (a NaN or an infinity in ``v``) it is
    untouched. CPU inputs (numpy, or torch on the CPU) run chunked numpy kernels whose
    temporaries are chunk-sized; other torch devices run torch ops on that device with
    full-size temporaries there, and only the packed bits and the scales come to the host.
    """
    v = _as_vector(g, "g")
    _check_sizes(v.shape[0], bucket_size)
    r = None if residual is None else _as_vector(residual, "residual")
    if r is not None and (_placement(r) != _placement(v) or r.shape != v.shape):
        raise CompressionError(
            f"residual {tuple(r.shape)} on {_placement(r)} does not match "
            f"g {tuple(v.shape)} on {_placement(v)}"
        )
    if isinstance(v, np.ndarray):
        r_host = r if isinstance(r, np.ndarray) else None
        if r_host is not None and not r_host.flags.writeable:
            raise CompressionError("residual must be writable")
        return _quantize_host(v, bucket_size, r_host)
    return _quantize_torch(v, bucket_size, r if isinstance(r, torch.Tensor) else None)


def _placement(x: np.ndarray | torch.Tensor) -> str:
    return "cpu" if isinstance(x, np.ndarray) else str(x.device)


class ErrorFeedback:
    """The sender-side residual for one encoded stream (one shard slice, or one destination).

    ``encode(g)`` quantizes ``g + r`` and keeps ``r <- (g + r) - q``; with ``enabled=False`` it
    quantizes ``g`` and ``r`` stays 0. The residual lives on ``device`` (the worker's GPU, or
    the shard's CPU). A failed encode (NaN or infinity in ``g``) leaves ``r`` as it was.
    """

    def __init__(
        self,
        count: int,
        bucket_size: int,
        *,
        enabled: bool = True,
        device: torch.device | str = "cpu",
    ) -> None:
        _check_sizes(count, bucket_size)
        self.count = count
        self.bucket_size = bucket_size
        self.enabled = enabled
        self.residual = torch.zeros(count, dtype=torch.float32, device=device)

    def encode(self, g: Vector) -> Encoded:
        if g.shape != (self.count,):
            raise CompressionError(f"g has shape {tuple(g.shape)}, expected ({self.count},)")
        return quantize(g, self.bucket_size, residual=self.residual if self.enabled else None)

    def encode_range(self, g: Vector, start: int) -> Encoded:
        """Encode ``g`` as elements ``[start, start + len(g))`` of the stream, with that range
        of the residual: a part pushed while backward still runs (``sgdjob.overlap``). Its
        buckets start at ``start``, so parts cut at multiples of ``bucket_size`` encode to the
        bits and scales of one whole encode, and leave the same residual."""
        end = start + g.shape[0]
        if not 0 <= start <= end <= self.count:
            raise CompressionError(f"range [{start}, {end}) outside [0, {self.count})")
        residual = self.residual[start:end] if self.enabled else None
        return quantize(g, self.bucket_size, residual=residual)

    def rescale_lr(self, lr_prev: float, lr_now: float) -> None:
        """Keep the owed step ``lr * r`` fixed across a learning-rate change."""
        if not (math.isfinite(lr_prev) and math.isfinite(lr_now) and lr_prev > 0 and lr_now > 0):
            raise ValueError(f"learning rates must be finite and > 0: {lr_prev}, {lr_now}")
        if self.enabled and lr_prev != lr_now:
            self.residual.mul_(lr_prev / lr_now)

    def reset(self) -> None:
        """Forget the owed error (e.g. after the receiver restarted from a checkpoint)."""
        self.residual.zero_()


# ----------------------------------------------------------------------------- validate


def _byte_view(buf: Payload, what: str) -> memoryview:
    try:
        mv = memoryview(buf)  # type: ignore[arg-type]  # numpy's stubs predate Buffer
        # cast refuses non-C-contiguous views, and views with a zero in their shape.
        return mv.cast("B") if mv.nbytes else memoryview(b"")
    except (TypeError, ValueError) as exc:
        raise CompressionError(f"{what}: not a contiguous bytes-like buffer ({exc})") from None


def validate_payload(
    bits: Payload, scales: Payload, *, count: int, bucket_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Check an untrusted payload and return zero-copy views (uint8 bits, (n, 2) float32 scales).

    Checks: exact byte lengths for ``count`` and ``bucket_size``, zero padding bits, every scale
    finite, ``mu_minus <= 0 <= mu_plus``. Raises ``CompressionError`` naming the first problem.
    """
    _check_sizes(count, bucket_size)
    bits_mv, scales_mv = _byte_view(bits, "bits"), _byte_view(scales, "scales")
    want_bits, want_scales = bits_nbytes(count), scales_nbytes(count, bucket_size)
    if bits_mv.nbytes != want_bits:
        raise CompressionError(
            f"bits: {bits_mv.nbytes} bytes, expected {want_bits} for count={count}"
        )
    if scales_mv.nbytes != want_scales:
        raise CompressionError(
            f"scales: {scales_mv.nbytes} bytes, expected {want_scales} "
            f"(2 float32 x {num_buckets(count, bucket_size)} buckets)"
        )
    bits_arr = np.frombuffer(bits_mv, dtype=np.uint8)
    scales_arr = np.frombuffer(scales_mv, dtype=_SCALES_DTYPE).reshape(-1, 2)
    spare = (-count) % 8
    if spare and bits_arr[-1] >> (8 - spare):
        raise CompressionError(f"bits: the {spare} padding bits after element {count} are set")
    finite = np.isfinite(scales_arr)
    if not finite.all():
        bucket, side = np.argwhere(~finite)[0]
        raise NotFiniteError(
            f"scales: bucket {bucket} {('mu_minus', 'mu_plus')[side]} is "
            f"{float(scales_arr[bucket, side])}, not finite"
        )
    if (scales_arr[:, 0] > 0).any() or (scales_arr[:, 1] < 0).any():
        bucket = int(np.flatnonzero((scales_arr[:, 0] > 0) | (scales_arr[:, 1] < 0))[0])
        raise CompressionError(
            f"scales: bucket {bucket} has mu_minus={float(scales_arr[bucket, 0])}, "
            f"mu_plus={float(scales_arr[bucket, 1])}; need mu_minus <= 0 <= mu_plus"
        )
    return bits_arr, scales_arr


# ----------------------------------------------------------------------------- decode


def decode_into(
    acc: Vector,
    bits: Payload,
    scales: Payload,
    *,
    count: int,
    bucket_size: int,
    alpha: float = 1.0,
) -> None:
    """Validate a payload, then ``acc += alpha * q`` in place.

    ``acc`` is a writable, contiguous, 1-D float32 numpy array or torch tensor (any device) of
    ``count`` elements, typically a view of a shard's accumulator or a worker's parameters. On
    any ``CompressionError`` ``acc`` is untouched: everything is checked before the first write.

    Allocations: ``alpha * scales`` (n_buckets x 2 float32); then, per run of whole buckets
    (about 512 K elements on the CPU, 4 M on an accelerator), the unpacked bits (1 byte per
    element) and the reconstructed ``alpha * q`` (float32). No full-size temporary. For a torch
    ``acc`` on an accelerator, bits and scales are first copied to that device (1/28 of fp32).
    """
    bits_arr, scales_arr = validate_payload(bits, scales, count=count, bucket_size=bucket_size)
    if not math.isfinite(alpha):
        raise CompressionError(f"alpha must be finite, got {alpha!r}")
    if isinstance(acc, torch.Tensor) and acc.device.type == "cpu":
        acc = acc.detach().numpy()  # shares memory: the numpy kernels are the CPU path
    with np.errstate(over="ignore"):
        # float64 product, rounded once to float32; exact for alpha = 1 and powers of two.
        scaled = (scales_arr * alpha).astype(np.float32)
    if not np.isfinite(scaled).all():
        raise CompressionError(f"alpha={alpha!r} times a scale overflows float32")
    if isinstance(acc, np.ndarray):
        ok = acc.dtype == np.float32 and acc.ndim == 1 and acc.flags.c_contiguous
        if not ok or not acc.flags.writeable or acc.shape[0] != count:
            raise CompressionError(
                f"acc must be a writable contiguous 1-D float32 array of {count} elements"
            )
        kernels.host_decode(acc, bits_arr, scaled, bucket_size)
        return
    if not isinstance(acc, torch.Tensor):
        raise CompressionError(f"acc must be a numpy array or torch tensor, not {type(acc)}")
    if acc.dtype != torch.float32 or acc.dim() != 1 or not acc.is_contiguous():
        raise CompressionError("acc must be a contiguous 1-D float32 tensor")
    if acc.numel() != count:
        raise CompressionError(f"acc has {acc.numel()} elements, payload has {count}")
    # copy: socket buffers are read-only, and torch wants writable memory to wrap.
    bits_t = torch.from_numpy(bits_arr.copy()).to(acc.device)
    kernels.torch_decode(acc, bits_t, torch.from_numpy(scaled).to(acc.device), bucket_size)
