"""Bytes a benchmark run moved over the loopback interface, per training step.

The figure is the growth of the kernel's transmit counter of ``lo``
(``/sys/class/net/lo/statistics/tx_bytes``) across a run. Every byte one process on this host
sends to another over 127.0.0.1 (ZeroMQ over TCP, gloo's TCP pairs, the executor's HTTP
polling) is counted once, when it is sent. Like ``bench.cpu``'s figure it does not move with
machine load: it shows what an architecture has to carry, not how fast this host carries it.

It counts the whole host, so it is right only while nothing else talks over loopback, which is
how the benches run (one system at a time). Start-up traffic (hello, the first and last pulls,
the final evaluation's) cancels as in ``bench.cpu``: ``mb_per_step`` takes a short and a long
run of the same system and divides the difference in bytes by the difference in steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LO_TX_BYTES = Path("/sys/class/net/lo/statistics/tx_bytes")


@dataclass(frozen=True)
class LoopbackSample:
    """Bytes sent over loopback during one run, and the training steps it took."""

    tx_bytes: int
    steps: int


def tx_bytes(counter: Path = LO_TX_BYTES) -> int | None:
    """The loopback transmit counter now; None where the host does not expose it (no sysfs,
    another network namespace layout), so a bench prints no figure instead of a wrong one."""
    try:
        return int(counter.read_text(encoding="ascii"))
    except (OSError, ValueError):
        return None


def mb_per_step(short: LoopbackSample, long: LoopbackSample) -> float:
    """Megabytes (1e6 bytes) over loopback per step of the extra steps ``long`` ran.

    Not clamped, as ``bench.cpu.cpu_per_1000``: a negative value means other traffic on the
    host exceeded the difference.
    """
    if long.steps <= short.steps:
        raise ValueError(
            f"long run has {long.steps} steps, not more than the short run's {short.steps}"
        )
    return (long.tx_bytes - short.tx_bytes) / (long.steps - short.steps) / 1e6
