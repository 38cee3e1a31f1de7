"""Benchmarks: ours and the reference side by side on the same weights (never timed tests)."""
