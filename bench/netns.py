"""Two network namespaces joined by a rate-shaped veth pair, for benchmarks over a "real" link.

``with veth_link("1gbit") as link:`` creates namespaces ``link.ns[0]`` and ``link.ns[1]``, a veth
pair with one end in each, addresses ``link.addrs`` from a private test subnet (10.99.0.0/24 by
default) configured only inside those namespaces, and a ``tc`` token-bucket filter (tbf) on
both ends so each direction carries at most ``rate``. Nothing is added to the caller's own
namespace (the veth is created directly inside the new ones), so benchmark traffic cannot leave
them; on exit the namespaces are deleted, which destroys the veth pair and its qdiscs.

Needs root and iproute2 (``ip``, ``tc``); when anything is missing or a step fails,
``NetnsUnavailable`` says why, so a caller can print ``skipped: <reason>``. (tbf rather than
netem: netem's kernel module is often absent in containers; tbf is almost always there.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be set up here; ``str(exc)`` is the reason."""


@dataclass(frozen=True)
class VethLink:
    ns: tuple[str, str]  # namespace names, end 0 and end 1
    addrs: tuple[str, str]  # IPv4 address of each end (no prefix length)
    rate: str | None  # tc rate of each direction, None if unshaped


def rate_bits_per_s(rate: str) -> int:
    """'1gbit' -> 10**9; the tc spellings bit/kbit/mbit/gbit only (no bytes, no binary units)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)", rate.strip().lower())
    if not m:
        raise ValueError(f"rate must look like 100mbit, 1gbit, 10gbit; got {rate!r}")
    return int(float(m.group(1)) * _RATE_UNITS[m.group(2)])


def in_netns(ns: str | None, argv: Sequence[str]) -> list[str]:
    """argv to run a command inside namespace ``ns`` (or unchanged when ``ns`` is None)."""
    return list(argv) if ns is None else ["ip", "netns", "exec", ns, *argv]


def _run(argv: list[str]) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsUnavailable(f"`{' '.join(argv)}` failed: {exc}") from None
    if proc.returncode != 0:
        err = proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}"
        raise NetnsUnavailable(f"`{' '.join(argv)}` failed: {err}")


def _check_prerequisites() -> None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise NetnsUnavailable(f"`{tool}` (iproute2) is not installed")


@contextmanager
def veth_link(
    rate: str | None = "1gbit", *, subnet: str = "10.99.0", tag: str | None = None
) -> Iterator[VethLink]:
    """Create the namespaces and the shaped link; always delete them on exit.

    ``subnet`` is the first three octets of a /24 used only inside the namespaces; ``tag``
    makes the names unique (default: this process id), so parallel runs do not collide.
    """
    _check_prerequisites()
    bps = None if rate is None else rate_bits_per_s(rate)
    tag = tag or str(os.getpid())
    ns = (f"sgdjb-{tag}-a", f"sgdjb-{tag}-b")
    dev = (f"vsa{tag}"[:15], f"vsb{tag}"[:15])  # interface names: at most 15 characters
    addrs = (f"{subnet}.1", f"{subnet}.2")
    created: list[str] = []
    try:
        for name in ns:
            _run(["ip", "netns", "add", name])
            created.append(name)
        # Both ends are born inside their namespaces: the root namespace never sees them.
        veth = ["type", "veth", "peer", "name", dev[1], "netns", ns[1]]
        _run(["ip", "link", "add", dev[0], "netns", ns[0], *veth])
        for name, d, addr in zip(ns, dev, addrs, strict=True):
            _run(["ip", "-n", name, "addr", "add", f"{addr}/24", "dev", d])
            _run(["ip", "-n", name, "link", "set", "lo", "up"])
            _run(["ip", "-n", name, "link", "set", d, "up"])
            if bps is not None:
                # The bucket must hold a whole GSO super-packet (64 KiB) and a kernel tick at
                # line rate; 10 ms of traffic covers both from 100mbit to 10gbit+.
                burst = max(512 * 1024, bps // 8 // 100)
                tbf = ["tbf", "rate", str(bps), "burst", str(burst), "latency", "50ms"]
                _run(["tc", "-n", name, "qdisc", "add", "dev", d, "root", *tbf])
        yield VethLink(ns=ns, addrs=addrs, rate=rate)
    finally:
        errors = []
        for name in reversed(created):
            proc = subprocess.run(
                ["ip", "netns", "del", name], capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                errors.append(f"{name}: {proc.stderr.strip()}")
        if errors:
            raise RuntimeError(f"could not delete namespaces: {'; '.join(errors)}")
