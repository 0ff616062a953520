"""Turn a trained LLaMA-family Transformer into a hybrid: chosen attention layers become seeded Mamba-2 mixers.

``convert_llama`` turns a transformers ``LlamaForCausalLM`` into a ``HybridLlamaForCausalLM``: the
``self_attn`` of every layer the layout names is replaced by a Mamba-2 mixer seeded from that
attention (``seed_mamba2_from_attention``, mmMamba sec. 4.1 / MaTVLM sec. 3.2); embeddings, norms,
MLPs, the other attention layers and the LM head are copied unchanged. ``convert_vlm`` does the same
to the LLM inside a ``MambaVLM``.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mambavlm.configuration import MambaVLMConfig
from mambavlm.distill.layouts import HybridLayout
from mambavlm.distill.seeding import SEEDING_MODES, seed_mamba2_from_attention
from mambavlm.llm.hybrid import HybridLlamaConfig, HybridLlamaForCausalLM
from mambavlm.llm.mamba2 import Mamba2MixerConfig
from mambavlm.model import MambaVLM

__all__ = ["convert_llama", "convert_vlm"]


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
    mixer_options: dict[str, Any] | None = None,
) -> HybridLlamaForCausalLM:
    """A hybrid copy of ``llama``: the layout's layers get Mamba-2 mixers seeded from their attention
    (``mode`` "mmmamba" or "matvlm", ``mixer_options`` overriding the mode's mixer options); every other
    weight is copied. ``llama`` is left unchanged.

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
    mixers = {
        i: seed_mamba2_from_attention(llama.model.layers[i].self_attn, mode, generator, mixer_options)
        for i in new_layers
    }
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
    vlm: MambaVLM,
    layout: HybridLayout | str,
    mode: str = "mmmamba",
    generator: torch.Generator | None = None,
    mixer_options: dict[str, Any] | None = None,
) -> MambaVLM:
    """A ``MambaVLM`` copy whose LLaMA-family LLM is converted by ``convert_llama``, named ``vlm``'s name +
    ``-hybrid``; the vision encoders, projector and tokenizer are copies of ``vlm``'s (``vlm`` is left
    unchanged)."""
    if not isinstance(vlm, MambaVLM):
        raise TypeError(f"convert_vlm needs a MambaVLM, got {type(vlm).__name__}")
    if vlm.config.llm.family != "llama":
        raise ValueError(f"only a LLaMA-family LLM can be converted; this MambaVLM's llm.family is {vlm.config.llm.family!r}")
    llm = convert_llama(vlm.llm, layout, mode, generator, mixer_options)
    spec = vlm.config.spec
    spec.name = f"{spec.name}-hybrid"  # the student, not the teacher, in describe, chat and the demo
    spec.llm.family = "hybrid_llama"
    spec.llm.config = {}
    student = MambaVLM(
        MambaVLMConfig.from_spec(spec, llm.config), copy.deepcopy(vlm.vision), copy.deepcopy(vlm.projector), llm
    )
    student.attach_tokenizer(vlm.tokenizer)
    return student
