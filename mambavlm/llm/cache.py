"""One generation cache for LLMs with Mamba-2 layers: K/V for attention layers, ``Mamba2State`` for the rest.

transformers' ``generate`` drives it like any ``DynamicCache``; the Mamba-2 LM (every layer Mamba-2)
and the hybrids (any layout) share it. The pattern is transformers' hybrid models' (Bamba, Zamba2,
Jamba): one object per generation, holding whatever each layer needs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from mambavlm.llm.mamba2 import Mamba2Mixer, Mamba2State

__all__ = ["CACHE_ARG", "HybridCache"]

CACHE_ARG = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
"""The name transformers gives a decoder's cache (argument and output field): ``past_key_values`` up to
5.17, ``cache`` later."""


class HybridCache(DynamicCache):
    """Attention layers use ``DynamicCache`` as usual (keys / values (B, H_kv, T, D)); each layer in
    ``mamba_layers`` holds a ``Mamba2State`` (conv in the activations' dtype, SSM state in float32) and
    the number of tokens it has seen, which is what ``get_seq_length`` and the mask sizes report for it.

    Raises KeyError when an attention layer asks for a Mamba-2 state, ValueError when a state is asked
    for with another batch size.
    """

    def __init__(self, mamba_layers: Iterable[int]) -> None:
        super().__init__()
        self.mamba_layers = frozenset(int(i) for i in mamba_layers)
        self.mamba_states: dict[int, Mamba2State] = {}
        self.mamba_lengths: dict[int, int] = {}

    def mamba_state(self, layer_idx: int, mixer: Mamba2Mixer, batch: int, dtype: torch.dtype) -> Mamba2State:
        """The state of Mamba-2 layer ``layer_idx``, allocated by ``mixer`` on first use."""
        if layer_idx not in self.mamba_layers:
            raise KeyError(f"layer {layer_idx} is an attention layer; Mamba-2 layers are {sorted(self.mamba_layers)}")
        state = self.mamba_states.get(layer_idx)
        if state is None:
            state = mixer.allocate_state(batch, dtype=dtype)
            self.mamba_states[layer_idx] = state
            self.mamba_lengths[layer_idx] = 0
        elif state.batch_size != batch:
            raise ValueError(f"the cache holds a batch of {state.batch_size}, the input has {batch}")
        return state

    def advance(self, layer_idx: int, num_tokens: int) -> None:
        """Record that Mamba-2 layer ``layer_idx`` has consumed ``num_tokens`` more tokens."""
        self.mamba_lengths[layer_idx] = self.mamba_lengths.get(layer_idx, 0) + num_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx in self.mamba_layers:
            return self.mamba_lengths.get(layer_idx, 0)
        return super().get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:  # type: ignore[override]
        if layer_idx in self.mamba_layers:
            return self.get_seq_length(layer_idx) + query_length, 0
        return super().get_mask_sizes(query_length, layer_idx)

    def reset(self) -> None:
        super().reset()
        self.mamba_states.clear()
        self.mamba_lengths.clear()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for state in self.mamba_states.values():
            state.map_(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        for state in self.mamba_states.values():
            state.map_(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        for state in self.mamba_states.values():
            state.map_(lambda t: t[indices])

    def crop(self, max_length: int) -> None:
        if self.mamba_states:
            raise ValueError(
                "a HybridCache cannot be cropped: Mamba-2 states cannot be rolled back "
                "(assisted / speculative decoding is not supported for Mamba-2 layers)"
            )
        super().crop(max_length)
