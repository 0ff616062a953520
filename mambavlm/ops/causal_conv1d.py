"""Causal depthwise 1D convolution (Mamba's short conv), for a whole sequence and one decoding step.

For width W, output t of channel d is ``bias[d] + sum_k weight[d, k] * x[d, t - (W - 1) + k]``
(inputs before the start are 0), optionally followed by SiLU. Decoding keeps a state (B, D, W) of the
last W inputs; ``causal_conv1d_state`` builds it after a full-sequence pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mambavlm.ops.dispatch import use_kernels

__all__ = ["causal_conv1d", "causal_conv1d_state", "causal_conv1d_update"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_KERNEL_WIDTHS = range(2, 5)
_ACTIVATIONS = (None, "silu")


def _check_weight(dim: int, weight: Tensor, bias: Tensor | None, activation: str | None) -> None:
    """Raise ValueError naming the argument that does not fit ``dim`` channels."""
    if weight.dim() != 2 or weight.shape[0] != dim or weight.shape[1] == 0:
        raise ValueError(f"weight must be (D, W) = ({dim}, W) with W >= 1, got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (dim,):
        raise ValueError(f"bias must be (D,) = ({dim},), got shape {tuple(bias.shape)}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")


def _kernel_supports(x: Tensor, weight: Tensor) -> bool:
    """Input kinds the causal_conv1d CUDA kernels accept (half/float, width 2..4)."""
    return x.dtype in _KERNEL_DTYPES and weight.dtype in _KERNEL_DTYPES and weight.shape[1] in _KERNEL_WIDTHS


def _kernel_layout(x: Tensor) -> Tensor:
    """x (B, D, L) in a layout the kernel accepts: sequence-contiguous, or channel-last with batch and
    sequence strides that are multiples of 8 (else a contiguous copy)."""
    if x.stride(2) == 1:
        return x
    if x.stride(1) == 1 and x.stride(0) % 8 == 0 and x.stride(2) % 8 == 0:
        return x
    return x.contiguous()


def _activate(y: Tensor, activation: str | None) -> Tensor:
    """SiLU for ``"silu"``, identity for None."""
    return F.silu(y) if activation == "silu" else y


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None) -> Tensor:
    """Causal depthwise conv of x (B, D, L) with weight (D, W), bias (D,) -> (B, D, L) in x's dtype.

    Uses causal_conv1d's ``causal_conv1d_fn`` when ``use_kernels(x, "causal_conv1d")`` and the kernel
    takes these inputs; otherwise ``F.conv1d`` with W - 1 zeros of left padding, in weight's dtype.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be (B, D, L), got shape {tuple(x.shape)}")
    _check_weight(x.shape[1], weight, bias, activation)
    bias = None if bias is None else bias.to(weight.dtype)
    if use_kernels(x, "causal_conv1d") and _kernel_supports(x, weight):
        from causal_conv1d import causal_conv1d_fn

        return causal_conv1d_fn(_kernel_layout(x), weight, bias, activation=activation)
    dim, width = weight.shape
    y = F.conv1d(x.to(weight.dtype), weight.unsqueeze(1), bias, padding=width - 1, groups=dim)
    return _activate(y[..., : x.shape[-1]], activation).to(x.dtype)


def causal_conv1d_update(
    x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None
) -> Tensor:
    """One decoding step: x (B, D), conv_state (B, D, W) -> y (B, D) in x's dtype.

    ``conv_state`` holds the last W inputs, oldest first; it is updated in place (shifted left by one,
    x written last) and y is the conv over the updated state. Uses causal_conv1d's
    ``causal_conv1d_update`` kernel when ``use_kernels(x, "causal_conv1d")`` and it takes these inputs.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be (B, D), got shape {tuple(x.shape)}")
    _check_weight(x.shape[1], weight, bias, activation)
    expected_state = (x.shape[0], x.shape[1], weight.shape[1])
    if tuple(conv_state.shape) != expected_state:
        raise ValueError(f"conv_state must be (B, D, W) = {expected_state}, got {tuple(conv_state.shape)}")
    bias = None if bias is None else bias.to(weight.dtype)
    if use_kernels(x, "causal_conv1d") and _kernel_supports(x, weight) and conv_state.dtype == x.dtype:
        from causal_conv1d import causal_conv1d_update as causal_conv1d_update_kernel

        return causal_conv1d_update_kernel(x, conv_state, weight, bias, activation)
    conv_state.copy_(conv_state.roll(-1, dims=-1))
    conv_state[:, :, -1] = x
    y = (conv_state.to(weight.dtype) * weight).sum(-1)
    if bias is not None:
        y = y + bias
    return _activate(y, activation).to(x.dtype)


def causal_conv1d_state(x: Tensor, width: int) -> Tensor:
    """Decoding state (B, D, width) after a prefill of x (B, D, L): its last ``width`` inputs.

    Left zero-padded when L < width, matching the zeros the causal conv sees before the start.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be (B, D, L), got shape {tuple(x.shape)}")
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    kept = min(x.shape[-1], width)
    state = x.new_zeros(x.shape[0], x.shape[1], width)
    state[..., width - kept :] = x[..., x.shape[-1] - kept :]
    return state
