"""One decoding step of Mamba-1's selective SSM (S6) for per-channel state, updated in place.

With dt = softplus(dt + dt_bias) (when asked), per batch b, channel d and state n:

    h[n] = exp(dt[d] * A[d, n]) * h[n] + dt[d] * B[n] * x[d]
    y[d] = sum_n C[n] * h[n] + D[d] * x[d]        then y * silu(z) when z is given

mamba_ssm's Triton ``selective_state_update`` runs it on CUDA (it is CUDA-graph capturable);
elsewhere a PyTorch version computes in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mambavlm.ops.dispatch import use_kernels

__all__ = ["selective_state_update"]


def _check_inputs(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
    dt_bias: Tensor | None,
) -> None:
    """Raise ValueError naming the first argument that does not fit state (Bt, Dm, N)."""
    if state.dim() != 3:
        raise ValueError(f"state must be (batch, channels, d_state), got shape {tuple(state.shape)}")
    batch, dim, d_state = state.shape
    for name, t in (("x", x), ("dt", dt), ("z", z)):
        if t is not None and tuple(t.shape) != (batch, dim):
            raise ValueError(f"{name} must be {(batch, dim)} to match the state, got {tuple(t.shape)}")
    if tuple(A.shape) != (dim, d_state):
        raise ValueError(f"A must be {(dim, d_state)}, got {tuple(A.shape)}")
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (batch, d_state):
            raise ValueError(f"{name} must be {(batch, d_state)}, got {tuple(t.shape)}")
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f"{name} must be ({dim},), got {tuple(t.shape)}")


def selective_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
) -> Tensor:
    """state (Bt, Dm, N) updated in place; x, dt, z (Bt, Dm); A (Dm, N); B, C (Bt, N); D, dt_bias (Dm,).

    Returns y (Bt, Dm) in x's dtype. Uses mamba_ssm's kernel when ``use_kernels(x, "mamba_ssm")``.
    """
    _check_inputs(state, x, dt, A, B, C, D, z, dt_bias)
    if use_kernels(x, "mamba_ssm"):
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update as kernel

        return kernel(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
    dtype = torch.promote_types(state.dtype, torch.float32)
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    x_c = x.to(dtype)
    decay = torch.exp(dt[..., None] * A.to(dtype))
    new_state = state.to(dtype) * decay + (dt * x_c)[..., None] * B.to(dtype)[:, None, :]
    state.copy_(new_state)
    y = (new_state * C.to(dtype)[:, None, :]).sum(-1)
    if D is not None:
        y = y + D.to(dtype) * x_c
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(x.dtype)
