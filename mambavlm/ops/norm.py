"""RMSNorm as transformers' Mamba / LLaMA modules compute it, in fewer kernels: alone, or fused with
the residual add before it (the pre-norm block boundary, as mamba_ssm's ``Block`` computes it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambavlm.ops.dispatch import use_kernels

__all__ = ["add_rms_norm", "rms_norm"]


def rms_norm(norm: nn.Module, hidden: Tensor, fused: bool = False) -> Tensor:
    """``norm.weight * (x / rms(x) in float32)`` in x's dtype, for a transformers RMSNorm module
    (``MambaRMSNorm``, ``LlamaRMSNorm``: ``weight`` and ``variance_epsilon``).

    fused: on CUDA with mamba_ssm installed, its Triton RMSNorm: one kernel, which rounds once
    (after the weight) where transformers rounds before and after it. Its Python costs more than a
    native op's, so it pays inside a CUDA graph (the decoding step) or on large tensors. Otherwise
    ``F.rms_norm`` with transformers' rounding.
    """
    if fused and use_kernels(hidden, "mamba_ssm") and hidden.dtype == norm.weight.dtype:
        from mamba_ssm.ops.triton.layer_norm import rms_norm_fn

        return rms_norm_fn(hidden, norm.weight, None, eps=norm.variance_epsilon)
    normed = F.rms_norm(hidden.float(), (hidden.shape[-1],), eps=norm.variance_epsilon)
    return norm.weight * normed.to(hidden.dtype)


def add_rms_norm(
    norm: nn.Module, x: Tensor, residual: Tensor | None, residual_in_fp32: bool, fused: bool = False
) -> tuple[Tensor, Tensor]:
    """The pre-norm block boundary: ``residual = residual + x``, then the next block's input
    ``norm(residual)``.

    x: (..., D), the last block's output (or the embeddings, with ``residual=None``); residual:
    (..., D) or None. Returns (normed (..., D) in the norm weight's dtype, the new residual (..., D):
    float32 when ``residual_in_fp32``, else the dtypes' promotion, as transformers' ``MambaBlock`` /
    ``LlamaDecoderLayer`` keep it). The norm reads the residual rounded to the weight's dtype, as
    transformers' blocks do.

    fused: on CUDA with mamba_ssm installed, its Triton ``layer_norm_fn(..., residual=...,
    prenorm=True, is_rms_norm=True)``, the kernel behind mamba_ssm's ``Block``: one read of x and the
    residual and one write of each output, where the unfused path makes five passes. It normalises
    the float32 residual without rounding it first and rounds once after the weight (mamba_ssm's
    numerics: equal to transformers' in float32, within rounding in bf16). It has its own backward
    (training), and under autocast (float32 weights, bf16 compute) it takes x in the compute dtype
    and returns ``normed`` in it.
    """
    dtype = norm.weight.dtype
    residual_dtype = torch.float32 if residual_in_fp32 else (x.dtype if residual is None else residual.dtype)
    autocast = torch.is_autocast_enabled(x.device.type)
    if (
        fused
        and use_kernels(x, "mamba_ssm")
        and (x.dtype == dtype or autocast)
        and residual_dtype in (x.dtype, dtype, torch.float32)
    ):
        from mamba_ssm.ops.triton.layer_norm import layer_norm_fn

        if residual is not None and residual.dtype != residual_dtype:
            residual = residual.to(residual_dtype)
        normed, residual = layer_norm_fn(
            x,
            norm.weight,
            None,
            residual=residual,
            eps=norm.variance_epsilon,
            prenorm=True,
            residual_in_fp32=residual_in_fp32,
            is_rms_norm=True,
        )
        return normed, residual
    residual = x if residual is None else residual + x
    if residual_in_fp32:
        residual = residual.to(torch.float32)
    return rms_norm(norm, residual.to(dtype)), residual
