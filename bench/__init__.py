"""Benchmarks for balance-exporter: `python -m bench` (see docs/benchmarks.md)."""
