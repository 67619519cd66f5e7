"""Pushing the gradient in buckets while backward still runs (``spec.training.bucketMB``).

Buckets are contiguous ranges of the flat gradient (``sgdjob.models.flat``) made of whole
parameters, cut in reverse parameter order (the order backward produces them), each at most
``bucketMB`` MiB; a parameter larger than that is a bucket of its own. A post-accumulate-grad
hook on every parameter counts the parameters of its bucket that are done; when the last one
is, the bucket's part in each shard's slice is pushed at once (zero-copy, ``ShardClient
.push_range``), so the shards sum it while the worker still computes the rest. The buffers'
change (elements past the parameters) is known after forward and goes first. After backward,
buckets whose hooks did not all fire (a parameter unused in this step: its gradient stays
zero) are pushed, so a step never waits for them.

Where a bucket's bytes are not final when its hook fires, the worker pushes after backward
instead (``fallback_reason``): clipping needs the norm of the whole gradient, fp16 loss
scaling unscales (or zeroes on overflow) all of it, 1-bit compression encodes each slice with
its error feedback in one piece, and downpour accumulates locally.

On CUDA the hooks run on the autograd engine's device thread while the main thread waits in
``backward()``; each bucket is copied to the pinned host buffer (synchronously) there before
it is sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from sgdjob.api.types import SGDJobSpec
from sgdjob.client import ShardClient
from sgdjob.models import FlatModel
from sgdjob.precision import Precision

log = logging.getLogger("sgdjob.worker")

MIB = 1 << 20


def fallback_reason(spec: SGDJobSpec, precision: Precision) -> str | None:
    """Why this job pushes after backward, or None when it overlaps."""
    t = spec.training
    if t.bucket_mb == 0:
        return "training.bucketMB is 0"
    if t.mode == "downpour":
        return "downpour accumulates gradients locally"
    if spec.compression.kind == "onebit":
        return "1-bit compression encodes each slice whole"
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


class OverlapPusher:
    """Hooks that push each finished bucket of one step; ``arm`` before the step."""

    def __init__(
        self,
        flat: FlatModel,
        client: ShardClient,
        *,
        host_grads: torch.Tensor,
        bucket_mb: float,
    ) -> None:
        self.flat = flat
        self.client = client
        self.host_grads = host_grads  # flat.grads itself on CPU; pinned host memory on CUDA
        self.cuda = flat.grads.is_cuda
        params = flat.trainable_params
        self.buckets = build_buckets(
            [p.numel() for p in params], cap_bytes=max(4, int(bucket_mb * MIB))
        )
        self.bucket_of = [0] * len(params)
        for b, (_, _, members) in enumerate(self.buckets):
            for i in members:
                self.bucket_of[i] = b
        self.left: list[int] = []
        self.seen: list[bool] = []
        self.sent: list[int] = []  # bucket indices in the order they went out (tests read it)
        self.versions: list[int] | None = None
        self.step = 0
        self.handles = [
            p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(params)
        ]

    def arm(self, *, versions: list[int], step: int) -> None:
        self.versions, self.step = versions, step
        self.left = [len(m) for _, _, m in self.buckets]
        self.seen = [False] * len(self.bucket_of)
        self.sent = []

    def forward_done(self) -> None:
        """The buffers' change is in the gradient's tail: push it before backward."""
        if self.flat.size > self.flat.trainable:
            self._send(self.flat.trainable, self.flat.size)

    def backward_done(self) -> None:
        """Push the buckets whose parameters got no gradient this step; disarm."""
        for b, left in enumerate(self.left):
            if left:
                self.left[b] = 0
                self._push_bucket(b)
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
                self._push_bucket(b)

        return hook

    def _push_bucket(self, b: int) -> None:
        start, end, _ = self.buckets[b]
        self.sent.append(b)
        self._send(start, end)

    def _send(self, start: int, end: int) -> None:
        assert self.versions is not None
        if self.cuda:
            self.host_grads[start:end].copy_(self.flat.grads[start:end])
        self.client.push_range(
            self.host_grads.numpy(), start, end, versions=self.versions, step=self.step
        )
