"""Benchmarks of the 1-bit gradient codec (``sgdjob.compression``)."""
