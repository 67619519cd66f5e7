"""How `sgdjob run` ties its children to itself: stop signals in, parent-death signal out.

- ``stop_signals``: while the launcher runs, SIGTERM and SIGHUP (a closed terminal, ``kill``,
  a CI runner's cancel) raise ``Stopped`` in the main thread, exactly like Ctrl-C raises
  KeyboardInterrupt, so the launcher's clean-up stops every child.
- ``die_with_parent``: the ``preexec_fn`` of every child. On Linux it asks the kernel
  (``prctl(PR_SET_PDEATHSIG, SIGKILL)``) to kill the child when the launcher dies, even by
  SIGKILL, which no clean-up code can catch. Elsewhere it does nothing (children are then
  stopped by the launcher's clean-up only).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """The launcher got a stop signal; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn: Callable[..., int] = libc.prctl
    except (OSError, AttributeError):
        return None
    return fn


# Resolved once in the parent: the child between fork and exec only calls it.
_PRCTL = _load_prctl()


def die_with_parent_supported() -> bool:
    return _PRCTL is not None


def die_with_parent_preexec(parent_pid: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when ``parent_pid`` dies."""
    prctl = _PRCTL
    if prctl is None:
        return None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into ``Stopped`` while the block runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_stopped(signum: int, _frame: FrameType | None) -> None:
        raise Stopped(signum)

    previous: dict[signal.Signals, Any] = {}
    for stop in STOP_SIGNALS:
        previous[stop] = signal.signal(stop, raise_stopped)
    try:
        yield
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)


@contextlib.contextmanager
def stop_signals_ignored() -> Iterator[None]:
    """While the launcher stops its children, a second Ctrl-C or SIGTERM must not cut it short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (*STOP_SIGNALS, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
