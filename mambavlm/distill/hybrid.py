"""Hybrid Mamba-2 / attention LLaMA models: conversion from a trained Transformer, one cache, save/load.

``convert_llama`` turns a transformers ``LlamaForCausalLM`` into a ``HybridLlamaForCausalLM``: the
``self_attn`` of every layer the layout names is replaced by a Mamba-2 mixer seeded from that
attention (``seed_mamba2_from_attention``), behind ``Mamba2AttentionAdapter``, which has the
attention's call signature; embeddings, norms, MLPs, the other attention layers and the LM head are
copied unchanged. ``convert_vlm`` does the same to the LLM inside a ``MambaVLM``.

The hybrid is still a LLaMA to transformers (it subclasses ``LlamaForCausalLM``); its config
(``HybridLlamaConfig``, model_type ``hybrid_llama``) adds ``mamba_layers``, ``mamba2_mixer`` (the
``Mamba2MixerConfig`` fields), ``layout`` and ``seeding_mode`` to LLaMA's config.json, so
``save_pretrained`` / ``from_pretrained`` are transformers' own (safetensors, no remote code).

Decoding uses one ``HybridCache``: a ``DynamicCache`` whose attention layers keep their K/V, plus a
``Mamba2LayerCache`` (conv + SSM state) and a token count per Mamba-2 layer. ``generate`` and a
``forward`` with ``use_cache`` create it; a cache of another type given to a Mamba-2 layer is an error.
The 2-D attention mask reaches the Mamba-2 layers too, so left-padded prompts of unequal lengths
(batched ``generate``) give each row what it would give alone.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.cache_utils import Cache, DynamicCache

from mambavlm.distill.layouts import HybridLayout
from mambavlm.distill.mamba2_mixer import Mamba2LayerCache, Mamba2Mixer, Mamba2MixerConfig
from mambavlm.distill.seeding import SEEDING_MODES, seed_mamba2_from_attention

if TYPE_CHECKING:
    from mambavlm.model import MambaVLM

__all__ = [
    "CACHE_ARG",
    "HybridCache",
    "HybridLlamaConfig",
    "HybridLlamaForCausalLM",
    "Mamba2AttentionAdapter",
    "convert_llama",
    "convert_vlm",
    "mamba_mixers",
]

# transformers renamed the decoder's cache argument from ``past_key_values`` (<= 5.17) to ``cache``.
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


class HybridLlamaConfig(LlamaConfig):
    """LLaMA's config plus the hybrid's structure.

    mamba_layers: indices of the layers whose attention is a Mamba-2 mixer. mamba2_mixer: the
    ``Mamba2MixerConfig`` fields shared by those mixers. layout / seeding_mode: how they were chosen
    and initialised (recorded for reference).
    """

    model_type = "hybrid_llama"

    mamba_layers: list[int] | None = None
    mamba2_mixer: dict[str, Any] | None = None
    layout: str | None = None
    seeding_mode: str | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        layers = list(self.mamba_layers or [])
        bad = [i for i in layers if not 0 <= i < self.num_hidden_layers]
        if bad or len(set(layers)) != len(layers):
            raise ValueError(
                f"mamba_layers {layers} must be distinct indices in [0, {self.num_hidden_layers - 1}]"
            )
        if layers and self.mamba2_mixer is None:
            raise ValueError("mamba2_mixer (the Mamba2MixerConfig fields) is needed when mamba_layers is set")
        self.mamba_layers = sorted(layers)

    @property
    def mixer_config(self) -> Mamba2MixerConfig:
        """The shared ``Mamba2MixerConfig`` of the Mamba-2 layers."""
        if self.mamba2_mixer is None:
            raise ValueError("this HybridLlamaConfig has no mamba2_mixer")
        return Mamba2MixerConfig(**self.mamba2_mixer)


class HybridCache(DynamicCache):
    """One generation cache for a hybrid: K/V for attention layers, conv + SSM state for Mamba-2 layers.

    Attention layers use ``DynamicCache`` as usual (keys/values (B, H_kv, T, D)); layer ``i`` in
    ``mamba_layers`` holds a ``Mamba2LayerCache`` (conv_state (B, C, d_conv), ssm_state (B, H, P, N),
    in the activations' dtype, as mamba_ssm keeps them) and the number of tokens it has seen, which
    is what ``get_seq_length`` and the mask sizes report for it.
    """

    def __init__(self, config: HybridLlamaConfig) -> None:
        super().__init__()
        self.mamba_layers = frozenset(config.mamba_layers or ())
        self.mixer_config = config.mixer_config if self.mamba_layers else None
        self.mamba_states: dict[int, Mamba2LayerCache] = {}
        self.mamba_lengths: dict[int, int] = {}

    def mamba_state(self, layer_idx: int, batch: int, device: torch.device, dtype: torch.dtype) -> Mamba2LayerCache:
        """The state of Mamba-2 layer ``layer_idx``, zeros on first use."""
        if layer_idx not in self.mamba_layers:
            raise KeyError(f"layer {layer_idx} is an attention layer; Mamba-2 layers are {sorted(self.mamba_layers)}")
        state = self.mamba_states.get(layer_idx)
        if state is None:
            state = Mamba2LayerCache.zeros(batch, self.mixer_config, device=device, dtype=dtype)
            self.mamba_states[layer_idx] = state
            self.mamba_lengths[layer_idx] = 0
        elif state.ssm_state.shape[0] != batch:
            raise ValueError(f"cache holds a batch of {state.ssm_state.shape[0]}, the input has {batch}")
        return state

    def advance(self, layer_idx: int, num_tokens: int) -> None:
        """Record that Mamba-2 layer ``layer_idx`` has consumed ``num_tokens`` more tokens."""
        self.mamba_lengths[layer_idx] = self.mamba_lengths.get(layer_idx, 0) + num_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx in self.mamba_layers:
            return self.mamba_lengths.get(layer_idx, 0)
        return super().get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        if layer_idx in self.mamba_layers:
            return self.get_seq_length(layer_idx) + query_length, 0
        return super().get_mask_sizes(query_length, layer_idx)

    def reset(self) -> None:
        super().reset()
        self.mamba_states.clear()
        self.mamba_lengths.clear()

    def _map_states(self, fn: Any) -> None:
        for state in self.mamba_states.values():
            state.conv_state = fn(state.conv_state)
            state.ssm_state = fn(state.ssm_state)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_states(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_states(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_states(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        if self.mamba_states:
            raise ValueError(
                "a HybridCache cannot be cropped: Mamba-2 states cannot be rolled back "
                "(assisted / speculative decoding is not supported for hybrids)"
            )
        super().crop(tokens_to_remove)


class Mamba2AttentionAdapter(nn.Module):
    """A ``Mamba2Mixer`` with ``LlamaAttention``'s call signature: (B, L, D) -> ((B, L, D), None).

    Positions (RoPE) and the 4-D attention mask are not used: the recurrence is causal by
    construction. ``mamba_padding_mask`` (B, T) (1 = real token; its last L columns belong to this input)
    keeps pad tokens out of the recurrence: rows where padding precedes a real token (left padding)
    are run one by one on their real tokens only, and their pad positions output 0; right padding
    needs nothing, as the real tokens come first. With a ``HybridCache`` the mixer continues from,
    and updates, this layer's state.
    """

    def __init__(self, mixer: Mamba2Mixer, layer_idx: int) -> None:
        super().__init__()
        self.mixer = mixer
        self.layer_idx = layer_idx

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        attention_mask: Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        mamba_padding_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        cache = cache if cache is not None else past_key_values
        batch, length, _ = hidden_states.shape
        state = None
        if cache is not None:
            if not isinstance(cache, HybridCache):
                raise TypeError(
                    f"Mamba-2 layer {self.layer_idx} got a {type(cache).__name__}; hybrid models decode with a "
                    "HybridCache (HybridLlamaForCausalLM.generate / forward create one)"
                )
            state = cache.mamba_state(self.layer_idx, batch, hidden_states.device, hidden_states.dtype)
        real = None if mamba_padding_mask is None else mamba_padding_mask[:, -length:].bool()
        out = self.mix(hidden_states, real, state)
        if cache is not None:
            cache.advance(self.layer_idx, length)
        return out, None

    def mix(self, hidden_states: Tensor, real: Tensor | None, state: Mamba2LayerCache | None) -> Tensor:
        """hidden_states (B, L, D), real (B, L) bool or None (all real) -> (B, L, D).

        Continues from, and updates, ``state`` when given. Rows where a pad precedes a real token
        run one by one on their real tokens; their pad positions output 0.
        """
        if real is None or not bool((real[:, 1:] & ~real[:, :-1]).any()):
            return self.mixer(hidden_states, state)
        out = hidden_states.new_zeros(hidden_states.shape)
        for row in range(hidden_states.shape[0]):
            keep = real[row]
            if not keep.any():
                continue
            row_state = None
            if state is not None:
                row_state = Mamba2LayerCache(state.conv_state[row : row + 1], state.ssm_state[row : row + 1])
            out[row, keep] = self.mixer(hidden_states[row : row + 1, keep], row_state)[0]
        return out


class HybridLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` whose layers in ``config.mamba_layers`` mix tokens with Mamba-2.

    input_ids / inputs_embeds (B, L[, D]) -> logits (B, L, V), as LLaMA; ``generate`` works with a
    ``HybridCache``.
    """

    config_class = HybridLlamaConfig
    config: HybridLlamaConfig

    def __init__(self, config: HybridLlamaConfig) -> None:
        super().__init__(config)
        if config.mamba_layers:
            mixer_config = config.mixer_config
            for i in config.mamba_layers:
                self.model.layers[i].self_attn = Mamba2AttentionAdapter(Mamba2Mixer(mixer_config), i)
            self.post_init()

    @property
    def mamba_layers(self) -> list[int]:
        return list(self.config.mamba_layers or [])

    def forward(
        self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, **kwargs: Any
    ) -> Any:
        """LLaMA's forward. With ``use_cache`` and no cache given, the cache is a fresh HybridCache;
        a 2-D attention_mask (B, T) also reaches the Mamba-2 layers as their padding mask."""
        use_cache = kwargs.get("use_cache")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and kwargs.get(CACHE_ARG) is None and kwargs.get("past_key_values") is None:
            kwargs[CACHE_ARG] = HybridCache(self.config)
        if attention_mask is not None and attention_mask.dim() == 2:
            kwargs["mamba_padding_mask"] = attention_mask
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``generate`` with a fresh ``HybridCache`` unless one is given."""
        if kwargs.get(CACHE_ARG) is None and kwargs.get("past_key_values") is None and kwargs.get("use_cache", True):
            kwargs[CACHE_ARG] = HybridCache(self.config)
        return super().generate(*args, **kwargs)


def mamba_mixers(model: nn.Module) -> dict[int, Mamba2Mixer]:
    """Layer index -> Mamba-2 mixer of a hybrid (a HybridLlamaForCausalLM or a MambaVLM holding one)."""
    return {
        module.layer_idx: module.mixer
        for module in model.modules()
        if isinstance(module, Mamba2AttentionAdapter)
    }


def _hybrid_config(
    config: LlamaConfig, mamba_layers: list[int], mixer: Mamba2MixerConfig, layout: str, mode: str
) -> HybridLlamaConfig:
    fields = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        fields.pop(key, None)
    for key in ("mamba_layers", "mamba2_mixer", "layout", "seeding_mode"):
        fields.pop(key, None)
    hybrid = HybridLlamaConfig(
        **fields, mamba_layers=mamba_layers, mamba2_mixer=asdict(mixer), layout=layout, seeding_mode=mode
    )
    hybrid._attn_implementation = config._attn_implementation
    return hybrid


@torch.no_grad()
def convert_llama(
    llama: LlamaForCausalLM,
    layout: HybridLayout | str,
    mode: str = "mmmamba",
    generator: torch.Generator | None = None,
) -> HybridLlamaForCausalLM:
    """A hybrid copy of ``llama``: the layout's layers get Mamba-2 mixers seeded from their attention
    (``mode`` "mmmamba" or "matvlm"); every other weight is copied. ``llama`` is left unchanged.

    Converting a hybrid again converts more of its remaining attention layers (already converted
    layers keep their mixers).
    """
    if not isinstance(llama, LlamaForCausalLM):
        raise TypeError(f"convert_llama needs a transformers LlamaForCausalLM, got {type(llama).__name__}")
    if mode not in SEEDING_MODES:
        raise ValueError(f"unknown seeding mode {mode!r}; expected one of {sorted(SEEDING_MODES)}")
    layout = layout if isinstance(layout, HybridLayout) else HybridLayout.parse(layout)
    num_layers = llama.config.num_hidden_layers
    existing = set(getattr(llama.config, "mamba_layers", None) or [])
    new_layers = [i for i in layout.mamba_layers(num_layers) if i not in existing]
    if not new_layers:
        raise ValueError(f"layout {layout} converts no attention layer of this {num_layers}-layer model")
    mixers = {i: seed_mamba2_from_attention(llama.model.layers[i].self_attn, mode, generator) for i in new_layers}
    mixer_configs = {m.config for m in mixers.values()}
    if existing:
        mixer_configs.add(llama.config.mixer_config)
    if len(mixer_configs) != 1:
        raise ValueError(f"the seeded mixers differ in shape or options: {mixer_configs}")
    mamba_layers = sorted(existing | set(new_layers))
    config = _hybrid_config(llama.config, mamba_layers, mixer_configs.pop(), str(layout), mode)
    weight = llama.get_input_embeddings().weight
    with torch.device(weight.device):
        hybrid = HybridLlamaForCausalLM._from_config(config, dtype=weight.dtype)
    state = {
        k: v
        for k, v in llama.state_dict().items()
        if not any(k.startswith(f"model.layers.{i}.self_attn.") for i in new_layers)
    }
    for i, mixer in mixers.items():
        state.update({f"model.layers.{i}.self_attn.mixer.{k}": v for k, v in mixer.state_dict().items()})
    hybrid.load_state_dict(state, strict=True)
    hybrid.generation_config = copy.deepcopy(llama.generation_config)
    return hybrid.train(llama.training)


def convert_vlm(
    vlm: MambaVLM, layout: HybridLayout | str, mode: str = "mmmamba", generator: torch.Generator | None = None
) -> MambaVLM:
    """A ``MambaVLM`` copy whose LLaMA-family LLM is converted by ``convert_llama``; the vision
    encoders, projector and tokenizer are copies of ``vlm``'s (``vlm`` is left unchanged)."""
    from mambavlm.model import MambaVLM

    if not isinstance(vlm, MambaVLM):
        raise TypeError(f"convert_vlm needs a MambaVLM, got {type(vlm).__name__}")
    if vlm.config.llm.family != "llama":
        raise ValueError(f"only a LLaMA-family LLM can be converted; this MambaVLM's llm.family is {vlm.config.llm.family!r}")
    llm = convert_llama(vlm.llm, layout, mode, generator)
    config = vlm.config.model_copy(deep=True)
    config.llm.family = "hybrid_llama"
    config.llm.config = {}
    return MambaVLM(
        config,
        copy.deepcopy(vlm.vision),
        copy.deepcopy(vlm.projector),
        llm,
        vlm.tokenizer,
    )
