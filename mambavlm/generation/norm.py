"""RMSNorm as transformers' Mamba / LLaMA modules compute it, in fewer kernels per decoded token."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mambavlm.ops.dispatch import use_kernels

__all__ = ["rms_norm"]


def rms_norm(norm: nn.Module, hidden: Tensor, fused: bool = False) -> Tensor:
    """``norm.weight * (x / rms(x) in float32)`` in x's dtype, for a transformers RMSNorm module
    (``MambaRMSNorm``, ``LlamaRMSNorm``: ``weight`` and ``variance_epsilon``).

    fused: on CUDA with mamba_ssm installed, its Triton RMSNorm: one kernel, which rounds once
    (after the weight) where transformers rounds before and after it. It costs ~0.25 ms of Python
    per call, so it pays inside a CUDA graph (the decoding step), not in an eager prefill. Otherwise
    ``F.rms_norm`` with transformers' rounding.
    """
    if fused and use_kernels(hidden, "mamba_ssm") and hidden.dtype == norm.weight.dtype:
        from mamba_ssm.ops.triton.layer_norm import rms_norm_fn

        return rms_norm_fn(hidden, norm.weight, None, eps=norm.variance_epsilon)
    normed = F.rms_norm(hidden.float(), (hidden.shape[-1],), eps=norm.variance_epsilon)
    return norm.weight * normed.to(hidden.dtype)
