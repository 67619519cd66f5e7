"""CURVE's floor: what libsodium's XSalsa20-Poly1305 costs per byte here, and per sync step.

ZeroMQ's CURVE encrypts every frame with ``crypto_box_afternm`` (XSalsa20 and Poly1305 under
the connection's precomputed key) on the sender's I/O thread, and opens it with
``crypto_box_open_afternm`` on the receiver's. No setting of libzmq changes that cipher or
removes those two passes: they are the least an authenticated and encrypted byte costs. This
bench times both calls on the very libsodium pyzmq loaded (the copy bundled in its wheel, or
the system's), on 4 MiB buffers (sgdjob's frame size), after ``sodium_init`` has picked the
CPU's fastest implementation (libzmq calls it when a context is made), next to a memcpy of
the same size.

From those rates it states the floor for ``bench.sync_vs_ddp``'s workload: 2 workers, each
pushing and pulling the 10.5 M-parameter MLP's 42 MB per step, so 168 MB are sealed and 168 MB
opened per step, spread over the machine's cores at best. With the CPU time of the same step
without CURVE (``bench.sync_vs_ddp``'s CPU column), that bounds how fast sgdjob can run with
CURVE there, whatever it does around the crypto.

``python -m bench.curve`` writes ``bench/results/curve.md``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import statistics
import sys
import time
from pathlib import Path

import zmq

from bench.ddp import mlp_params
from bench.report import markdown_table, write_result

FRAME = 4 << 20  # sgdjob's frame size (transport.DEFAULT_CHUNK_BYTES)
ZEROBYTES = 32  # crypto_box_ZEROBYTES: the NaCl API's leading zero padding
WORKERS, HIDDEN, LAYERS = 2, 1024, 10


def find_libsodium() -> ctypes.CDLL | None:
    """The libsodium this process's libzmq uses: pyzmq's bundled copy, else the system's."""
    libs = Path(zmq.__file__).resolve().parent.parent / "pyzmq.libs"
    found = sorted(libs.glob("libsodium*.so*")) if libs.is_dir() else []
    name = str(found[0]) if found else ctypes.util.find_library("sodium")
    return ctypes.CDLL(name) if name else None


def rate(call: object, *, seconds: float = 1.0) -> float:
    """Bytes per second of ``call()`` on one FRAME, median of 5 timed stretches."""
    assert callable(call)
    call()
    rates = []
    for _ in range(5):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 5:
            call()
            n += 1
        rates.append(n * FRAME / (time.perf_counter() - t0))
    return statistics.median(rates)


def measure(lib: ctypes.CDLL) -> dict[str, float]:
    zmq.Context.instance()  # libzmq's own sodium_init: the implementation it will use
    if lib.sodium_init() < 0:
        raise RuntimeError("sodium_init failed")
    n = ZEROBYTES + FRAME
    plain, box, out = (ctypes.create_string_buffer(n) for _ in range(3))
    key, nonce = ctypes.create_string_buffer(32), ctypes.create_string_buffer(24)
    size = ctypes.c_ulonglong(n)
    if lib.crypto_box_afternm(box, plain, size, nonce, key) != 0:
        raise RuntimeError("crypto_box_afternm failed")

    def seal() -> None:
        lib.crypto_box_afternm(box, plain, size, nonce, key)

    def open_() -> None:
        if lib.crypto_box_open_afternm(out, box, size, nonce, key) != 0:
            raise RuntimeError("crypto_box_open_afternm refused its own box")

    return {
        "seal": rate(seal),
        "open": rate(open_),
        "memcpy": rate(lambda: ctypes.memmove(out, plain, FRAME)),
    }


def main(argv: list[str] | None = None) -> str:
    del argv
    lib = find_libsodium()
    if lib is None or not zmq.has("curve"):
        body = "skipped: this pyzmq's libzmq has no libsodium (no CURVE)"
        write_result("curve", "bench/curve: libsodium's cost per byte", body)
        return body
    r = measure(lib)
    rows = [
        ["crypto_box_afternm (seal: the sender's I/O thread)", f"{r['seal'] / 1e9:.2f}"],
        ["crypto_box_open_afternm (open: the receiver's)", f"{r['open'] / 1e9:.2f}"],
        ["memcpy, for scale", f"{r['memcpy'] / 1e9:.1f}"],
    ]
    step_bytes = WORKERS * 2 * 4 * mlp_params(HIDDEN, LAYERS)  # pushed and pulled, per step
    cpu_ms = 1e3 * (step_bytes / r["seal"] + step_bytes / r["open"])
    cores = os.cpu_count() or 1
    body = markdown_table(["operation, one core, 4 MiB", "GB/s"], rows)
    vector_mb = 4 * mlp_params(HIDDEN, LAYERS) / 1e6
    body += (
        f"\n\nOne sync step of bench.sync_vs_ddp ({WORKERS} workers, each pushing and pulling "
        f"{vector_mb:.1f} MB) seals and opens {step_bytes / 1e6:.0f} MB: "
        f"**{cpu_ms:.0f} ms of CPU** for the crypto alone, {cpu_ms / cores:.0f} ms per core "
        f"on this machine's {cores} cores. A step with CURVE therefore takes at least (CPU "
        f"of the step without CURVE + {cpu_ms:.0f} ms) / {cores}: the crypto is hidden only "
        "where a core would otherwise idle. libzmq's own copies around the crypto (the "
        "padded plaintext and the box) and the kernel's TCP copies come on top. libsodium was "
        "found at "
        f"`{Path(lib._name).name}`."
    )
    write_result("curve", "bench/curve: libsodium's cost per byte, and per sync step", body)
    return body


if __name__ == "__main__":
    main(sys.argv[1:])
