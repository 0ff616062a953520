"""Static-state decoding for transformers' Mamba and Mamba-2 causal LMs.

``StaticStateDecoder(model)`` allocates one conv + SSM state per layer for a batch, fills it with
one pass over the prompt's ``inputs_embeds`` (visual tokens included), and then advances all
layers one token at a time in place (the loop and the CUDA graph: ``StaticDecoder``).

The layers use the model's own weights and modules (in_proj, conv1d, x_proj, dt_proj, out_proj,
Mamba-2's gated norm, lm_head); the RMSNorms are computed with ``F.rms_norm`` (same formula, fewer
kernels per token) and the residual stream is float32 when ``config.residual_in_fp32``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from transformers import Mamba2ForCausalLM, MambaForCausalLM, PreTrainedModel

from mambavlm.generation.decoder import StaticDecoder
from mambavlm.generation.mamba1 import StatefulMambaMixer
from mambavlm.generation.mamba2 import StatefulMamba2Mixer
from mambavlm.generation.norm import rms_norm
from mambavlm.generation.static_state import MixerState

__all__ = ["StaticStateDecoder"]


class StaticStateDecoder(StaticDecoder):
    """Prefill + per-token step of a ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` on static state."""

    supported_models = (MambaForCausalLM, Mamba2ForCausalLM)

    def __init__(self, model: PreTrainedModel, cuda_graph: bool | None = None) -> None:
        super().__init__(model, cuda_graph)
        stateful = StatefulMambaMixer if isinstance(model, MambaForCausalLM) else StatefulMamba2Mixer
        self.mixers = [stateful(layer.mixer) for layer in model.backbone.layers]
        self._states: list[MixerState] = []

    def _allocate(self, batch: int, capacity: int) -> None:
        self._states = [mixer.allocate(batch) for mixer in self.mixers]

    def _blocks(self, hidden: Tensor, mixer_fn: Callable[[int, Tensor], Tensor], fused: bool = False) -> Tensor:
        """The residual blocks: hidden -> norm -> mixer_fn(layer index, normed) -> + residual."""
        residual_in_fp32 = self.model.config.residual_in_fp32
        for index, layer in enumerate(self.model.backbone.layers):
            residual = hidden
            normed = rms_norm(layer.norm, hidden.to(layer.norm.weight.dtype), fused)
            if residual_in_fp32:
                residual = residual.to(torch.float32)
            hidden = residual + mixer_fn(index, normed)
        return hidden

    def _logits(self, hidden: Tensor) -> Tensor:
        """Last hidden state (B, D) -> float32 logits (B, V), through the final norm and lm_head."""
        hidden = rms_norm(self.model.backbone.norm_f, hidden)
        return self.model.lm_head(hidden.to(self.model.lm_head.weight.dtype)).float()

    def _step_eager(self, input_ids: Tensor) -> Tensor:
        hidden = self.model.backbone.embeddings(input_ids)
        hidden = self._blocks(hidden, lambda i, x: self.mixers[i].step(x, self._states[i]), fused=True)
        return self._logits(hidden)

    def _prefill(self, inputs_embeds: Tensor, attention_mask: Tensor | None) -> Tensor:
        hidden = self._blocks(
            inputs_embeds, lambda i, x: self.mixers[i].prefill(x, attention_mask, self._states[i])
        )
        return self._logits(hidden[:, -1])
