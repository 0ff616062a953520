"""The training forward of a Mamba-1 LM (transformers' ``MambaForCausalLM``) laid out as mamba_ssm lays
out its own: block boundaries as one fused residual add + RMSNorm, and the LM head only where a label
is scored.

transformers' ``MambaBlock`` computes ``residual + mixer(norm(residual))`` in separate PyTorch ops
(a float32 cast, the RMSNorm's five element-wise passes, the add), forward and backward, and its
``MambaForCausalLM`` projects every position to the vocabulary and upcasts those logits to float32
before the loss. mamba_ssm's ``MixerModel`` instead carries the residual stream beside the block
output and fuses each boundary's add and norm into one Triton kernel with its own backward
(``layer_norm_fn(..., prenorm=True)``). ``mamba_lm_hidden_states`` runs transformers' own blocks'
weights and mixers that way (``mambavlm.ops.norm.add_rms_norm``); ``answer_token_loss`` applies the
LM head to the positions with a label only (in a VLM batch the 1458 visual positions never carry
one) and reduces as transformers does (``num_items_in_batch``). The loss and gradients equal
transformers' forward in float32 (tests); with the fused kernel on CUDA they differ by rounding, as
mamba_ssm's numerics differ from transformers' (the residual is normalised before it is rounded).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from transformers import MambaForCausalLM

from mambavlm.llm.tokenizer import IGNORE_INDEX
from mambavlm.ops.norm import add_rms_norm, rms_norm

__all__ = ["answer_token_loss", "mamba_lm_hidden_states", "shards_parameters"]


def shards_parameters(lm: MambaForCausalLM) -> bool:
    """Whether ``lm``'s blocks hold sharded parameters that only their own forward gathers: FSDP
    (either API) units, or DeepSpeed ZeRO-3 partitions. ``mamba_lm_hidden_states`` reads each block's
    norm and mixer directly, around the block's forward, so such an LM must train through its own
    forward (transformers' layout) instead."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if any(isinstance(m, (FullyShardedDataParallel, FSDPModule)) for m in lm.modules()):
        return True
    return any(hasattr(p, "ds_id") for p in lm.parameters())


def mamba_lm_hidden_states(
    lm: MambaForCausalLM, inputs_embeds: Tensor, attention_mask: Tensor | None, fused: bool = True
) -> Tensor:
    """inputs_embeds (B, L, D) -> the final hidden states (B, L, D) after ``norm_f``, as
    ``lm.backbone`` computes them, in ``norm_f``'s dtype (float32 with ``residual_in_fp32``).

    Each block boundary is ``add_rms_norm`` (mamba_ssm's fused kernel on CUDA with ``fused``), each
    mixer is the block's own ``MambaMixer`` (mamba_ssm's fused ``mamba_inner_fn`` in training), given
    ``attention_mask`` as transformers' block gives it. With the backbone's gradient checkpointing on
    (``gradient_checkpointing_enable``) in training, each block's add + norm + mixer is recomputed in
    the backward pass (non-reentrant), as transformers checkpoints each ``MambaBlock``.
    """
    backbone = lm.backbone
    residual_in_fp32 = lm.config.residual_in_fp32
    checkpointed = backbone.gradient_checkpointing and backbone.training and torch.is_grad_enabled()

    def block(layer: torch.nn.Module, hidden: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        normed, residual = add_rms_norm(layer.norm, hidden, residual, residual_in_fp32, fused=fused)
        return layer.mixer(normed, attention_mask=attention_mask), residual

    hidden, residual = inputs_embeds, None
    for layer in backbone.layers:
        if checkpointed:
            hidden, residual = checkpoint(block, layer, hidden, residual, use_reentrant=False)
        else:
            hidden, residual = block(layer, hidden, residual)
    stream = residual + hidden
    if residual_in_fp32:
        stream = stream.to(torch.float32)
    return rms_norm(backbone.norm_f, stream)


def answer_token_loss(
    lm: MambaForCausalLM, hidden: Tensor, labels: Tensor, num_items_in_batch: Tensor | int | None = None
) -> Tensor:
    """The causal-LM loss of hidden states (B, L, D) against labels (B, L) (-100: not scored), with
    the LM head applied only at the T positions whose next token is scored: (T, D) @ (D, V).

    Reduced as transformers' ``ForCausalLMLoss``: float32 logits, the sum of the token losses divided
    by ``num_items_in_batch`` (the scored tokens of the whole optimiser step), or their mean without it.
    """
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    head = lm.get_output_embeddings()
    logits = head(hidden[:, :-1][scored].to(head.weight.dtype)).float()
    if num_items_in_batch is None:
        return F.cross_entropy(logits, targets[scored])
    loss = F.cross_entropy(logits, targets[scored], reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
