"""Hybrid Mamba-2 / attention LLaMA models: the ``hybrid_llama`` LLM family.

A ``HybridLlamaForCausalLM`` is a LLaMA whose layers in ``config.mamba_layers`` mix tokens with a
``Mamba2Mixer`` (behind ``Mamba2AttentionAdapter``, which has the attention's call signature) instead
of attention; embeddings, norms, MLPs, the other attention layers and the LM head are LLaMA's. Such
models come from a trained Transformer by seeding (``mambavlm.distill.convert``) and distillation.

The hybrid is still a LLaMA to transformers (it subclasses ``LlamaForCausalLM``); its config
(``HybridLlamaConfig``, model_type ``hybrid_llama``) adds ``mamba_layers``, ``mamba2_mixer`` (the
``Mamba2MixerConfig`` fields), ``layout`` and ``seeding_mode`` to LLaMA's config.json, so
``save_pretrained`` / ``from_pretrained`` are transformers' own (safetensors, no remote code).

Decoding uses one ``HybridCache`` (K/V for attention layers, a ``Mamba2State`` per Mamba-2 layer);
``generate`` and a ``forward`` with ``use_cache`` create it; a cache of another type given to a Mamba-2
layer is an error. The 2-D attention mask reaches the Mamba-2 layers too, which skip padded positions,
so left-padded prompts of unequal lengths (batched ``generate``) give each row what it gives alone.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import fields
from typing import Any

from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import Cache

from mambavlm.llm.cache import CACHE_ARG, HybridCache
from mambavlm.llm.mamba2 import Mamba2Mixer, Mamba2MixerConfig

__all__ = [
    "HybridLlamaConfig",
    "HybridLlamaForCausalLM",
    "Mamba2AttentionAdapter",
    "index_ranges",
    "layout_summary",
    "mamba_mixers",
    "mixer_fields_problem",
    "mixer_width_problem",
]


def mixer_fields_problem(mixer: Any, prefix: str = "") -> str | None:
    """Why the ``mamba2_mixer`` fields a config writes are refused, as one line, or None: not a mapping,
    or keys that are not ``Mamba2MixerConfig`` fields (each an ``unknown key`` with difflib's closest
    field as a ``did you mean``). ``prefix`` is the dotted path above ``mamba2_mixer`` (``"config."``).

    This is for configs a user writes (YAML, overrides); a saved checkpoint whose fields were renamed
    since is ``HybridLlamaConfig.mixer_config``'s error, which says to convert it again."""
    if mixer is None:
        return None
    if not isinstance(mixer, dict):
        return f"{prefix}mamba2_mixer: expected a mapping of Mamba2MixerConfig fields, got {mixer!r}"
    known = [f.name for f in fields(Mamba2MixerConfig)]
    problems = []
    for key in sorted(str(k) for k in set(mixer) - set(known)):
        close = difflib.get_close_matches(key, known, n=1)
        problems.append(f"{prefix}mamba2_mixer.{key}: unknown key" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return "; ".join(problems) or None


def mixer_width_problem(mixer: Any, hidden_size: Any, prefix: str = "") -> str | None:
    """Why a ``mamba2_mixer.hidden_size`` that differs from the LLM's ``hidden_size`` is refused (the
    Mamba-2 layers replace attention inside the residual stream, so they must be as wide), or None.
    ``prefix`` is the dotted path above both keys (``"config."``)."""
    width = mixer.get("hidden_size") if isinstance(mixer, dict) else None
    if width is None or width == hidden_size:
        return None
    return (
        f"{prefix}mamba2_mixer.hidden_size ({width}) differs from {prefix}hidden_size ({hidden_size}): "
        "the Mamba-2 layers replace attention in the LLM's residual stream and must be as wide as it"
    )


class HybridLlamaConfig(LlamaConfig):
    """LLaMA's config plus the hybrid's structure.

    mamba_layers: indices of the layers whose attention is a Mamba-2 mixer. mamba2_mixer: the
    ``Mamba2MixerConfig`` fields shared by those mixers. layout / seeding_mode: how they were chosen
    and initialised (recorded for reference).

    Raises ValueError (transformers may wrap it) for mamba_layers outside the model, mamba_layers
    without mamba2_mixer, or a mamba2_mixer.hidden_size other than hidden_size.
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
        problem = mixer_width_problem(self.mamba2_mixer, self.hidden_size)
        if problem is not None:
            raise ValueError(problem)
        self.mamba_layers = sorted(layers)

    @property
    def mixer_config(self) -> Mamba2MixerConfig:
        """The shared ``Mamba2MixerConfig`` of the Mamba-2 layers.

        Raises ValueError without one, or when a stored field is not a ``Mamba2MixerConfig`` field (a
        checkpoint written before the mixer's fields were renamed: convert it again from its teacher).
        A config a user writes meets ``mixer_fields_problem`` first (``llm_config_problem``,
        ``build_llm``): there a strange field is a typo, not an old checkpoint.
        """
        if self.mamba2_mixer is None:
            raise ValueError("this HybridLlamaConfig has no mamba2_mixer")
        known = {f.name for f in fields(Mamba2MixerConfig)}
        unknown = sorted(set(self.mamba2_mixer) - known)
        if unknown:
            raise ValueError(
                f"mamba2_mixer has fields {unknown} that Mamba2MixerConfig does not know (known: {sorted(known)}); "
                "this hybrid was saved by an older mambavlm: convert it again from its teacher"
            )
        return Mamba2MixerConfig(**self.mamba2_mixer)


class Mamba2AttentionAdapter(nn.Module):
    """A ``Mamba2Mixer`` with ``LlamaAttention``'s call signature: (B, L, D) -> ((B, L, D), None).

    Positions (RoPE) and the 4-D attention mask are not used: the recurrence is causal by
    construction. ``mamba_padding_mask`` (B, T) (1 = real token; its last L columns belong to this
    input) marks padding, which the mixer skips. With a ``HybridCache`` the mixer continues from, and
    updates, this layer's ``Mamba2State``.
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
            state = cache.mamba_state(self.layer_idx, self.mixer, batch, hidden_states.dtype)
        padding = None
        if mamba_padding_mask is not None:
            padding = mamba_padding_mask[:, -length:]
            padding = None if bool(padding.all()) else padding
        out = self.mixer(hidden_states, state, padding)
        if cache is not None:
            cache.advance(self.layer_idx, length)
        return out, None


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

    def new_cache(self) -> HybridCache:
        """An empty cache: K/V slots for the attention layers, a Mamba-2 state for each Mamba-2 layer."""
        return HybridCache(self.mamba_layers)

    def forward(
        self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, **kwargs: Any
    ) -> Any:
        """LLaMA's forward. With ``use_cache`` and no cache given, the cache is a fresh HybridCache;
        a 2-D attention_mask (B, T) also reaches the Mamba-2 layers as their padding mask."""
        use_cache = kwargs.get("use_cache")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and kwargs.get(CACHE_ARG) is None and kwargs.get("past_key_values") is None:
            kwargs[CACHE_ARG] = self.new_cache()
        if attention_mask is not None and attention_mask.dim() == 2:
            kwargs["mamba_padding_mask"] = attention_mask
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``generate`` with a fresh ``HybridCache`` unless one is given."""
        if kwargs.get(CACHE_ARG) is None and kwargs.get("past_key_values") is None and kwargs.get("use_cache", True):
            kwargs[CACHE_ARG] = self.new_cache()
        return super().generate(*args, **kwargs)


def mamba_mixers(model: nn.Module) -> dict[int, Mamba2Mixer]:
    """Layer index -> Mamba-2 mixer of a hybrid (a HybridLlamaForCausalLM or a MambaVLM holding one).

    Each is the module its layer calls: under FSDP with the mixers as units of their own, the FSDP
    unit around the mixer (calling it gathers the mixer's parameters)."""
    return {
        module.layer_idx: module.mixer
        for module in model.modules()
        if isinstance(module, Mamba2AttentionAdapter)
    }


def index_ranges(indices: Iterable[int]) -> str:
    """Layer indices written as ascending ranges of consecutive ones: [9, 0, 1, 2, 3, 5, 7, 8] ->
    ``0-3, 5, 7-9``; no indices -> an empty string."""
    ordered = sorted(set(indices))
    runs: list[list[int]] = []
    for index in ordered:
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return ", ".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)


def layout_summary(config: HybridLlamaConfig) -> str:
    """Which layers of a hybrid are Mamba-2 and how many keep attention, e.g. ``8 Mamba-2 (0-3, 5, 7-9),
    2 attention`` for 10 layers: the Mamba-2 indices as ``index_ranges``, the attention layers the rest."""
    mamba = sorted(config.mamba_layers or [])
    listed = f" ({index_ranges(mamba)})" if mamba else ""
    return f"{len(mamba)} Mamba-2{listed}, {config.num_hidden_layers - len(mamba)} attention"
