"""Static-cache decoding for LLaMA teachers and Mamba-2 / attention hybrids (any layout, linear too).

``HybridStaticDecoder(model)`` takes a transformers ``LlamaForCausalLM`` (every layer attention: the
teacher) or a ``HybridLlamaForCausalLM`` and allocates, per batch and capacity T (prompt + new tokens,
rounded up to ``CAPACITY_MULTIPLE``):

- per attention layer, K and V buffers (B, H_kv, T, D_head), as transformers' ``StaticCache``;
- per Mamba-2 layer, its mixer's ``Mamba2State`` (conv + SSM state and the constants a step reads,
  the type ``HybridCache`` holds);
- which key columns hold a real token (B, T), the next column to write and each row's next position.

The prefill writes the prompt into them (flash SDPA, causal, when no row is padded); each step writes
one K/V column per attention layer and attends over the whole buffer with the column mask, so its
shapes never change and it is captured into a CUDA graph once (``StaticDecoder``). The step's
attention (``mambavlm.ops.decode_attention``) reads each K/V head once for its group of query heads
(no ``repeat_kv``): two cuBLAS products split over the cache on CUDA (3.6x SDPA's speed at 100K tokens
on an H200), SDPA elsewhere, or split-KV FlexAttention (flash-decoding) when asked for (``attention``). The layers use the model's own
modules and weights (projections, rotary embedding, MLP, lm_head; each residual add + RMSNorm one
fused kernel on CUDA, ``add_rms_norm``) and the Mamba-2 mixers' own prefill (``forward`` with a state) and ``step``:
the tokens are those of HF ``generate`` with ``HybridCache`` / ``DynamicCache``.
"""

from __future__ import annotations

import copy
from typing import Any, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlamaForCausalLM, PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from mambavlm.generation.decoder import StaticDecoder
from mambavlm.llm.hybrid import Mamba2AttentionAdapter
from mambavlm.llm.mamba2 import Mamba2State
from mambavlm.ops.decode_attention import (
    SPLIT_KV_MIN_HEAD_DIM,
    DecodeAttention,
    decode_attention,
    default_decode_attention,
    split_kv_supported,
)
from mambavlm.ops.norm import add_rms_norm, rms_norm

__all__ = ["CAPACITY_MULTIPLE", "HybridStaticDecoder"]

CAPACITY_MULTIPLE = 256
"""The K/V buffers' length is a multiple of this (aligned for the attention kernels, reused across
calls of similar length)."""



class HybridStaticDecoder(StaticDecoder):
    """Prefill + per-token step of a LLaMA or LLaMA/Mamba-2 hybrid on a static KV + SSM cache.

    attention: how a step attends over the K/V cache (``decode_attention``): None (the default) picks
    ``default_decode_attention`` for the model's device at allocation, ``"gemm"`` (two cuBLAS batched
    products split over the cache) on CUDA and ``"sdpa"`` elsewhere; ``attention_mode`` is the mode in
    use. On an H200 at 100K tokens of context the 25 % hybrid took 5.51 ms per token with ``"gemm"``,
    19.8 with ``"sdpa"`` and 52.4 with ``"split_kv"`` (FlexAttention's flash-decoding kernel, compiled
    on CUDA: ``benchmarks/RESULTS.md`` c2). Raises ValueError for another mode, and at allocation for
    ``"split_kv"`` where the kernel cannot run (``split_kv_supported``).
    """

    supported_models = (LlamaForCausalLM,)

    def __init__(
        self, model: PreTrainedModel, cuda_graph: bool | None = None, attention: DecodeAttention | None = None
    ) -> None:
        if attention is not None and attention not in get_args(DecodeAttention):
            raise ValueError(f"attention must be 'sdpa', 'split_kv' or 'gemm', got {attention!r}")
        super().__init__(model, cuda_graph)
        self.attention: DecodeAttention | None = attention
        self.attention_mode: DecodeAttention = attention or default_decode_attention(model.device)
        config = model.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or config.num_attention_heads
        self.layers = list(model.model.layers)
        self.adapters = {
            i: layer.self_attn for i, layer in enumerate(self.layers) if isinstance(layer.self_attn, Mamba2AttentionAdapter)
        }
        self.attention_layers = [i for i in range(len(self.layers)) if i not in self.adapters]
        self._kv: dict[int, tuple[Tensor, Tensor]] = {}
        self._ssm: dict[int, Mamba2State] = {}
        self._key_valid = self._write_index = self._positions = torch.empty(0)

    def capacity_for(self, needed: int) -> int:
        if not self.attention_layers:
            return 0
        return -(-needed // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE

    def __deepcopy__(self, memo: dict[int, Any]) -> HybridStaticDecoder:
        return type(self)(copy.deepcopy(self.model, memo), self.cuda_graph, self.attention)

    def _allocate(self, batch: int, capacity: int) -> None:
        weight = self.model.get_input_embeddings().weight
        device, dtype = weight.device, weight.dtype
        head_dims = {self.layers[i].self_attn.head_dim for i in self.attention_layers}
        supported = all(split_kv_supported(device, head_dim) for head_dim in head_dims)
        self.attention_mode = self.attention or default_decode_attention(device)
        if self.attention_mode == "split_kv" and not supported:
            raise ValueError(f"attention='split_kv': FlexAttention on {device.type} cannot take head dimension "
                             f"{min(head_dims)} (at least {SPLIT_KV_MIN_HEAD_DIM}); use 'sdpa'")
        self._kv = {}
        for i in self.attention_layers:
            shape = (batch, self.num_kv_heads, capacity, self.layers[i].self_attn.head_dim)
            self._kv[i] = (torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
        self._ssm = {i: adapter.mixer.allocate_state(batch, device, dtype) for i, adapter in self.adapters.items()}
        self._key_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self._write_index = torch.zeros(1, dtype=torch.long, device=device)
        self._positions = torch.zeros(batch, dtype=torch.long, device=device)

    def _mlp(self, index: int, mix: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """The rest of decoder layer ``index`` after token mixing: + residual, norm, MLP. Returns the
        MLP's output and the residual stream it is to be added to (at the next layer's norm)."""
        layer = self.layers[index]
        normed, residual = add_rms_norm(layer.post_attention_layernorm, mix, residual, False, fused=True)
        return layer.mlp(normed), residual

    def _logits(self, hidden: Tensor, fused: bool) -> Tensor:
        """Last hidden state (B, D) -> float32 logits (B, V)."""
        return self.model.lm_head(rms_norm(self.model.model.norm, hidden, fused)).float()

    def _qkv(self, attn: nn.Module, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, D) -> rotated q (B, H, L, Dh), rotated k and v (B, H_kv, L, Dh)."""
        shape = (*x.shape[:2], -1, attn.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def _prefill(self, inputs_embeds: Tensor, attention_mask: Tensor | None) -> Tensor:
        batch, length, _ = inputs_embeds.shape
        real = None if attention_mask is None else attention_mask.bool()
        if real is None:
            positions = torch.arange(length, device=inputs_embeds.device).expand(batch, length)
        else:
            positions = (real.long().cumsum(-1) - 1).masked_fill(~real, 1)  # as HF generate
        if self.attention_layers:
            self._key_valid.zero_()
            self._key_valid[:, :length] = True if real is None else real
        self._write_index.fill_(length)
        self._positions.copy_(positions[:, -1] + 1)
        mask = None
        if real is not None:
            causal = torch.ones(length, length, dtype=torch.bool, device=real.device).tril()
            # A pad query attends to itself too, so that no row of the mask is empty (no NaN).
            mask = (causal & real[:, None, :]) | torch.eye(length, dtype=torch.bool, device=real.device)
            mask = mask[:, None]
        cos, sin = self.model.model.rotary_emb(inputs_embeds, positions)
        hidden, residual = inputs_embeds, None
        for i, layer in enumerate(self.layers):
            x, residual = add_rms_norm(layer.input_layernorm, hidden, residual, False, fused=True)
            if i in self.adapters:
                state = self._ssm[i]
                self.adapters[i].mixer.reset_state(state)
                mix = self.adapters[i].mixer(x, state, real)
            else:
                attn = layer.self_attn
                q, k, v = self._qkv(attn, x, cos, sin)
                keys, values = self._kv[i]
                keys[:, :, :length] = k
                values[:, :, :length] = v
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=mask is None, scale=attn.scaling, enable_gqa=True
                )
                mix = attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
            hidden, residual = self._mlp(i, mix, residual)
        return self._logits(residual[:, -1] + hidden[:, -1], fused=False)

    def _step_eager(self, input_ids: Tensor) -> Tensor:
        hidden = self.model.get_input_embeddings()(input_ids)[:, None]  # (B, 1, D)
        batch = hidden.shape[0]
        cos, sin = self.model.model.rotary_emb(hidden, self._positions[:, None])
        if self.attention_layers:
            self._key_valid.index_fill_(1, self._write_index, True)
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = add_rms_norm(layer.input_layernorm, hidden, residual, False, fused=True)
            if i in self.adapters:
                mix = self.adapters[i].mixer.step(x[:, 0], self._ssm[i])[:, None]
            else:
                attn = layer.self_attn
                q, k, v = self._qkv(attn, x, cos, sin)
                keys, values = self._kv[i]
                keys.index_copy_(2, self._write_index, k)
                values.index_copy_(2, self._write_index, v)
                out = decode_attention(q, keys, values, self._key_valid, attn.scaling, self.attention_mode)  # (B, H, 1, Dh)
                mix = attn.o_proj(out.reshape(batch, 1, -1))
            hidden, residual = self._mlp(i, mix, residual)
        self._write_index.add_(1)
        self._positions.add_(1)
        return self._logits(residual[:, 0] + hidden[:, 0], fused=True)
