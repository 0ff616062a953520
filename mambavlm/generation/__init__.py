"""Fast decoding: static per-layer state (SSM, conv, K/V), CUDA-graph steps, on-device sampling."""

from __future__ import annotations

from mambavlm.generation.decoder import StaticDecoder
from mambavlm.generation.factory import build_static_decoder, supports_static_decoding
from mambavlm.generation.hybrid_lm import HybridStaticDecoder
from mambavlm.generation.mamba_lm import StaticStateDecoder
from mambavlm.generation.settings import GenerationSettings

__all__ = [
    "GenerationSettings",
    "HybridStaticDecoder",
    "StaticDecoder",
    "StaticStateDecoder",
    "build_static_decoder",
    "supports_static_decoding",
]
