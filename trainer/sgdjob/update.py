"""The update rule a shard applies to its slice: SGD with momentum and weight decay.

Semantics match ``torch.optim.SGD`` (dampening 0, no Nesterov): ``g += wd * p``,
``buf = momentum * buf + g``, ``p -= lr * buf``, where ``lr`` may be a scalar or a
per-element array. ``scale`` multiplies the gradient before momentum (the staleness rules'
factor: the learning rate of that one gradient). Operates in place on numpy float32 views
so a shard can update one received frame's sub-range at a time with no extra copies.
"""

from __future__ import annotations

import numpy as np


class MomentumSGD:
    """Optimizer state for one contiguous slice: the momentum buffer and a scratch area."""

    def __init__(self, count: int, *, momentum: float, weight_decay: float) -> None:
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.buf = np.zeros(count, dtype=np.float32)
        self._scratch = np.empty(count, dtype=np.float32)

    def apply(
        self,
        params: np.ndarray,
        grad: np.ndarray,
        *,
        lr: float,
        scale: float | np.ndarray = 1.0,
        start: int = 0,
    ) -> None:
        """Update ``params`` (the slice's sub-range beginning at ``start``) with ``grad``."""
        n = grad.shape[0]
        buf = self.buf[start : start + n]
        tmp = self._scratch[start : start + n]
        g: np.ndarray = grad
        if not (isinstance(scale, float) and scale == 1.0):
            np.multiply(grad, scale, out=tmp)
            g = tmp
        if self.weight_decay:
            if g is tmp:
                tmp += self.weight_decay * params
            else:
                np.multiply(params, self.weight_decay, out=tmp)
                tmp += g
            g = tmp
        if self.momentum:
            buf *= self.momentum
            buf += g
            g = buf
        np.multiply(g, lr, out=tmp)
        params -= tmp
