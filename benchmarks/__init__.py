"""Speed benchmarks, one command each: ``python -m benchmarks.<name> [--quick] [--out FILE]``."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""The repository."""
PAPER_CONFIG = ROOT / "configs" / "model" / "mambavlm-2.8b.yaml"
"""MambaVLM-2.8B, the model every full (CUDA) benchmark measures."""
TINY_CONFIG = ROOT / "configs" / "model" / "tiny.yaml"
"""The tiny model every --quick (CPU) run measures."""
