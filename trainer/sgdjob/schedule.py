"""Learning-rate schedules, as closed forms of torch's schedulers, in (fractional) steps.

``lr_at(t)`` for worker step ``t`` of ``total`` (0-based, before the update of step t):

- warmup (``warmupSteps`` w > 0): torch's ``LinearLR(start_factor=s, total_iters=w)``,
  ``lr * (s + (1 - s) * t / w)`` for t < w; the schedule below then runs from t - w;
- ``constant``: ``lr``;
- ``step``: ``StepLR``: ``lr * gamma ** floor(t / stepSize)``;
- ``cosine``: ``CosineAnnealingLR(T_max = total - w, eta_min = minLr)``:
  ``minLr + (lr - minLr) * (1 + cos(pi * t / T_max)) / 2``.

torch chains them with ``SequentialLR``; the tests check these values against torch's.
In the async modes a shard applies one update per gradient; it maps its version to the
equivalent worker step (version x steps / total updates) so the schedule spans the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sgdjob.api.workloads import ScheduleSpec


@dataclass(frozen=True)
class Schedule:
    lr: float
    spec: ScheduleSpec

    def lr_at(self, t: float, *, total_steps: int) -> float:
        s, w = self.spec, self.spec.warmup_steps
        if t < w:
            return self.lr * (s.warmup_start_factor + (1 - s.warmup_start_factor) * t / w)
        t -= w
        if s.kind == "step":
            return self.lr * s.gamma ** math.floor(t / s.step_size)
        if s.kind == "cosine":
            span = max(1, total_steps - w)
            t = min(t, span)
            return s.min_lr + (self.lr - s.min_lr) * (1 + math.cos(math.pi * t / span)) / 2
        return self.lr


def equivalent_step(
    version: int, *, mode: str, total_steps: int | None, workers: int, push_every: int
) -> float:
    """The worker step a shard at ``version`` stands for (sync: the version itself)."""
    if mode == "sync" or not total_steps:
        return float(version)
    pushes_per_worker = -(-total_steps // push_every) if mode == "downpour" else total_steps
    return version * total_steps / max(1, pushes_per_worker * workers)
