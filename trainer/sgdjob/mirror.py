"""Server-to-worker compression: a shard's exact copy of what one worker holds of its slice.

With ``compression.serverToWorker`` a shard answers a pull with the 1-bit encoding of the
*update* ``params - mirror`` instead of the parameters, where ``mirror`` is what that worker
reconstructed so far. After encoding, the shard applies the same ``decode_into`` the worker
applies, so the mirror stays bit-identical to the worker's copy (float32 adds round the same
on every IEEE device). This is error feedback with the residual kept implicitly: the residual
is ``params - mirror``, and the next update carries it (Seide et al. 2014, applied downstream).
One ``ParameterMirror`` per shard slice and distinct state of the workers (``sgdjob.downlink``
shares one between workers that hold the same parameters); it costs one float32 copy of the
slice.

Worker side: ``decode_into(params_slice, bits, scales, count=..., bucket_size=...)``.
A worker that (re)joins gets full-precision parameters, and a new mirror of them.
"""

from __future__ import annotations

import numpy as np

from sgdjob.compression import (
    CompressionError,
    Encoded,
    decode_into,
    encode_mirror_update,
    quantize,
)


class ParameterMirror:
    """The shard's copy of one worker's reconstruction of one parameter slice."""

    def __init__(self, params: np.ndarray, bucket_size: int) -> None:
        self.bucket_size = bucket_size
        self.mirror = np.array(params, dtype=np.float32, copy=True)
        if self.mirror.ndim != 1:
            raise CompressionError("params must be a 1-D slice")

    def encode_update(self, params: np.ndarray) -> Encoded:
        """Encode ``params - mirror`` and advance the mirror by exactly what the worker adds."""
        if params.shape != self.mirror.shape:
            raise CompressionError(f"params shape {params.shape} != {self.mirror.shape}")
        if params.dtype == np.float32 and params.flags.c_contiguous:
            # One fused kernel: the same float32 subtraction, encoding and float32 add as below,
            # chunk by chunk, with no full-size difference and no unpacking of the bits.
            return encode_mirror_update(params, self.mirror, self.bucket_size)
        delta = np.subtract(params, self.mirror, out=np.empty_like(self.mirror))
        enc = quantize(delta, self.bucket_size)
        decode_into(
            self.mirror, enc.bits, enc.scales, count=enc.count, bucket_size=self.bucket_size
        )
        return enc
