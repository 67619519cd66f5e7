"""Staleness-aware learning-rate rules for asynchronous SGD.

The staleness tau of a gradient is the shard's version when the gradient arrives minus the
version the worker computed it on. A rule returns a factor that scales that gradient before it
enters the momentum buffer (equivalently: the learning rate of that one gradient).

- ``none``: factor 1 (Dean et al. 2012, plain AsyncSGD).
- ``zhang``: factor 1 / max(1, tau) (Zhang, Gupta, Lian, Liu, "Staleness-aware Async-SGD for
  Distributed Deep Learning", IJCAI 2016 / arXiv:1511.05950, 2015).
- ``odena``: Odena, "Faster Asynchronous SGD", arXiv:1601.04033 (2016). The paper's equations
  are inconsistent with each other; we follow its reference code instead: per parameter, a
  running mean of the gradient magnitude ``m <- 0.9 * m + 0.1 * |g|`` (updated with the
  arriving gradient first), and the step ``alpha * g / (c * (tau + 1) * (m + 1e-3))``. So the
  factor per element is ``1 / (c * (tau + 1) * (m + 1e-3))``, with ``c`` =
  ``spec.training.odenaScale``.
"""

from __future__ import annotations

import numpy as np

ODENA_DECAY = 0.9
ODENA_EPS = 1e-3


def zhang_factor(tau: int) -> float:
    return 1.0 / max(1, tau)


class OdenaState:
    """Per-parameter running mean of |g| for one shard's slice."""

    def __init__(self, count: int, *, c: float) -> None:
        self.c = float(c)
        self.mean_abs = np.zeros(count, dtype=np.float32)

    def factor(self, grad: np.ndarray, *, tau: int, start: int = 0) -> np.ndarray:
        m = self.mean_abs[start : start + grad.shape[0]]
        m *= ODENA_DECAY
        m += (1.0 - ODENA_DECAY) * np.abs(grad)
        return (1.0 / (self.c * (tau + 1) * (m + ODENA_EPS))).astype(np.float32)


class StalenessRule:
    """The rule named by ``spec.training.staleness`` for one slice."""

    def __init__(self, name: str, *, count: int, odena_scale: float) -> None:
        if name not in ("none", "zhang", "odena"):
            raise ValueError(f"unknown staleness rule {name!r}")
        self.name = name
        self.odena = OdenaState(count, c=odena_scale) if name == "odena" else None

    def factor(self, grad: np.ndarray, *, tau: int, start: int = 0) -> float | np.ndarray:
        if self.name == "zhang":
            return zhang_factor(tau)
        if self.odena is not None:
            return self.odena.factor(grad, tau=tau, start=start)
        return 1.0
