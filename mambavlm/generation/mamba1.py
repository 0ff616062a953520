"""transformers' ``MambaMixer`` (Mamba-1) run on explicit static state: a prefill and a one-token step.

Both read the mixer's own weights, so they follow it through training or loading; they compute what
``MambaMixer.forward`` computes with a cache (same masking of padded positions, same fp32 SSM
parameters), using this package's ops: ``causal_conv1d`` + ``selective_scan`` for the prompt,
``causal_conv1d_update`` + ``selective_state_update`` per token (the CUDA kernels where installed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.mamba.modeling_mamba import MambaMixer

from mambavlm.ops.causal_conv1d import (
    causal_conv1d,
    causal_conv1d_state,
    causal_conv1d_update,
)
from mambavlm.ops.mamba_step import (
    conv_x_proj,
    dt_state_update,
    norm_in_proj_conv,
    out_proj_residual,
)
from mambavlm.ops.selective_scan import selective_scan
from mambavlm.ops.selective_state_update import selective_state_update

__all__ = ["MambaState", "StatefulMambaMixer"]


@dataclass(frozen=True)
class MambaState:
    """What one Mamba-1 mixer's step reads and writes for a batch of B sequences.

    conv: the last W inputs of the causal conv, oldest first, (B, D_inner, W) in the model's dtype.
    ssm: the SSM state (B, D_inner, N) in float32. A (D_inner, N), dt_bias (D_inner,): float32 copies
    of the weights (A = -exp(A_log)), refreshed by every prefill. The tensors keep their storage for
    the decoder's lifetime (a CUDA graph reads their addresses), like mamba_ssm's
    ``allocate_inference_cache``.
    """

    conv: Tensor
    ssm: Tensor
    A: Tensor
    dt_bias: Tensor


def _batch_view(flat: Tensor, batch: int) -> Tensor:
    """(C, B L) -> (B, C, L), a view with unit stride along L."""
    return flat.view(flat.shape[0], batch, -1).transpose(0, 1)


def _flat_view(x: Tensor) -> Tensor:
    """(B, C, L) -> (C, B L): a view when x is laid out as ``_batch_view`` makes it, else a copy."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


class StatefulMambaMixer:
    """Prefill and single-token step of one ``MambaMixer`` over a ``MambaState``.

    State: conv (B, D_inner, W) in the model's dtype, ssm (B, D_inner, N), A (D_inner, N) and
    dt_bias (D_inner,) in float32.
    """

    def __init__(self, mixer: MambaMixer) -> None:
        if not isinstance(mixer, MambaMixer):
            raise TypeError(f"expected a transformers MambaMixer, got {type(mixer).__name__}")
        self.mixer = mixer

    def allocate(self, batch: int) -> MambaState:
        """Zeroed state for ``batch`` sequences on the mixer's device."""
        m = self.mixer
        weight = m.in_proj.weight
        return MambaState(
            conv=weight.new_zeros(batch, m.intermediate_size, m.conv_kernel_size),
            ssm=torch.zeros(batch, m.intermediate_size, m.ssm_state_size, device=weight.device),
            A=torch.zeros(m.intermediate_size, m.ssm_state_size, device=weight.device),
            dt_bias=torch.zeros(m.intermediate_size, device=weight.device),
        )

    def _split_ssm_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Conv output x (..., D_inner) -> dt before bias (..., D_inner), B and C (..., N)."""
        m = self.mixer
        dt, B, C = torch.split(m.x_proj(x), [m.time_step_rank, m.ssm_state_size, m.ssm_state_size], dim=-1)
        return F.linear(dt, m.dt_proj.weight), B, C

    def prefill(
        self, hidden: Tensor, attention_mask: Tensor | None, state: MambaState, hidden_zeroed: bool = False
    ) -> Tensor:
        """hidden (B, L, D) (normed), a left-padding attention_mask (B, L) or None -> (B, L, D); writes
        ``state``.

        Padding: transformers' ``MambaMixer`` zeroes the masked positions of its input and of the conv
        output. Here the input is zeroed (unless ``hidden_zeroed``: the caller's hidden is already zero
        there) and, in place of the D_inner-wide conv output, the scan's (B, N, L) input matrix B: a
        zero B leaves the state at zero through the padding before a prompt (h_t = exp(dt A) h_{t-1}
        + dt B_t u_t), so every real position computes what transformers computes (tested), for a
        sixteenth of the memory traffic. Outputs at padded positions are not transformers': with
        bias-free projections (Mamba's) and a zero input they are zero (z = 0 gates them).

        Laid out as mamba_ssm's ``Mamba.forward`` lays out its inference prefill: each projection is one
        2-D GEMM over all B L positions, feature-major, ``W @ h^T`` -> (D_out, B L), and the D_inner-wide
        tensors (x, z, dt, y) are views of it as (B, D_inner, L) with unit stride along L: the layout
        the conv and scan kernels read (and keep for their outputs), so no D_inner-wide tensor is copied
        to change layout. A batched ``W @ h.mT`` instead leaves transposed results the kernels must copy
        (measured on an H200, batch 32 x 1478 tokens: 47 ms per sample with those copies, 31 for
        mamba_ssm's own forward).
        """
        m = self.mixer
        state.A.copy_(-torch.exp(m.A_log.float()))
        state.dt_bias.copy_(m.dt_proj.bias)
        dtype = hidden.dtype
        batch, length, _ = hidden.shape
        if attention_mask is not None and not hidden_zeroed:
            hidden = hidden * attention_mask[:, :, None].to(dtype)
        xz = m.in_proj.weight @ hidden.reshape(batch * length, -1).mT  # (2 D_inner, B L)
        if m.in_proj.bias is not None:
            xz = xz + m.in_proj.bias[:, None]
        x, z = _batch_view(xz, batch).chunk(2, dim=1)  # (B, D_inner, L) each
        state.conv.copy_(causal_conv1d_state(x, m.conv_kernel_size))
        x = causal_conv1d(x, m.conv1d.weight.squeeze(1), m.conv1d.bias, activation=m.activation)
        x_dbl = m.x_proj.weight @ _flat_view(x)  # (R + 2N, B L)
        dt, B, C = torch.split(x_dbl, [m.time_step_rank, m.ssm_state_size, m.ssm_state_size], dim=0)
        B = _batch_view(B, batch)
        B = B.contiguous() if attention_mask is None else B * attention_mask[:, None, :].to(B.dtype)
        y, last_state = selective_scan(
            x,
            _batch_view(m.dt_proj.weight @ dt, batch),  # (B, D_inner, L), bias added in the scan
            state.A,
            B,
            _batch_view(C, batch).contiguous(),
            D=m.D.float(),
            z=z,
            delta_bias=state.dt_bias,
            delta_softplus=True,
            return_last_state=True,
        )
        state.ssm.copy_(last_state)
        out = F.linear(_flat_view(y.to(dtype)).mT, m.out_proj.weight, m.out_proj.bias)  # (B L, D)
        return out.view(batch, length, -1)

    def step_fused(self, hidden: Tensor, state: MambaState) -> Tensor:
        """``step`` with everything between ``in_proj`` and ``out_proj`` in two Triton kernels
        (``mambavlm.ops.mamba_step``): dt, B and C stay float32 between them. Raises ValueError for
        an ``x_proj`` with a bias or an activation other than SiLU or none (not Mamba's)."""
        m = self.mixer
        if m.x_proj.bias is not None or m.activation not in ("silu", None):
            raise ValueError("the fused step supports Mamba's mixer: x_proj without bias, SiLU or no conv activation")
        xz = m.in_proj(hidden)  # (B, 2 D_inner)
        x, z = xz.chunk(2, dim=-1)
        x, xdbl = conv_x_proj(x, state.conv, m.conv1d.weight.squeeze(1), m.conv1d.bias, m.x_proj.weight,
                              silu=m.activation == "silu")
        y = dt_state_update(xdbl, x, z, m.dt_proj.weight, state.dt_bias, state.A, m.D, state.ssm)
        return m.out_proj(y)

    def step_block(
        self, residual: Tensor, norm: nn.Module, state: MambaState, xdbl: Tensor, next_weight: Tensor | None = None,
        sum_squares: tuple[Tensor | None, Tensor] | None = None,
    ) -> None:
        """The whole block for one token in three Triton kernels: ``residual += mixer(norm(residual))``,
        residual (B, D) float32 updated in place, B <= ``FUSED_GEMV_MAX_BATCH``; xdbl (B, R + 2N)
        float32, zero on entry and left zero (for the next block: one buffer serves every layer).
        ``next_weight``: the weight read after this block (the next block's in_proj, or lm_head's), whose
        first megabytes out_proj's kernel prefetches into the L2 (in_proj's prefetches out_proj's).
        ``sum_squares``: (the residual rows' sums of squares as the previous block's out_proj left them,
        or None to compute them; a (B,) float32 buffer, any contents, that in_proj zeroes and out_proj
        sums this block's output rows' squares into, for the next block). The
        norm's output is rounded to the weights' dtype, and so is ``out_proj``'s before the add (the
        unfused block's roundings with a float32 residual stream). Raises ValueError for projections
        with a bias, or the mixers ``step_fused`` refuses."""
        m = self.mixer
        if m.in_proj.bias is not None or m.out_proj.bias is not None:
            raise ValueError("step_block takes bias-free in_proj and out_proj (Mamba's)")
        if m.x_proj.bias is not None or m.activation not in ("silu", None):
            raise ValueError("the fused step supports Mamba's mixer: x_proj without bias, SiLU or no conv activation")
        squares_in, squares_out = sum_squares if sum_squares is not None else (None, None)
        x, z = norm_in_proj_conv(residual, norm.weight, norm.variance_epsilon, m.in_proj.weight, state.conv,
                                 m.conv1d.weight.squeeze(1), m.conv1d.bias, m.x_proj.weight,
                                 silu=m.activation == "silu", xdbl=xdbl, prefetch=m.out_proj.weight,
                                 sum_squares=squares_in, zero_sum_squares=squares_out)
        y = dt_state_update(xdbl, x, z, m.dt_proj.weight, state.dt_bias, state.A, m.D, state.ssm)
        out_proj_residual(y, m.out_proj.weight, residual, zero=xdbl, prefetch=next_weight,
                          sum_squares=squares_out)

    def step(self, hidden: Tensor, state: MambaState) -> Tensor:
        """hidden (B, D) (normed) -> (B, D) for one new token; updates ``state`` in place."""
        m = self.mixer
        x, z = m.in_proj(hidden).chunk(2, dim=-1)  # (B, D_inner) each
        x = causal_conv1d_update(x, state.conv, m.conv1d.weight.squeeze(1), m.conv1d.bias, activation=m.activation)
        dt, B, C = self._split_ssm_inputs(x)
        y = selective_state_update(
            state.ssm,
            x,
            dt,
            state.A,
            B,
            C,
            D=m.D,
            z=z,
            dt_bias=state.dt_bias,
            dt_softplus=True,
        )
        return m.out_proj(y.to(hidden.dtype))
