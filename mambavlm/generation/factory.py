"""Pick the fast-path decoder for a causal LM: Mamba / Mamba-2 LMs, LLaMA teachers and hybrids."""

from __future__ import annotations

from transformers import PreTrainedModel

from mambavlm.generation.decoder import StaticDecoder
from mambavlm.generation.hybrid_lm import HybridStaticDecoder
from mambavlm.generation.mamba_lm import StaticStateDecoder

__all__ = ["DECODERS", "build_static_decoder", "supports_static_decoding"]

DECODERS: tuple[type[StaticDecoder], ...] = (StaticStateDecoder, HybridStaticDecoder)


def supports_static_decoding(model: PreTrainedModel) -> bool:
    """Whether one of ``DECODERS`` runs ``model``."""
    return any(isinstance(model, d.supported_models) for d in DECODERS)


def build_static_decoder(model: PreTrainedModel, cuda_graph: bool | None = None) -> StaticDecoder:
    """The static decoder for ``model`` (CUDA graphs by default on CUDA)."""
    for decoder in DECODERS:
        if isinstance(model, decoder.supported_models):
            return decoder(model, cuda_graph)
    names = [c.__name__ for d in DECODERS for c in d.supported_models]
    raise TypeError(f"no static decoder for {type(model).__name__}; supported: {names}")
