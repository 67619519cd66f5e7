"""CPU cost of a benchmark run: user + sys seconds of every process it started, per sample.

A run's CPU is the growth of this process's ``RUSAGE_CHILDREN`` (``children_cpu_s``) across
it: the kernel adds a child's user and system time, and that of every descendant the child
itself waited for, when the child is reaped. The benches start each run's processes as
children and wait for all of them (``bench.ddp.run_ranks``, ``bench.jobrun``, which runs a
whole sgdjob job, executor and its polling thread included, in a child process), and they run
one thing at a time, so the growth is exactly that run's processes.

Start-up (interpreter and torch import, data loading, connecting, the final evaluation and
model write) costs the same however long a run trains; ``cpu_per_1000`` cancels it by running
the same system twice, ``short`` and ``long`` steps with everything else equal, and dividing
the difference in CPU by the difference in samples.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds of every process of one run, and the training samples it processed."""

    cpu_s: float
    samples: int


def children_cpu_s() -> float:
    """User + system seconds of this process's reaped children (and their reaped children)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measured(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()`` and the CPU seconds of the children it started and reaped meanwhile."""
    before = children_cpu_s()
    result = fn()
    return result, children_cpu_s() - before


def cpu_per_1000(short: CpuSample, long: CpuSample) -> float:
    """CPU seconds per 1,000 samples of the extra training ``long`` did over ``short``.

    Not clamped: a negative value means noise exceeded the difference (use longer runs).
    """
    if long.samples <= short.samples:
        raise ValueError(
            f"long run has {long.samples} samples, not more than the short run's {short.samples}"
        )
    return 1000.0 * (long.cpu_s - short.cpu_s) / (long.samples - short.samples)
