"""Selective scan (the S6 recurrence of Mamba-1) with the semantics of mamba_ssm's ``selective_scan_fn``.

Per batch b, channel d and state n, with dt = delta (+ delta_bias, then softplus if asked):

    h_t = exp(dt_t * A[d, n]) * h_{t-1} + dt_t * B_t[n] * u_t        h_{-1} = 0
    y_t = sum_n C_t[n] * h_t[n] + D[d] * u_t                         out = y * silu(z) when z is given

Shapes: u, delta, z (Bt, Dm, L); A (Dm, N), real; B, C (Bt, N, L) or grouped (Bt, G, N, L), where
channel d reads group d // (Dm // G); D, delta_bias (Dm,). Output (Bt, Dm, L) in u's dtype, and with
``return_last_state`` also h_{L-1} (Bt, Dm, N) in the compute dtype (float32; float64 for float64 u).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mambavlm.ops.dispatch import use_kernels

__all__ = ["CHUNK_SIZE", "check_scan_inputs", "selective_scan", "selective_scan_naive", "selective_scan_torch"]

CHUNK_SIZE = 64
"""Tokens per chunk of ``selective_scan_torch``: log-depth scan inside a chunk, then across chunks."""

_KERNEL_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_KERNEL_MAX_STATE = 256


def check_scan_inputs(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
) -> None:
    """Raise ValueError naming the first argument whose shape or kind does not fit the scan."""
    if u.dim() != 3:
        raise ValueError(f"u must be (Bt, Dm, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if length == 0:
        raise ValueError("u has sequence length 0; the scan needs at least one token")
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.is_complex():
        raise ValueError("A must be real; complex A is not supported")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (Dm, N) = ({dim}, N), got shape {tuple(A.shape)}")
    n_state = A.shape[1]
    for name, weight in (("B", B), ("C", C)):
        if weight.dim() == 3:
            expected = (batch, n_state, length)
        elif weight.dim() == 4:
            expected = (batch, weight.shape[1], n_state, length)
            if weight.shape[1] == 0 or dim % weight.shape[1] != 0:
                raise ValueError(f"{name} has {weight.shape[1]} groups, which does not divide Dm = {dim}")
        else:
            raise ValueError(f"{name} must be (Bt, N, L) or (Bt, G, N, L), got shape {tuple(weight.shape)}")
        if tuple(weight.shape) != expected:
            raise ValueError(f"{name} must have shape {expected}, got {tuple(weight.shape)}")
    if _as_grouped(B).shape[1] != _as_grouped(C).shape[1]:
        raise ValueError(f"B and C must have the same number of groups, got {tuple(B.shape)} and {tuple(C.shape)}")
    for name, vector in (("D", D), ("delta_bias", delta_bias)):
        if vector is not None and tuple(vector.shape) != (dim,):
            raise ValueError(f"{name} must be (Dm,) = ({dim},), got shape {tuple(vector.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")


def _as_grouped(weight: Tensor) -> Tensor:
    """(Bt, N, L) -> (Bt, 1, N, L); grouped (Bt, G, N, L) is returned as is."""
    return weight.unsqueeze(1) if weight.dim() == 3 else weight


def _compute_dtype(u: Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise (half inputs are scanned in float32)."""
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _step_sizes(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, dtype: torch.dtype) -> Tensor:
    """dt = delta + delta_bias, then softplus when asked: (Bt, Dm, L) in ``dtype``."""
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    return F.softplus(dt) if delta_softplus else dt


def _linear_recurrence_scan(decay: Tensor, drive: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Inclusive Hillis-Steele scan of h_t = decay_t * h_{t-1} + drive_t along ``dim``, from h = 0.

    Returns (cumulative decay prod_{s<=t} decay_s, states h_t), both shaped like the inputs; log2 of
    the scanned length steps, each composing every element with the one ``offset`` positions back.
    """
    length = decay.shape[dim]
    offset = 1
    while offset < length:
        kept = length - offset
        earlier_decay, later_decay = decay.narrow(dim, 0, kept), decay.narrow(dim, offset, kept)
        earlier_drive, later_drive = drive.narrow(dim, 0, kept), drive.narrow(dim, offset, kept)
        drive = torch.cat([drive.narrow(dim, 0, offset), torch.addcmul(later_drive, later_decay, earlier_drive)], dim)
        decay = torch.cat([decay.narrow(dim, 0, offset), later_decay * earlier_decay], dim)
        offset *= 2
    return decay, drive


def selective_scan_torch(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """PyTorch selective scan, chunked and log-depth; runs on any device and supports autograd.

    L is split into chunks of ``CHUNK_SIZE`` tokens; a Hillis-Steele scan gives every chunk's states
    from a zero start, a second scan over the chunk-end states gives the state entering each chunk,
    and that state, decayed, is added back. Memory is O(Bt * Dm * L * N) per scan step (no L x L term).
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype = _compute_dtype(u)
    batch, dim, length = u.shape
    n_state = A.shape[1]
    B, C = _as_grouped(B).to(dtype), _as_grouped(C).to(dtype)
    groups = B.shape[1]
    channels_per_group = dim // groups
    chunk = min(CHUNK_SIZE, length)
    n_chunks = math.ceil(length / chunk)
    padding = n_chunks * chunk - length  # padded tokens have dt = 0: decay 1, drive 0

    def chunked(x: Tensor) -> Tensor:
        """(Bt, Dm, L) -> (Bt, G, Dm/G, n_chunks, chunk, 1)."""
        return F.pad(x, (0, padding)).reshape(batch, groups, channels_per_group, n_chunks, chunk, 1)

    u_c = u.to(dtype)
    dt = _step_sizes(delta, delta_bias, delta_softplus, dtype)
    A_c = A.to(dtype).reshape(1, groups, channels_per_group, 1, 1, n_state)
    B_c = F.pad(B, (0, padding)).reshape(batch, groups, 1, n_state, n_chunks, chunk).permute(0, 1, 2, 4, 5, 3)
    decay = torch.exp(chunked(dt) * A_c)  # (Bt, G, Dm/G, n_chunks, chunk, N)
    drive = chunked(dt * u_c) * B_c
    decay, states = _linear_recurrence_scan(decay, drive, dim=-2)
    _, chunk_end = _linear_recurrence_scan(decay[..., -1, :], states[..., -1, :], dim=-2)
    chunk_start = F.pad(chunk_end[..., :-1, :], (0, 0, 1, 0))  # (Bt, G, Dm/G, n_chunks, N)
    states = torch.addcmul(states, decay, chunk_start.unsqueeze(-2))
    states = states.reshape(batch, groups, channels_per_group, n_chunks * chunk, n_state)[..., :length, :]
    y = torch.einsum("bghln,bgnl->bghl", states, C).reshape(batch, dim, length)
    if D is not None:
        y = y + u_c * D.to(dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(dtype))
    out = y.to(u.dtype)
    if return_last_state:
        return out, states[..., -1, :].reshape(batch, dim, n_state)
    return out


def selective_scan_naive(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Token-by-token selective scan: the reference the tests hold the other paths to, not for use."""
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype = _compute_dtype(u)
    batch, dim, length = u.shape
    u_c = u.to(dtype)
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype).unsqueeze(-1)
    if delta_softplus:
        dt = F.softplus(dt)
    B_d = _as_grouped(B).to(dtype)
    C_d = _as_grouped(C).to(dtype)
    B_d = B_d.repeat_interleave(dim // B_d.shape[1], dim=1)  # (Bt, Dm, N, L)
    C_d = C_d.repeat_interleave(dim // C_d.shape[1], dim=1)
    A_c = A.to(dtype)
    state = u_c.new_zeros(batch, dim, A.shape[1])
    outputs = []
    for t in range(length):
        state = torch.exp(dt[:, :, t, None] * A_c) * state + (dt[:, :, t] * u_c[:, :, t])[:, :, None] * B_d[..., t]
        outputs.append((state * C_d[..., t]).sum(-1))
    y = torch.stack(outputs, dim=-1)
    if D is not None:
        y = y + D.to(dtype).unsqueeze(-1) * u_c
    if z is not None:
        y = y * z.to(dtype) * torch.sigmoid(z.to(dtype))
    out = y.to(u.dtype)
    return (out, state) if return_last_state else out


def _kernel_supports(u: Tensor, A: Tensor) -> bool:
    """Input kinds mamba_ssm's CUDA kernel accepts (half/float inputs, N <= 256)."""
    return u.dtype in _KERNEL_INPUT_DTYPES and A.shape[-1] <= _KERNEL_MAX_STATE


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan: mamba_ssm's ``selective_scan_fn`` when ``use_kernels(u, "mamba_ssm")``, else PyTorch.

    Inputs the kernel cannot take (float64, N > 256) use the PyTorch path. For the kernel, A, D and
    delta_bias are cast to float32 and delta, B, C, z to u's dtype, as it requires.
    """
    if not (use_kernels(u, "mamba_ssm") and _kernel_supports(u, A)):
        return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    return selective_scan_fn(
        u,
        delta.to(u.dtype),
        A.float(),
        B.to(u.dtype),
        C.to(u.dtype),
        D=None if D is None else D.float(),
        z=None if z is None else z.to(u.dtype),
        delta_bias=None if delta_bias is None else delta_bias.float(),
        delta_softplus=delta_softplus,
        return_last_state=return_last_state,
    )
