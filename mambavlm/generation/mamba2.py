"""transformers' ``Mamba2Mixer`` run on explicit static state: a prefill and a one-token step.

Both read the mixer's own weights and compute what ``Mamba2Mixer.forward`` computes with a cache
(same masking of padded positions, dt = softplus(dt + dt_bias) clamped to ``time_step_limit``, gated
RMSNorm, out_proj), using this package's ops: ``causal_conv1d`` + ``ssd_scan`` for the prompt,
``causal_conv1d_update`` + ``ssd_step`` per token (the CUDA kernels where installed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

from mambavlm.generation.static_state import MixerState
from mambavlm.ops.causal_conv1d import causal_conv1d, causal_conv1d_state, causal_conv1d_update
from mambavlm.ops.ssd import ssd_scan, ssd_step

__all__ = ["StatefulMamba2Mixer"]


class StatefulMamba2Mixer:
    """Prefill and single-token step of one ``Mamba2Mixer`` over a ``MixerState``.

    State: conv (B, D_inner + 2 G N, W) in the model's dtype, ssm (B, H, P, N), A and dt_bias (H,)
    in float32.
    """

    def __init__(self, mixer: Mamba2Mixer) -> None:
        if not isinstance(mixer, Mamba2Mixer):
            raise TypeError(f"expected a transformers Mamba2Mixer, got {type(mixer).__name__}")
        self.mixer = mixer

    def allocate(self, batch: int) -> MixerState:
        """Zeroed state for ``batch`` sequences on the mixer's device."""
        m = self.mixer
        weight = m.in_proj.weight
        return MixerState(
            conv=weight.new_zeros(batch, m.conv_dim, m.conv_kernel_size),
            ssm=torch.zeros(batch, m.num_heads, m.head_dim, m.ssm_state_size, device=weight.device),
            A=torch.zeros(m.num_heads, device=weight.device),
            dt_bias=torch.zeros(m.num_heads, device=weight.device),
        )

    def _split_projection(self, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """hidden (..., D) -> gate z (..., D_inner), xBC (..., conv_dim), dt before bias (..., H)."""
        m = self.mixer
        return m.in_proj(hidden).split([m.intermediate_size, m.conv_dim, m.num_heads], dim=-1)

    def _split_xbc(self, xbc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Conv output (..., conv_dim) -> x (..., H, P), B and C (..., G, N)."""
        m = self.mixer
        group_width = m.n_groups * m.ssm_state_size
        x, B, C = xbc.split([m.intermediate_size, group_width, group_width], dim=-1)
        groups = (m.n_groups, m.ssm_state_size)
        return x.unflatten(-1, (m.num_heads, m.head_dim)), B.unflatten(-1, groups), C.unflatten(-1, groups)

    def _step_size(self, dt: Tensor, dt_bias: Tensor) -> Tensor:
        """dt before bias (..., H) -> softplus(dt + dt_bias) clamped to time_step_limit, float32."""
        low, high = self.mixer.time_step_limit
        return F.softplus(dt.float() + dt_bias).clamp(min=low, max=high)

    def _output(self, y: Tensor, z: Tensor, dtype: torch.dtype) -> Tensor:
        """Scan output (..., D_inner) gated by z, RMS-normed per group, projected to (..., D)."""
        m = self.mixer
        return m.out_proj(m.norm(y, z).to(dtype))

    def prefill(self, hidden: Tensor, attention_mask: Tensor | None, state: MixerState) -> Tensor:
        """hidden (B, L, D) (normed), attention_mask (B, L) or None -> (B, L, D); writes ``state``."""
        m = self.mixer
        state.A.copy_(-torch.exp(m.A_log.float()))
        state.dt_bias.copy_(m.dt_bias)
        dtype = hidden.dtype
        if attention_mask is not None:
            hidden = (hidden * attention_mask[:, :, None]).to(dtype)
        z, xbc, dt = self._split_projection(hidden)
        xbc = xbc.transpose(1, 2).contiguous()  # (B, conv_dim, L); the conv kernel wants aligned strides
        state.conv.copy_(causal_conv1d_state(xbc, m.conv_kernel_size))
        xbc = causal_conv1d(xbc, m.conv1d.weight.squeeze(1), m.conv1d.bias, activation=m.activation).transpose(1, 2)
        if attention_mask is not None:
            xbc = (xbc * attention_mask[:, :, None]).to(xbc.dtype)
        x, B, C = self._split_xbc(xbc)
        y, final_state = ssd_scan(
            x,
            self._step_size(dt, state.dt_bias),
            state.A,
            B,
            C,
            D=m.D,
            return_final_state=True,
            chunk_size=m.chunk_size,
        )
        state.ssm.copy_(final_state)
        return self._output(y.flatten(-2), z, dtype)

    def step(self, hidden: Tensor, state: MixerState) -> Tensor:
        """hidden (B, D) (normed) -> (B, D) for one new token; updates ``state`` in place."""
        m = self.mixer
        z, xbc, dt = self._split_projection(hidden)
        xbc = causal_conv1d_update(xbc, state.conv, m.conv1d.weight.squeeze(1), m.conv1d.bias, activation=m.activation)
        x, B, C = self._split_xbc(xbc)
        y = ssd_step(state.ssm, x, self._step_size(dt, state.dt_bias), state.A, B, C, D=m.D)
        return self._output(y.flatten(-2), z, hidden.dtype)
