"""The ``mamba2`` LLM family: a stack of Mamba-2 blocks with an LM head, on this package's ``Mamba2Mixer``.

Block l: h <- h + mixer(RMSNorm(h)) (the residual stream in float32 with ``residual_in_fp32``), then a
final RMSNorm and ``lm_head``: transformers' ``Mamba2ForCausalLM`` / mamba_ssm's ``MambaLMHeadModel``
architecture, configured by transformers' ``Mamba2Config``, with the same parameter names and shapes
(``backbone.embeddings``, ``backbone.layers.N.norm``, ``backbone.layers.N.mixer.{in_proj, conv1d,
dt_bias, A_log, D, norm, out_proj}``, ``backbone.norm_f``, ``lm_head``), so transformers' Mamba-2
checkpoints load here and ours load in transformers (``model_type`` stays ``mamba2``).

Why our own model and not transformers' class: training, transformers-style ``generate`` and the
static CUDA-graph decoder then run one mixer (``mambavlm.llm.mamba2``) with one state type, and a
model's numbers do not move when transformers changes its Mamba-2 code path between releases.
The class is named ``SSDForCausalLM`` (Mamba-2's state space duality), not ``Mamba2ForCausalLM``:
transformers up to 5.17 routes the cache of any class whose name contains "mamba" through a
``cache_params`` argument of its own cache type, where ours is a ``HybridCache``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, Mamba2Config, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from mambavlm.llm.cache import CACHE_ARG, HybridCache
from mambavlm.llm.mamba2 import Mamba2Mixer, Mamba2MixerConfig, Mamba2State, inverse_softplus

__all__ = ["RMSNorm", "SSDBlock", "SSDForCausalLM", "SSDModel", "mixer_config_from"]


def mixer_config_from(config: Mamba2Config) -> Mamba2MixerConfig:
    """The ``Mamba2MixerConfig`` of a transformers ``Mamba2Config`` (mamba_ssm's conventions: fused
    in_proj, gate before the grouped RMSNorm, dt clamped to ``time_step_limit``).

    Raises ValueError when expand * hidden_size != num_heads * head_dim (the SSM width is ambiguous).
    """
    d_inner = int(config.expand * config.hidden_size)
    if d_inner != config.num_heads * config.head_dim:
        raise ValueError(
            f"Mamba2Config: expand * hidden_size = {d_inner} but num_heads * head_dim = "
            f"{config.num_heads} * {config.head_dim} = {config.num_heads * config.head_dim}; they must agree"
        )
    if config.hidden_act != "silu":
        raise ValueError(f"Mamba2Config.hidden_act must be 'silu' (the conv activation), got {config.hidden_act!r}")
    return Mamba2MixerConfig(
        hidden_size=config.hidden_size,
        num_heads=config.num_heads,
        head_dim=config.head_dim,
        d_state=config.state_size,
        n_groups=config.n_groups,
        d_conv=config.conv_kernel,
        conv_bias=config.use_conv_bias,
        norm_before_gate=False,
        dt_limit=tuple(config.time_step_limit),
        in_proj_bias=config.use_bias,
        out_proj_bias=config.use_bias,
        fused_projection=True,
        chunk_size=config.chunk_size,
        rms_eps=config.layer_norm_epsilon,
    )


class RMSNorm(nn.Module):
    """x / rms(x) * weight, in float32, rounded to x's dtype before the weight (transformers' RMSNorm)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: Tensor) -> Tensor:
        normed = F.rms_norm(hidden_states.float(), (hidden_states.shape[-1],), eps=self.variance_epsilon)
        return self.weight * normed.to(hidden_states.dtype)


class SSDBlock(GradientCheckpointingLayer):
    """h -> h + mixer(RMSNorm(h)): (B, L, D) -> (B, L, D), float32 when ``residual_in_fp32``."""

    def __init__(self, config: Mamba2Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = Mamba2Mixer(mixer_config_from(config))

    def forward(
        self, hidden_states: Tensor, state: Mamba2State | None = None, padding_mask: Tensor | None = None
    ) -> Tensor:
        residual = hidden_states.float() if self.residual_in_fp32 else hidden_states
        normed = self.norm(hidden_states.to(self.norm.weight.dtype))
        return residual + self.mixer(normed, state, padding_mask)


class SSDPreTrainedModel(PreTrainedModel):
    """Weights initialised as transformers initialises ``Mamba2ForCausalLM``: embeddings, in_proj and
    lm_head N(0, initializer_range); out_proj and conv U(+-1/sqrt(fan_in)) (out_proj / sqrt(layers)
    with ``rescale_prenorm_residual``); A_log = log(1..H); D = 1; dt log-uniform in
    [time_step_min, time_step_max] floored at time_step_floor; norms 1."""

    config_class = Mamba2Config
    config: Mamba2Config
    base_model_prefix = "backbone"
    _no_split_modules = ["SSDBlock"]
    supports_gradient_checkpointing = True
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """transformers applies this to every module, children before their parent: a mixer's own
        branch runs after its Linear layers got the generic one, and overrides what differs."""
        config = self.config
        if isinstance(module, Mamba2Mixer):
            heads = module.config.num_heads
            init.normal_(module.in_proj.weight, mean=0.0, std=config.initializer_range)
            bound = 1.0 / math.sqrt(module.out_proj.in_features)
            if config.rescale_prenorm_residual:
                bound /= math.sqrt(config.num_hidden_layers)
            init.uniform_(module.out_proj.weight, -bound, bound)
            for linear in (module.in_proj, module.out_proj):
                if linear.bias is not None:
                    init.zeros_(linear.bias)
            conv_bound = 1.0 / math.sqrt(module.conv1d.weight[0].numel())
            init.uniform_(module.conv1d.weight, -conv_bound, conv_bound)
            if module.conv1d.bias is not None:
                init.zeros_(module.conv1d.bias)
            init.copy_(module.A_log, torch.log(torch.arange(1, heads + 1, dtype=torch.float32)))
            init.ones_(module.D)
            low, high = math.log(config.time_step_min), math.log(config.time_step_max)
            dt = torch.exp(torch.rand(heads) * (high - low) + low).clamp(min=config.time_step_floor)
            init.copy_(module.dt_bias, inverse_softplus(dt))
            init.ones_(module.norm.weight)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, (nn.Linear, nn.Embedding)):  # lm_head, embeddings (a mixer's come first)
            init.normal_(module.weight, mean=0.0, std=config.initializer_range)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)


class SSDModel(SSDPreTrainedModel):
    """Embeddings, Mamba-2 blocks and the final norm: inputs (B, L) or embeddings (B, L, D) -> (B, L, D)."""

    def __init__(self, config: Mamba2Config) -> None:
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([SSDBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def forward(
        self,
        input_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: HybridCache | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        """-> (last hidden state (B, L, D), the per-layer inputs and the output when asked).

        attention_mask (B, T): 1 = real token; its last L columns mark padding in this input.
        ``cache`` continues from, and updates, each layer's ``Mamba2State``.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        hidden = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = hidden.shape[:2]
        padding_mask = None
        if attention_mask is not None:
            padding_mask = attention_mask[:, -length:]
            if bool(padding_mask.all()):
                padding_mask = None
        all_hidden: tuple[Tensor, ...] | None = () if output_hidden_states else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden += (hidden,)
            state = None
            if cache is not None:
                state = cache.mamba_state(layer.layer_idx, layer.mixer, batch, hidden.dtype)
            hidden = layer(hidden, state, padding_mask)
            if cache is not None:
                cache.advance(layer.layer_idx, length)
        hidden = self.norm_f(hidden)
        if all_hidden is not None:
            all_hidden += (hidden,)
        return hidden, all_hidden


class SSDForCausalLM(SSDPreTrainedModel, GenerationMixin):
    """The Mamba-2 causal LM: input_ids / inputs_embeds (B, L[, D]) -> logits (B, L, V) in float32.

    With labels (-100 = ignored) the loss is transformers' causal-LM loss (``loss_function``, which
    takes ``num_items_in_batch``). ``generate`` is transformers' own, with a ``HybridCache``.
    """

    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    def __init__(self, config: Mamba2Config) -> None:
        super().__init__(config)
        mixer_config_from(config)  # fail early on an inconsistent config
        self.backbone = SSDModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.backbone.embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def new_cache(self) -> HybridCache:
        """An empty cache with a Mamba-2 state slot for every layer."""
        return HybridCache(range(self.config.num_hidden_layers))

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits (B, L, V) (the last ``logits_to_keep`` positions when > 0) and, given labels, the loss.

        The cache arrives as ``cache`` or ``past_key_values`` (the name depends on the transformers
        release); with ``use_cache`` and none given, a fresh ``HybridCache`` is started.
        """
        cache = kwargs.pop("cache", None)
        legacy = kwargs.pop("past_key_values", None)
        cache = legacy if cache is None else cache
        kwargs.pop("cache_position", None)
        kwargs.pop("position_ids", None)
        kwargs.pop("return_dict", None)
        use_cache = (self.config.use_cache and not self.training) if use_cache is None else use_cache
        if cache is not None and not isinstance(cache, HybridCache):
            raise TypeError(f"{type(self).__name__} decodes with a HybridCache, got a {type(cache).__name__}")
        if use_cache and cache is None:
            cache = self.new_cache()
        hidden, all_hidden = self.backbone(
            input_ids, inputs_embeds, attention_mask, cache if use_cache else None, bool(output_hidden_states)
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep].to(self.lm_head.weight.dtype)).float()
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=all_hidden, **{CACHE_ARG: cache if use_cache else None}
        )

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``generate`` with a fresh ``HybridCache`` unless one is given."""
        if kwargs.get(CACHE_ARG) is None and kwargs.get("use_cache", True):
            kwargs[CACHE_ARG] = self.new_cache()
        return super().generate(*args, **kwargs)
