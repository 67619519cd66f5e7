"""Sync mode's open step on a shard: the gradients kept for the current version, and their sum.

``PendingStep`` holds, per worker, the frames of its push for the version the shard is at
(zero-copy, as received; 1-bit frames are 1/32 of the slice) until the step closes, and then
sums them into the shard's accumulator in worker order, so a fixed-seed run is reproducible
bit for bit. ``sgdjob.shard`` decides when a step closes (``Shard._needed``) and applies it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import zmq

from sgdjob.compression import decode_into
from sgdjob.transport import frame_array


class PendingStep:
    """The pushes kept for the open sync step, by worker."""

    def __init__(self, *, count: int, onebit: bool, bucket_size: int) -> None:
        self.count = count
        self.onebit = onebit
        self.bucket_size = bucket_size
        self._frames: dict[int, list[zmq.Frame]] = {}

    def __contains__(self, worker: object) -> bool:
        return worker in self._frames

    def __iter__(self) -> Iterator[int]:
        return iter(self._frames)

    def __len__(self) -> int:
        return len(self._frames)

    def add(self, worker: int, frames: list[zmq.Frame]) -> None:
        """Keep a validated push of the whole slice from ``worker``."""
        self._frames[worker] = frames

    def clear(self) -> None:
        self._frames.clear()

    def sum_into(self, acc: np.ndarray) -> int:
        """Write the sum of the kept gradients (worker order) into ``acc``; how many."""
        if self.onebit:
            acc.fill(0.0)
            for worker in sorted(self._frames):
                bits, scales = self._frames[worker]
                decode_into(
                    acc, bits.buffer, scales.buffer, count=self.count, bucket_size=self.bucket_size
                )
            return len(self._frames)
        for n, worker in enumerate(sorted(self._frames)):
            start = 0
            for frame in self._frames[worker]:
                g = frame_array(frame)
                dst = acc[start : start + g.shape[0]]
                if n == 0:
                    np.copyto(dst, g)
                else:
                    dst += g
                start += g.shape[0]
        return len(self._frames)
