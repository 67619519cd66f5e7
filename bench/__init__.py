"""Benchmarks: each module prints a markdown table and writes it under bench/results/."""
