"""The flat-buffer view of a model: parameters, gradients and buffers in two float32 vectors.

``FlatModel`` rebinds every trainable parameter and its gradient as views into two
contiguous float32 vectors, so backward() writes gradients straight into the buffer that goes
on the wire and received parameters are copied once into place: no per-tensor messages, no
flatten copies.

Non-trainable buffers (BatchNorm running statistics and batch counters, any registered
buffer) travel in the same vectors, after the parameters: elements ``[trainable, size)``.
The rule that keeps them consistent across workers: **the shards average them**. After each
forward pass a worker writes, in the buffer range of its gradient, how far its own buffers
moved from the values it pulled (``buffer_deltas``); a shard adds the mean of those deltas
(sync) or each delta as it arrives (async) to the values it holds, with no learning rate,
momentum or weight decay (``sgdjob.optim``). In sync mode that makes the shards' value the
mean of the workers' updated buffers, i.e. running statistics over all workers' batches,
as one large-batch BatchNorm would keep them; every worker loads them at each pull
(``load_buffers``), so all workers evaluate and the final ``model.pt`` is saved with the same
values. Averaging was chosen over "take worker 0's" because it uses every worker's batches
and needs no special role: a lost worker 0 loses nothing, and async modes work unchanged.
Integer buffers travel as float32 (exact up to 2**24) and are rounded back.

The rule is the same with 1-bit compression: there only the trainable elements are
sign-quantised, and the buffer range travels as float32 both ways (``sgdjob.onebit_wire``),
since a quantised change could drive a running variance below zero (BatchNorm then yields NaN)
and error feedback has no business in statistics the workers must load exactly.
"""

from __future__ import annotations

import torch
from torch import nn


class FlatModel:
    """A model whose parameters, gradients and buffers live in two flat float32 vectors."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model.to(device=device)
        for p in self.model.parameters():  # float32 master weights; autocast does the rest
            p.data = p.data.float()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable_params = params  # in flat order: params[i] sits before params[i + 1]
        self.buffers = [b for _, b in self.model.named_buffers() if b.numel() > 0]
        trainable = sum(p.numel() for p in params)
        total = trainable + sum(b.numel() for b in self.buffers)
        self.params = torch.empty(total, dtype=torch.float32, device=device)
        self.grads = torch.zeros(total, dtype=torch.float32, device=device)
        self.grads_zero = True  # backward may accumulate into the parameter gradients
        offset = 0
        for p in params:
            n = p.numel()
            self.params[offset : offset + n].copy_(p.detach().reshape(-1))
            p.data = self.params[offset : offset + n].view_as(p)
            p.grad = self.grads[offset : offset + n].view_as(p)
            offset += n
        self.trainable = trainable
        self.size = total
        self._buffer_ranges: list[tuple[int, int]] = []
        for b in self.buffers:
            n = b.numel()
            self.params[offset : offset + n].copy_(b.detach().reshape(-1).float())
            self._buffer_ranges.append((offset, n))
            offset += n

    @property
    def param_grads(self) -> torch.Tensor:
        return self.grads[: self.trainable]

    def zero_grad(self) -> None:
        """Zero the parameters' gradients (autograd adds into them). The buffer range needs
        none: ``buffer_deltas`` overwrites all of it."""
        self.grads[: self.trainable].zero_()
        self.grads_zero = True

    def ensure_zero_grad(self) -> None:
        if not self.grads_zero:
            self.zero_grad()

    def load_buffers(self) -> None:
        """Set the module's buffers to the values in the parameter vector (after a pull)."""
        with torch.no_grad():
            for b, (off, n) in zip(self.buffers, self._buffer_ranges, strict=True):
                src = self.params[off : off + n].view_as(b)
                b.copy_(src.round() if not b.dtype.is_floating_point else src)

    def buffer_deltas(self) -> None:
        """Write (own buffers - pulled buffers) into the buffer range of the gradient."""
        with torch.no_grad():
            for b, (off, n) in zip(self.buffers, self._buffer_ranges, strict=True):
                torch.sub(
                    b.reshape(-1).float(), self.params[off : off + n], out=self.grads[off : off + n]
                )

    def local_step(self, lr: float) -> None:
        """Downpour's step between fetches: plain SGD on parameters, own buffers adopted."""
        with torch.no_grad():
            self.params[: self.trainable].sub_(self.grads[: self.trainable], alpha=lr)
            self.params[self.trainable :].add_(self.grads[self.trainable :])
