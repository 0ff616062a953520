"""Pick the fast-path decoder for a causal LM: Mamba / Mamba-2 LMs, LLaMA teachers and hybrids."""

from __future__ import annotations

from transformers import MambaForCausalLM, PreTrainedModel

from mambavlm.generation.decoder import StaticDecoder
from mambavlm.generation.hybrid_lm import HybridStaticDecoder
from mambavlm.generation.mamba_lm import StaticStateDecoder

__all__ = ["DECODERS", "build_static_decoder", "supports_static_decoding"]

DECODERS: tuple[type[StaticDecoder], ...] = (StaticStateDecoder, HybridStaticDecoder)


def supports_static_decoding(model: PreTrainedModel) -> bool:
    """Whether one of ``DECODERS`` runs ``model``."""
    return any(isinstance(model, d.supported_models) for d in DECODERS)


def build_static_decoder(
    model: PreTrainedModel, cuda_graph: bool | None = None, fused_step: bool = False, persistent_step: bool = False
) -> StaticDecoder:
    """The static decoder for ``model`` (CUDA graphs by default on CUDA). ``fused_step``: a Mamba-1 LM's
    steps through the fused Triton kernels; ``persistent_step``: one sequence's through one persistent CUDA
    kernel (``StaticStateDecoder``'s arguments). Raises TypeError for a model no decoder runs, ValueError
    for either with an LM that has no Mamba-1 mixers, or where its kernels cannot run."""
    if fused_step or persistent_step:
        if not isinstance(model, MambaForCausalLM):
            name = "fused_step" if fused_step else "persistent_step"
            raise ValueError(f"{name} runs Mamba-1 mixers; {type(model).__name__} has none (a Mamba-2 "
                             "layer's step kernel runs without it)")
        return StaticStateDecoder(model, cuda_graph, fused_step=fused_step, persistent_step=persistent_step)
    for decoder in DECODERS:
        if isinstance(model, decoder.supported_models):
            return decoder(model, cuda_graph)
    names = [c.__name__ for d in DECODERS for c in d.supported_models]
    raise TypeError(f"no static decoder for {type(model).__name__}; supported: {names}")
