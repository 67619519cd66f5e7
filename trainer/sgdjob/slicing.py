"""Partition of the flat parameter vector into contiguous per-shard slices.

Shard k owns ``[offset_k, offset_k + count_k)``; counts differ by at most one element and the
slices tile the vector exactly once, in shard order.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Slice:
    """One shard's contiguous range of the flat vector."""

    shard: int
    offset: int
    count: int

    @property
    def end(self) -> int:
        return self.offset + self.count


def partition(total: int, shards: int) -> list[Slice]:
    """Cut ``total`` elements into ``shards`` contiguous slices balanced to the element."""
    if total < 0:
        raise ValueError(f"total must be >= 0, not {total}")
    if shards < 1:
        raise ValueError(f"shards must be >= 1, not {shards}")
    base, extra = divmod(total, shards)
    out: list[Slice] = []
    offset = 0
    for k in range(shards):
        count = base + (1 if k < extra else 0)
        out.append(Slice(shard=k, offset=offset, count=count))
        offset += count
    return out
