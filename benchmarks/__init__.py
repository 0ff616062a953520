"""Speed benchmarks, one command each: ``python -m benchmarks.<name> [--quick] [--out FILE]``."""
