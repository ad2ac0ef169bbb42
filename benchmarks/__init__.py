"""Benchmarks of keraslm against its peers; run each from the repository root: python -m benchmarks.NAME."""
