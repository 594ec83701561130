"""Benchmarks for rnnddp (run as modules, e.g. ``python -m bench.throughput``); not part of the package."""
