"""Static-state decoding for transformers' Mamba and Mamba-2 causal LMs, with CUDA graphs on CUDA.

``StaticStateDecoder(model)`` allocates one conv + SSM state per layer for a batch, fills it with
one pass over the prompt's ``inputs_embeds`` (visual tokens included), and then advances all
layers one token at a time in place. On CUDA that one-token step is captured into a CUDA graph
once per batch size and replayed per token; on the CPU the same step runs eagerly on the same
state, so both devices produce the same tokens as HF ``generate``.

The layers use the model's own weights and modules (in_proj, conv1d, x_proj, dt_proj, out_proj,
Mamba-2's gated norm, lm_head); the RMSNorms are computed with ``F.rms_norm`` (same formula, fewer
kernels per token) and the residual stream is float32 when ``config.residual_in_fp32``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Mamba2ForCausalLM, MambaForCausalLM, PreTrainedModel

from mambavlm.generation.cuda_graph import CudaGraphStep
from mambavlm.generation.mamba1 import StatefulMambaMixer
from mambavlm.generation.mamba2 import StatefulMamba2Mixer
from mambavlm.generation.sampling import TokenChooser
from mambavlm.generation.settings import GenerationSettings
from mambavlm.generation.static_state import MixerState

__all__ = ["EOS_CHECK_INTERVAL", "StaticStateDecoder", "supports_static_decoding"]

EOS_CHECK_INTERVAL = 8
"""Tokens between the host's checks whether every row has finished (the loop's only sync)."""

SUPPORTED_MODELS = (MambaForCausalLM, Mamba2ForCausalLM)


def supports_static_decoding(model: PreTrainedModel) -> bool:
    """Whether ``model`` is a causal LM that ``StaticStateDecoder`` runs (Mamba or Mamba-2)."""
    return isinstance(model, SUPPORTED_MODELS)


def rms_norm(norm: nn.Module, hidden: Tensor) -> Tensor:
    """transformers' Mamba RMSNorm, weight * (x / rms(x) in float32).to(x's dtype), in fewer kernels."""
    normed = F.rms_norm(hidden.float(), (hidden.shape[-1],), eps=norm.variance_epsilon)
    return norm.weight * normed.to(hidden.dtype)


class StaticStateDecoder:
    """Prefill + per-token step of a ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` on static state.

    cuda_graph: capture the step into a CUDA graph (default: when the model is on CUDA). The
    decoder keeps its state and graph between calls; they are rebuilt when the batch size changes
    or the model's parameters move (``.to()``, loading into new tensors).
    """

    def __init__(self, model: PreTrainedModel, cuda_graph: bool | None = None) -> None:
        if not supports_static_decoding(model):
            raise TypeError(
                f"static-state decoding supports {[c.__name__ for c in SUPPORTED_MODELS]}, "
                f"got {type(model).__name__}"
            )
        self.model = model
        backbone = model.backbone
        stateful = StatefulMambaMixer if isinstance(model, MambaForCausalLM) else StatefulMamba2Mixer
        self.mixers = [stateful(layer.mixer) for layer in backbone.layers]
        device = self.device
        if cuda_graph is None:
            cuda_graph = device.type == "cuda"
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
        self.cuda_graph = cuda_graph
        self._states: list[MixerState] = []
        self._graph: CudaGraphStep | None = None
        self._prepared_for: tuple[Any, ...] | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> StaticStateDecoder:
        """A fresh decoder for a copy of the model (CUDA graphs cannot be copied; it captures anew)."""
        return StaticStateDecoder(copy.deepcopy(self.model, memo), self.cuda_graph)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def batch_size(self) -> int | None:
        """Batch size the state is allocated for (None before the first prefill)."""
        return self._states[0].conv.shape[0] if self._states else None

    def _layout_key(self, batch: int) -> tuple[Any, ...]:
        """What the state and graph depend on: batch size and every parameter's storage and dtype."""
        return (batch, *((p.data_ptr(), p.dtype) for p in self.model.parameters()))

    def _prepare(self, batch: int) -> None:
        """Allocate the static state for ``batch`` (and capture the step) unless already done."""
        key = self._layout_key(batch)
        if key == self._prepared_for:
            return
        self._graph = None
        self._states = [mixer.allocate(batch) for mixer in self.mixers]
        if self.cuda_graph:
            self._graph = CudaGraphStep(self._step_eager, batch, self.device)
        self._prepared_for = key

    def _blocks(self, hidden: Tensor, mixer_fn: Callable[[int, Tensor], Tensor]) -> Tensor:
        """The residual blocks: hidden -> norm -> mixer_fn(layer index, normed) -> + residual."""
        residual_in_fp32 = self.model.config.residual_in_fp32
        for index, layer in enumerate(self.model.backbone.layers):
            residual = hidden
            normed = rms_norm(layer.norm, hidden.to(layer.norm.weight.dtype))
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
        hidden = self._blocks(hidden, lambda i, x: self.mixers[i].step(x, self._states[i]))
        return self._logits(hidden)

    @torch.no_grad()
    def prefill(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """inputs_embeds (B, L, D), left-padded with attention_mask (B, L) -> next-token logits (B, V).

        Runs the prompt through every layer once and writes each layer's conv and SSM state.
        """
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[1] == 0:
            raise ValueError(f"inputs_embeds must be (B, L, D) with L >= 1, got {tuple(inputs_embeds.shape)}")
        hidden_size = self.model.config.hidden_size
        if inputs_embeds.shape[-1] != hidden_size:
            raise ValueError(f"inputs_embeds width {inputs_embeds.shape[-1]} != the model's hidden_size {hidden_size}")
        if inputs_embeds.device != self.device:
            raise ValueError(f"inputs_embeds are on {inputs_embeds.device}, the model on {self.device}")
        if attention_mask is not None:
            if attention_mask.shape != inputs_embeds.shape[:2]:
                raise ValueError(
                    f"attention_mask must be {tuple(inputs_embeds.shape[:2])}, got {tuple(attention_mask.shape)}"
                )
            if not bool(attention_mask[:, -1].all()):
                raise ValueError("prompts must be left-padded: attention_mask[:, -1] has zeros")
        self._prepare(inputs_embeds.shape[0])
        hidden = self._blocks(
            inputs_embeds, lambda i, x: self.mixers[i].prefill(x, attention_mask, self._states[i])
        )
        return self._logits(hidden[:, -1])

    @torch.no_grad()
    def step(self, input_ids: Tensor) -> Tensor:
        """input_ids (B,) -> logits (B, V) for the next position; advances the state by one token.

        With a CUDA graph the returned tensor is the graph's output, overwritten by the next step.
        """
        if self._prepared_for is None:
            raise RuntimeError("call prefill before step")
        if input_ids.shape != (self.batch_size,):
            raise ValueError(f"input_ids must be ({self.batch_size},), got {tuple(input_ids.shape)}")
        if self._graph is not None:
            return self._graph(input_ids)
        return self._step_eager(input_ids)

    @torch.no_grad()
    def generate(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        **generate_kwargs: Any,
    ) -> Tensor:
        """Prompt embeddings (B, L, D), left-padded, -> new token ids (B, T), T <= max_new_tokens.

        ``generate_kwargs`` are HF ``generate``'s (see ``GenerationSettings``): greedy by default,
        ``do_sample`` with temperature / top_k / top_p; generation ends once every row has emitted
        an EOS id, and finished rows are padded, as HF does.
        """
        settings = GenerationSettings.from_generate_kwargs(generate_kwargs, self.model.generation_config)
        logits = self.prefill(inputs_embeds, attention_mask)
        return self.decode(logits, settings, generator)

    def decode(
        self, logits: Tensor, settings: GenerationSettings, generator: torch.Generator | None = None
    ) -> Tensor:
        """From the prefill's logits (B, V): choose, step, repeat -> new token ids (B, T)."""
        choose = TokenChooser(settings, generator)
        batch = logits.shape[0]
        tokens = torch.empty(batch, settings.max_new_tokens, dtype=torch.long, device=logits.device)
        eos = torch.tensor(settings.eos_token_ids, device=logits.device) if settings.eos_token_ids else None
        finished = torch.zeros(batch, dtype=torch.bool, device=logits.device)
        produced = settings.max_new_tokens
        for t in range(settings.max_new_tokens):
            next_ids = choose(logits)
            if eos is not None:
                next_ids = torch.where(finished, settings.fill_token_id, next_ids)
                finished |= torch.isin(next_ids, eos)
            tokens[:, t] = next_ids
            if t + 1 == settings.max_new_tokens:
                break
            if eos is not None and (t + 1) % EOS_CHECK_INTERVAL == 0 and bool(finished.all()):
                produced = t + 1
                break
            logits = self.step(next_ids)
        return trim_after_eos(tokens[:, :produced], eos)


def trim_after_eos(tokens: Tensor, eos: Tensor | None) -> Tensor:
    """tokens (B, T) -> tokens (B, T') ending where the last row to finish emitted its first EOS.

    HF ``generate`` stops at that step; the decoder checks only every ``EOS_CHECK_INTERVAL`` tokens
    and may have produced (padding) tokens beyond it.
    """
    if eos is None:
        return tokens
    is_eos = torch.isin(tokens, eos)
    if not bool(is_eos.any(dim=1).all()):
        return tokens
    first_eos = is_eos.int().argmax(dim=1)
    return tokens[:, : int(first_eos.max()) + 1]
