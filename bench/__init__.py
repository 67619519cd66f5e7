"""Benchmarks; each subpackage is runnable as `python -m bench.<name>`."""
