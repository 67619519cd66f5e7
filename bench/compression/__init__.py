"""Benchmarks of 1-bit gradient compression (``sgdjob.compression``).

``main()`` (``python -m bench.compression``, or ``bench/__main__``'s "compression") runs both:

- ``codec``: encode/decode throughput of the codec against a memcpy of the same buffer;
- ``endtoend``: sync samples/s with fp32 vs 1-bit gradients vs torch DDP (gloo), 2 workers,
  ~10M parameters, on loopback and across veth links shaped to 10 and 1 Gbit/s, with the
  bytes per step per worker from the coordinator's counters.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    """Run the codec bench with its defaults, then the end-to-end bench with ``argv``."""
    from bench.compression import codec, endtoend

    codec.main([])
    endtoend.main([] if argv is None else argv)
