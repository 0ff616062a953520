"""Static-state decoding for the Mamba (transformers' ``MambaForCausalLM``) and Mamba-2 (``SSDForCausalLM``) LMs.

``StaticStateDecoder(model)`` allocates one state per layer for a batch, fills it with one pass over
the prompt's ``inputs_embeds`` (visual tokens included), and then advances all layers one token at a
time in place (the loop and the CUDA graph: ``StaticDecoder``).

Mamba-1 layers run ``StatefulMambaMixer`` over transformers' mixer weights (``in_proj``, ``conv1d``,
its ``x_proj`` to (dt, B, C), its ``dt_proj``, ``out_proj``); Mamba-2 layers run their own mixer's
prefill (``forward`` with a ``Mamba2State``) and ``step``, the same code training and transformers-style
generation run. The RMSNorms are computed with ``F.rms_norm`` (same formula, fewer kernels per token)
and the residual stream is float32 when ``config.residual_in_fp32``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from transformers import MambaForCausalLM, PreTrainedModel

from mambavlm.generation.decoder import StaticDecoder
from mambavlm.generation.mamba1 import MambaState, StatefulMambaMixer
from mambavlm.generation.norm import rms_norm
from mambavlm.llm.mamba2 import Mamba2State
from mambavlm.llm.mamba2_lm import SSDForCausalLM

__all__ = ["StaticStateDecoder"]


class StaticStateDecoder(StaticDecoder):
    """Prefill + per-token step of a ``MambaForCausalLM`` / ``SSDForCausalLM`` on static state."""

    supported_models = (MambaForCausalLM, SSDForCausalLM)

    def __init__(self, model: PreTrainedModel, cuda_graph: bool | None = None) -> None:
        super().__init__(model, cuda_graph)
        self.mamba1 = isinstance(model, MambaForCausalLM)
        layers = model.backbone.layers
        self.mamba1_mixers = [StatefulMambaMixer(layer.mixer) for layer in layers] if self.mamba1 else []
        self._states: list[MambaState] | list[Mamba2State] = []

    def _allocate(self, batch: int, capacity: int) -> None:
        if self.mamba1:
            self._states = [mixer.allocate(batch) for mixer in self.mamba1_mixers]
        else:
            weight = self.model.get_input_embeddings().weight
            self._states = [
                layer.mixer.allocate_state(batch, weight.device, weight.dtype) for layer in self.model.backbone.layers
            ]

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
        hidden = self.model.get_input_embeddings()(input_ids)
        if self.mamba1:
            step = lambda i, x: self.mamba1_mixers[i].step(x, self._states[i])  # noqa: E731
        else:
            layers = self.model.backbone.layers
            step = lambda i, x: layers[i].mixer.step(x, self._states[i])  # noqa: E731
        return self._logits(self._blocks(hidden, step, fused=True))

    def _prefill(self, inputs_embeds: Tensor, attention_mask: Tensor | None) -> Tensor:
        if self.mamba1:
            hidden = self._blocks(
                inputs_embeds, lambda i, x: self.mamba1_mixers[i].prefill(x, attention_mask, self._states[i])
            )
        else:
            padding = None if attention_mask is None or bool(attention_mask.all()) else attention_mask
            layers = self.model.backbone.layers

            def prefill(i: int, x: Tensor) -> Tensor:
                layers[i].mixer.reset_state(self._states[i])
                return layers[i].mixer(x, self._states[i], padding)

            hidden = self._blocks(inputs_embeds, prefill)
        return self._logits(hidden[:, -1])
