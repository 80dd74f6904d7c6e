"""Benchmarks (pytest-benchmark): ``pytest benchmarks --benchmark-only``; see RESULTS.md."""
