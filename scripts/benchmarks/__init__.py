"""Benchmarks of issue 7, run through scripts/bench.py (one module per benchmark)."""
