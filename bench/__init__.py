"""Benchmarks for sgdjob: each module runs with ``python -m bench.<module>`` and writes a
markdown table under ``bench/results/``."""
