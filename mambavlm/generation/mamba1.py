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
from torch import Tensor
from transformers.models.mamba.modeling_mamba import MambaMixer

from mambavlm.ops.causal_conv1d import causal_conv1d, causal_conv1d_state, causal_conv1d_update
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

    def prefill(self, hidden: Tensor, attention_mask: Tensor | None, state: MambaState) -> Tensor:
        """hidden (B, L, D) (normed), attention_mask (B, L) or None -> (B, L, D); writes ``state``.

        Laid out as mamba_ssm's ``Mamba.forward`` lays out its inference prefill: the D_inner-wide
        tensors (x, z, dt, y) are produced and consumed as (B, D_inner, L) with unit stride along L, the
        layout the conv and scan kernels read, so none of them is copied to change layout (a batch-32
        prefill of the 2.8B model spent a third of its time in such copies before).
        """
        m = self.mixer
        state.A.copy_(-torch.exp(m.A_log.float()))
        state.dt_bias.copy_(m.dt_proj.bias)
        dtype = hidden.dtype
        if attention_mask is not None:
            hidden = hidden * attention_mask[:, :, None].to(dtype)
        xz = torch.matmul(m.in_proj.weight, hidden.mT)  # (B, 2 D_inner, L)
        if m.in_proj.bias is not None:
            xz = xz + m.in_proj.bias[:, None]
        x, z = xz.chunk(2, dim=1)
        state.conv.copy_(causal_conv1d_state(x, m.conv_kernel_size))
        x = causal_conv1d(x, m.conv1d.weight.squeeze(1), m.conv1d.bias, activation=m.activation)
        if attention_mask is not None:
            x = x * attention_mask[:, None, :].to(x.dtype)
        x_dbl = torch.matmul(m.x_proj.weight, x)  # (B, R + 2N, L)
        dt, B, C = torch.split(x_dbl, [m.time_step_rank, m.ssm_state_size, m.ssm_state_size], dim=1)
        y, last_state = selective_scan(
            x,
            torch.matmul(m.dt_proj.weight, dt),  # (B, D_inner, L), bias added in the scan
            state.A,
            B.contiguous(),
            C.contiguous(),
            D=m.D.float(),
            z=z,
            delta_bias=state.dt_bias,
            delta_softplus=True,
            return_last_state=True,
        )
        state.ssm.copy_(last_state)
        return m.out_proj(y.to(dtype).mT)

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
