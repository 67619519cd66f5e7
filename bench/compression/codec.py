"""Codec throughput: 1-bit encode and decode GB/s against a memcpy of the same buffer.

``python -m bench.compression.codec [--sizes-mb 4 40] [--repeats 7]``. Rates are bytes of the
float32 input per second (so they compare directly with memcpy); every number comes from the
same run on the same buffers, single-threaded, so the ratio column is meaningful even on a
busy machine. Each figure is the median of ``--repeats`` timed runs after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from bench.report import markdown_table, write_result
from sgdjob.compression import ErrorFeedback, decode_into, quantize, wire_nbytes


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-touch page faults and allocator growth are not the codec's cost
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(size_mb: float, bucket_size: int, repeats: int) -> list[list[object]]:
    n = int(size_mb * 1e6) // 4
    rng = np.random.default_rng(0)
    grad = rng.standard_normal(n, dtype=np.float32)
    dst = np.empty_like(grad)
    acc = np.zeros_like(grad)
    ef = ErrorFeedback(n, bucket_size)
    enc = ef.encode(grad)
    cases: list[tuple[str, Callable[[], object]]] = [
        ("memcpy (np.copyto)", lambda: np.copyto(dst, grad)),
        ("encode, error feedback", lambda: ef.encode(grad)),
        ("encode, no feedback", lambda: quantize(grad, bucket_size)),
        (
            "decode_into",
            lambda: decode_into(acc, enc.bits, enc.scales, count=n, bucket_size=bucket_size),
        ),
    ]
    seconds = {name: _median_seconds(fn, repeats) for name, fn in cases}
    base = 4 * n / seconds["memcpy (np.copyto)"] / 1e9
    rows: list[list[object]] = []
    for name, s in seconds.items():
        gbps = 4 * n / s / 1e9
        rows.append([f"{4 * n / 1e6:.0f} MB", name, f"{s * 1e3:.2f}", f"{gbps:.2f}", gbps / base])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[4.0, 40.0])
    parser.add_argument("--bucket-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [r for mb in args.sizes_mb for r in measure(mb, args.bucket_size, args.repeats)]
    n = int(args.sizes_mb[-1] * 1e6) // 4
    body = markdown_table(["fp32 size", "operation", "ms", "GB/s", "x memcpy"], rows)
    body += (
        f"\n\nWire size at bucket {args.bucket_size}: {wire_nbytes(n, args.bucket_size)} bytes "
        f"for {4 * n} fp32 bytes (1/{4 * n / wire_nbytes(n, args.bucket_size):.1f})."
        " Single-threaded (torch.set_num_threads(1)); median of"
        f" {args.repeats} runs."
    )
    write_result("codec", "1-bit codec throughput", body)


if __name__ == "__main__":
    main()
