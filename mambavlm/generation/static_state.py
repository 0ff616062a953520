"""The static decoding state of one Mamba mixer: buffers allocated once, updated in place per token."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["MixerState"]


@dataclass(frozen=True)
class MixerState:
    """What one mixer's step reads and writes for a batch of B sequences.

    conv: the last W inputs of the causal conv, oldest first, (B, C, W) in the model's dtype.
    ssm: the SSM state in float32, (B, D_inner, N) for Mamba-1, (B, H, P, N) for Mamba-2.
    A, dt_bias: float32 copies of the mixer's weights (A = -exp(A_log)), refreshed by every prefill,
    so that a step does not recompute them from the weights for each token.
    The tensors keep their storage for the decoder's lifetime (a CUDA graph reads their addresses);
    prefill and step write into them in place, like mamba_ssm's ``allocate_inference_cache``.
    """

    conv: Tensor
    ssm: Tensor
    A: Tensor
    dt_bias: Tensor
