"""Benchmarks: each `bench_<name>.py` writes `bench/results/<name>.json` (see bench/common.py)."""
