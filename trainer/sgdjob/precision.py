"""Mixed precision for a worker's forward and backward: autocast and a dynamic loss scaler.

``training.precision``: ``float32`` (no autocast), ``bf16`` or ``fp16`` autocast on the
worker's device (CUDA; the CPU autocast path runs too, which is how it is tested here). The
master weights, the gradients on the wire and everything on the shards stay float32.

fp16 gradients underflow, so ``fp16`` multiplies the loss by a scale before backward and
divides the gradients by it after, as ``torch.amp.GradScaler`` does with its defaults
(initial 2**16, x2 after 2000 finite steps, x0.5 on an overflow). A step whose scaled
gradients overflowed pushes a zero gradient (the shards reject non-finite values, and a sync
step needs every worker's push), and the scale backs off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class LossScaler:
    def __init__(
        self,
        *,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        self.scale = init_scale
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval = growth_interval
        self.good_steps = 0
        self.skipped = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def unscale_(self, grads: torch.Tensor) -> bool:
        """Divide ``grads`` by the scale in place; False (and zeroed) if any was not finite."""
        grads.mul_(1.0 / self.scale)
        if not bool(torch.isfinite(grads).all()):
            grads.zero_()
            self.scale *= self.backoff_factor
            self.good_steps = 0
            self.skipped += 1
            return False
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0
        return True


class Precision:
    """The autocast context and, for fp16, the loss scaler of one worker."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.name = name
        self.dtype = DTYPES.get(name)
        self.device_type = device.type
        self.scaler = LossScaler() if name == "fp16" else None

    @property
    def autocast(self) -> Callable[[], AbstractContextManager[object]]:
        if self.dtype is None:
            return contextlib.nullcontext
        dtype, device_type = self.dtype, self.device_type
        return lambda: torch.autocast(device_type=device_type, dtype=dtype)


def clip_grad_norm_(grads: torch.Tensor, max_norm: float) -> float:
    """Scale ``grads`` to global L2 norm <= max_norm (torch.nn.utils.clip_grad_norm_'s rule)."""
    norm = float(torch.linalg.vector_norm(grads))
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        grads.mul_(coef)
    return norm
