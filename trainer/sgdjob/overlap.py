"""Pushing the gradient in parts while backward still runs (``spec.training.bucketMB``).

Buckets are contiguous ranges of the flat gradient (``sgdjob.models.flat``) made of whole
parameters, cut in reverse parameter order (the order backward produces them), each at most
``bucketMB`` MiB; a parameter larger than that is a bucket of its own. A post-accumulate-grad
hook on every parameter counts the parameters of its bucket that are done.

What goes on the wire are *units* (``plan_units``): the buckets cut at the shards' slice
boundaries, each pushed to its shard (``ShardClient.push_part``) once every bucket it touches
is done, so the shards sum it while the worker still computes the rest. In a 1-bit job a
unit's cuts are moved up to the next multiple of the codec's ``bucketSize`` from its slice's
start, so the units of a slice encode to exactly the bits and scales of one whole-slice
encode (and leave the same error-feedback residual): a unit may then wait for the few
elements of the next bucket, which backward, running backwards, has usually finished first.
The buffers' change (elements past the parameters) is known after forward and goes first.
After backward, buckets whose hooks did not all fire (a parameter unused in this step: its
gradient stays zero) count as done, so a step never waits for them.

Where a bucket's bytes are not final when its hook fires, the worker pushes after backward
instead (``fallback_reason``): clipping needs the norm of the whole gradient, fp16 loss
scaling unscales (or zeroes on overflow) all of it, ``compression.send: updates`` runs the
optimizer over the whole gradient first, and downpour accumulates locally.

On CUDA the hooks run on the autograd engine's device thread while the main thread waits in
``backward()``. A float32 unit is copied to the pinned host buffer (synchronously) there
before it is sent; a 1-bit unit is encoded on the device, and only its bits and scales come
to the host.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sgdjob.api.types import SGDJobSpec
from sgdjob.client import ShardClient
from sgdjob.models import FlatModel
from sgdjob.precision import Precision
from sgdjob.slicing import Slice

log = logging.getLogger("sgdjob.worker")

MIB = 1 << 20


def fallback_reason(spec: SGDJobSpec, precision: Precision) -> str | None:
    """Why this job pushes after backward, or None when it overlaps."""
    t = spec.training
    if t.bucket_mb == 0:
        return "training.bucketMB is 0"
    if t.mode == "downpour":
        return "downpour accumulates gradients locally"
    if spec.compression.kind == "onebit" and spec.compression.send == "updates":
        return "compression.send: updates runs the optimizer over the whole gradient"
    if t.grad_clip_norm is not None:
        return "training.gradClipNorm needs the whole gradient's norm"
    if precision.scaler is not None:
        return "fp16 loss scaling unscales the whole gradient"
    return None


def build_buckets(sizes: list[int], *, cap_bytes: int) -> list[tuple[int, int, list[int]]]:
    """Buckets over parameters laid out back to back with these element counts, last
    parameter first: (start, end, parameter indices), each at most ``cap_bytes`` of float32
    unless one parameter alone is larger."""
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    buckets: list[tuple[int, int, list[int]]] = []
    end, members = offsets[-1], list[int]()
    for i in reversed(range(len(sizes))):
        if members and (end - offsets[i]) * 4 > cap_bytes:
            buckets.append((offsets[members[-1]], end, members))
            end, members = offsets[members[-1]], []
        members.append(i)
    if members:
        buckets.append((offsets[members[-1]], end, members))
    return buckets


@dataclass(frozen=True)
class Unit:
    """One push of a step: elements ``[start, end)`` (of the whole vector) of shard
    ``shard``'s slice, sent once every bucket in ``needs`` is done; with no ``needs``, the
    buffers' change, sent after forward."""

    shard: int
    start: int
    end: int
    needs: tuple[int, ...]


def plan_units(
    buckets: Sequence[tuple[int, int, list[int]]],
    slices: Sequence[Slice],
    *,
    trainable: int,
    align: int | None,
) -> list[Unit]:
    """The units of a step, shard by shard in slice order: the buckets' boundaries cut each
    slice's trainable part, moved up to a multiple of ``align`` from the slice's start when
    ``align`` is set (1-bit); then the slice's buffer elements, if any, as one unit."""
    bounds = sorted({c for start, end, _ in buckets for c in (start, end)})
    units: list[Unit] = []
    for k, s in enumerate(slices):
        lo, hi = s.offset, min(s.end, trainable)
        inner = [c for c in bounds if lo < c < hi]
        if align is not None:
            inner = [min(hi, lo + -(-(c - lo) // align) * align) for c in inner]
        cuts = sorted({lo, hi, *inner}) if lo < hi else []
        for a, e in itertools.pairwise(cuts):
            needs = tuple(i for i, (bs, be, _) in enumerate(buckets) if bs < e and a < be)
            units.append(Unit(k, a, e, needs))
        if max(s.offset, trainable) < s.end:
            units.append(Unit(k, max(s.offset, trainable), s.end, ()))
    return units


class OverlapPusher:
    """Hooks that push each finished unit of one step; ``arm`` before the step."""

    def __init__(
        self,
        flat: FlatModel,
        client: ShardClient,
        *,
        host_grads: torch.Tensor,
        bucket_mb: float,
        align: int | None = None,
    ) -> None:
        """``align``: the 1-bit codec's bucket size in a 1-bit job (units are then encoded on
        the gradient's device), None for float32 pushes from ``host_grads``."""
        self.flat = flat
        self.client = client
        self.host_grads = host_grads  # flat.grads itself on CPU; pinned host memory on CUDA
        self.cuda = flat.grads.is_cuda
        self.align = align
        params = flat.trainable_params
        self.buckets = build_buckets(
            [p.numel() for p in params], cap_bytes=max(4, int(bucket_mb * MIB))
        )
        self.bucket_of = [0] * len(params)
        for b, (_, _, members) in enumerate(self.buckets):
            for i in members:
                self.bucket_of[i] = b
        self.units: list[Unit] = []  # planned at the first arm: the slices come with WELCOME
        self.units_of: list[list[int]] = []  # bucket -> the units that need it
        self.left: list[int] = []
        self.waiting: list[int] = []  # unit -> buckets it still needs
        self.seen: list[bool] = []
        self.sent: list[int] = []  # bucket indices in the order they were done (tests read it)
        self.versions: list[int] | None = None
        self.step = 0
        self.handles = [
            p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(params)
        ]

    def arm(self, *, versions: list[int], step: int) -> None:
        if not self.units:
            self.units = plan_units(
                self.buckets, self.client.slices, trainable=self.flat.trainable, align=self.align
            )
            self.units_of = [[] for _ in self.buckets]
            for u, unit in enumerate(self.units):
                for b in unit.needs:
                    self.units_of[b].append(u)
        self.versions, self.step = versions, step
        self.left = [len(m) for _, _, m in self.buckets]
        self.waiting = [len(unit.needs) for unit in self.units]
        self.seen = [False] * len(self.bucket_of)
        self.sent = []

    def forward_done(self) -> None:
        """The buffers' change is in the gradient's tail: push it before backward."""
        for unit in self.units:
            if not unit.needs:
                self._send(unit)

    def backward_done(self) -> None:
        """Push the buckets whose parameters got no gradient this step; disarm."""
        for b, left in enumerate(self.left):
            if left:
                self.left[b] = 0
                self._bucket_done(b)
        self.versions = None

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def _hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def hook(_: torch.Tensor) -> None:
            if self.versions is None:
                return  # not a training step of ours (no overlap armed)
            if self.seen[i]:
                # Its bucket may be on the wire already: a second accumulation would be lost.
                raise RuntimeError("a parameter's gradient was accumulated twice in one step")
            self.seen[i] = True
            b = self.bucket_of[i]
            self.left[b] -= 1
            if self.left[b] == 0:
                self._bucket_done(b)

        return hook

    def _bucket_done(self, b: int) -> None:
        self.sent.append(b)
        for u in self.units_of[b]:
            self.waiting[u] -= 1
            if self.waiting[u] == 0:
                self._send(self.units[u])

    def _send(self, unit: Unit) -> None:
        assert self.versions is not None
        grads: torch.Tensor | np.ndarray
        if self.align is not None:
            grads = self.flat.grads  # encoded where it is: only bits and scales leave a GPU
        else:
            if self.cuda:
                self.host_grads[unit.start : unit.end].copy_(self.flat.grads[unit.start : unit.end])
            grads = self.host_grads.numpy()
        self.client.push_part(
            grads,
            unit.shard,
            unit.start,
            unit.end,
            version=self.versions[unit.shard],
            step=self.step,
        )
