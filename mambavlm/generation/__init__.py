"""Fast decoding for the Mamba LLMs: static per-layer state, CUDA-graph steps, on-device sampling."""

from __future__ import annotations

from mambavlm.generation.decoder import StaticStateDecoder, supports_static_decoding
from mambavlm.generation.settings import GenerationSettings

__all__ = ["GenerationSettings", "StaticStateDecoder", "supports_static_decoding"]
