"""ZeroMQ transport: sockets, multipart framing and byte counters. No protocol decisions.

Shards bind one ROUTER socket; every worker connects one DEALER socket to each shard. A
message is ``[header, payload...]`` (a ROUTER prepends the peer identity). Vector payloads are
sent zero-copy (``copy=False``) as memoryview slices of one contiguous buffer, cut into
``chunk_bytes`` frames because one huge frame is 2-3x slower on loopback than several
1-16 MiB ones. With ``track=True`` the caller gets a MessageTracker and must not write into
the buffer until it is done (ZeroMQ reads it from its I/O thread after ``send`` returns).
Received payload frames stay ``zmq.Frame`` objects so their bytes are read in place.

CURVE (``CurveServer`` / ``CurveClient``): a shard's ROUTER is a CURVE server whose ZAP handler
(pyzmq's ThreadAuthenticator) admits exactly one client public key, the job's. A peer without
it never completes the handshake, so none of its messages reach the shard; the failed
handshakes are observed through a socket monitor and reported to ``on_handshake_failure``.

Threads and copies (measured, see docs/benchmarks.md): libzmq does all socket I/O, and all
CURVE encryption and decryption, on the context's I/O threads, one connection per thread at a
time. ``make_context(io_threads=io_threads_for(peers))`` gives a process one I/O thread per
peer (capped by its cores) so a shard decrypts two workers' pushes, and a worker encrypts its
pushes to two shards, in parallel. Frames of ``COPY_THRESHOLD`` bytes or more go zero-copy:
each such frame costs a round trip through pyzmq's garbage-collector thread, which is cheaper
than a copy from 64 KiB up (at 4 MiB frames that is one round trip per 4 MiB); smaller ones
(headers, 1-bit scales) are copied. SO_SNDBUF/SO_RCVBUF are left to the kernel: setting them
turns off Linux's TCP buffer autotuning and caps them at ``net.core.[rw]mem_max``.

Received buffers: libzmq ``malloc``s every received frame on its I/O thread. With glibc's
defaults a trainer process got fresh pages for each 4 MiB frame (mmap, a page fault per 4 KiB
while the kernel copied the bytes in, munmap on free): about a third of a 40 MB push + pull.
``make_context`` therefore tunes glibc once per process (``keep_freed_buffers``) so frames come
from the heap and freed ones are reused; the cost is that a process keeps its peak heap
instead of returning it to the kernel.
"""

from __future__ import annotations

import ctypes
import hmac
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from sgdjob.protocol import HEADER_SIZE, MAX_FRAME_BYTES, Header

DEFAULT_CHUNK_BYTES = 4 << 20
# Below this a frame is copied into a ZeroMQ message; from it up it is sent zero-copy (pyzmq's
# own default, kept explicit: measured cheaper than copying from 64 KiB frames up).
COPY_THRESHOLD = 1 << 16
MAX_IO_THREADS = 64


def io_threads_for(peers: int, cpus: int | None = None) -> int:
    """I/O threads for a process talking to ``peers`` sockets' worth of connections.

    One per peer, so each connection's framing and CURVE crypto has a thread of its own, but
    never more than the cores this process may run on (``os.sched_getaffinity``).
    """
    if peers < 1:
        raise ValueError(f"peers must be at least 1, got {peers}")
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(peers, cpus or 1, MAX_IO_THREADS))


# glibc's mallopt parameters (malloc.h), and the values keep_freed_buffers sets.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2): 4 MiB frames stay below
TRIM_THRESHOLD_BYTES = 1 << 30
# Set by the user, these win: keep_freed_buffers leaves the allocator alone.
MALLOC_ENV = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_ARENA_MAX",
    "GLIBC_TUNABLES",
)
_tuned: bool | None = None


def keep_freed_buffers() -> bool:
    """Have glibc serve received frames from the heap and keep freed ones for the next message.

    Without it, each large frame libzmq receives is a fresh mmap (glibc's threshold starts at
    128 KiB) that the kernel faults in page by page, and a freed heap top above 2x the
    threshold is trimmed back, so the next step faults again. Both thresholds are set
    explicitly, which also stops glibc's own adjustment of them. One arena: an I/O thread's
    own arena grows in 64 MiB heaps that glibc unmaps as soon as they are empty, so a
    message of more than 64 MiB would fault in again every time. Once per process; False
    (and nothing changed) without glibc, or when the user tuned malloc through the
    environment.
    """
    global _tuned
    if _tuned is None:
        _tuned = not any(os.environ.get(name) for name in MALLOC_ENV) and _mallopt_all(
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
            (_M_ARENA_MAX, 1),
        )
    return _tuned


def _mallopt_all(*settings: tuple[int, int]) -> bool:
    """Apply each (parameter, value) with the C library's mallopt; True if all took."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # glibc's mallopt returns 1 when it took the value; musl's does nothing and returns 0.
    return all(mallopt(param, value) == 1 for param, value in settings)


def make_context(*, io_threads: int = 1) -> zmq.Context[zmq.Socket[bytes]]:
    """A ZeroMQ context with ``io_threads`` I/O threads (see ``io_threads_for``); the process's
    allocator is tuned for the frames it will receive first (``keep_freed_buffers``)."""
    if not isinstance(io_threads, int) or not 1 <= io_threads <= MAX_IO_THREADS:
        raise ValueError(f"io_threads must be an integer in 1..{MAX_IO_THREADS}, got {io_threads}")
    keep_freed_buffers()
    return zmq.Context(io_threads=io_threads)


def _tune(sock: zmq.Socket[bytes]) -> None:
    """Options every sgdjob socket shares."""
    # A foreign peer sending one giant frame is disconnected instead of exhausting memory.
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES + 1024)
    # No high-water mark: a step's frames are never dropped or blocked half-sent.
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.copy_threshold = COPY_THRESHOLD


@dataclass
class Counters:
    """Bytes through one endpoint, per direction (headers included)."""

    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass
class Incoming:
    """One received message: the peer identity (ROUTER only), header bytes and payload frames."""

    identity: bytes | None
    header: bytes
    frames: list[zmq.Frame] = field(default_factory=list)

    def frame_sizes(self) -> list[int]:
        return [len(f.buffer) for f in self.frames]


def vector_frames(array: np.ndarray, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[memoryview]:
    """Zero-copy views of a contiguous array cut into frames of at most ``chunk_bytes``."""
    if not array.flags.c_contiguous:
        raise ValueError("payload must be C-contiguous")
    chunk = max(array.itemsize, min(chunk_bytes, MAX_FRAME_BYTES))
    chunk -= chunk % array.itemsize  # never split an element across frames
    raw = memoryview(array).cast("B")  # type: ignore[arg-type]  # ndarray is a buffer
    return [raw[i : i + chunk] for i in range(0, len(raw), chunk)]


def frame_array(frame: zmq.Frame, dtype: type[np.generic] = np.float32) -> np.ndarray:
    """A read-only numpy view of a received frame's bytes (no copy)."""
    return np.frombuffer(frame.buffer, dtype=dtype)


@dataclass(frozen=True)
class CurveServer:
    """A shard's keys and the one client key it admits (all Z85)."""

    public: str
    secret: str
    client_public: str


@dataclass(frozen=True)
class CurveClient:
    """A worker's keys and the shards' public key (all Z85)."""

    server_public: str
    public: str
    secret: str


class _AdmitOne:
    """ZAP credentials provider: only the job's client key gets in."""

    def __init__(self, client_public: str) -> None:
        self.key = client_public.encode()

    def callback(self, domain: str, key: bytes) -> bool:
        return hmac.compare_digest(key, self.key)


HANDSHAKE_EVENTS: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "HANDSHAKE_FAILED",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "HANDSHAKE_PROTOCOL",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "HANDSHAKE_AUTH",
}


class Endpoint:
    """One socket plus its counters; the only place that calls send/recv."""

    def __init__(self, sock: zmq.Socket[bytes], *, router: bool) -> None:
        self.sock = sock
        self.router = router
        self.counters = Counters()
        self.monitor: zmq.Socket[bytes] | None = None
        self.auth: ThreadAuthenticator | None = None
        self.on_handshake_failure: Callable[[str], None] | None = None
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)

    def send(
        self,
        header: Header,
        payload: Sequence[memoryview | bytes] = (),
        *,
        identity: bytes | None = None,
        track: bool = False,
    ) -> zmq.MessageTracker | None:
        frames: list[memoryview | bytes] = [header.pack(), *payload]
        if self.router:
            if identity is None:
                raise ValueError("a ROUTER send needs the peer identity")
            frames.insert(0, identity)
        tracker = self.sock.send_multipart(frames, copy=False, track=track)
        # nbytes, not len(): a 2-D view (1-bit scales) has len() == rows.
        self.counters.bytes_sent += HEADER_SIZE + sum(memoryview(p).nbytes for p in payload)
        return tracker if track else None

    def recv(self) -> Incoming | None:
        """One message, or None for one too short to hold a header frame at all."""
        parts: list[zmq.Frame] = self.sock.recv_multipart(copy=False)
        self.counters.bytes_received += sum(len(p.buffer) for p in parts)
        identity = None
        if self.router:
            if len(parts) < 2:
                return None
            identity = parts[0].bytes
            parts = parts[1:]
        if not parts:
            return None
        return Incoming(identity=identity, header=parts[0].bytes, frames=list(parts[1:]))

    def poll(self, timeout_ms: int) -> bool:
        """True when a message is waiting; handshake-failure events are consumed on the way."""
        if self.monitor is None:
            return bool(self.sock.poll(timeout_ms, zmq.POLLIN))
        ready = dict(self._poller.poll(timeout_ms))
        if self.monitor in ready:
            while self.monitor.poll(0, zmq.POLLIN):
                event = recv_monitor_message(self.monitor)
                kind = HANDSHAKE_EVENTS.get(event["event"])
                if kind and self.on_handshake_failure is not None:
                    self.on_handshake_failure(kind)
        return self.sock in ready

    def close(self, linger_ms: int = 1000) -> None:
        if self.monitor is not None:
            self.sock.disable_monitor()
            self.monitor.close(linger=0)
        self.sock.close(linger=linger_ms)
        if self.auth is not None:
            self.auth.stop()


def bind_router(
    ctx: zmq.Context[zmq.Socket[bytes]],
    endpoint: str,
    *,
    curve: CurveServer | None = None,
    on_handshake_failure: Callable[[str], None] | None = None,
) -> tuple[Endpoint, str]:
    """Bind a shard's ROUTER; returns it and the concrete endpoint (port 0 becomes real)."""
    auth = None
    if curve is not None:
        # The ZAP handler must run before the socket accepts anyone.
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve_callback(
            domain="*", credentials_provider=_AdmitOne(curve.client_public)
        )
    sock = ctx.socket(zmq.ROUTER)
    if curve is not None:
        sock.curve_secretkey = curve.secret.encode()
        sock.curve_publickey = curve.public.encode()
        sock.curve_server = True
    _tune(sock)
    if endpoint.endswith(":0"):
        endpoint = endpoint[:-2] + ":*"
    sock.bind(endpoint)
    concrete = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    ep = Endpoint(sock, router=True)
    ep.auth = auth
    ep.on_handshake_failure = on_handshake_failure
    ep.monitor = sock.get_monitor_socket(
        zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    )
    ep._poller.register(ep.monitor, zmq.POLLIN)
    return ep, concrete


def connect_dealer(
    ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, *, curve: CurveClient | None = None
) -> Endpoint:
    """A worker's DEALER to one shard."""
    sock = ctx.socket(zmq.DEALER)
    if curve is not None:
        sock.curve_serverkey = curve.server_public.encode()
        sock.curve_publickey = curve.public.encode()
        sock.curve_secretkey = curve.secret.encode()
    _tune(sock)
    sock.connect(endpoint)
    return Endpoint(sock, router=False)
