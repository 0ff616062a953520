"""Benchmark evaluation: the papers' benchmarks scored as their reference scorers score them."""
