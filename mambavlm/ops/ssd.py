"""Mamba-2 state space duality (SSD): a multi-head selective scan with one scalar decay per head.

For each head h, with state S (P, N), input x_t (P,), step dt_t > 0, decay rate A_h <= 0 and the
head's group g = h // (H / G) sharing B_t, C_t (N,):

    S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T        y_t = S_t C_t + D_h x_t

``ssd_scan`` runs a whole sequence (mamba_ssm's Triton kernel on CUDA, else the chunked PyTorch
form), ``ssd_step`` advances one decoding token, ``ssd_scan_naive`` is the per-token recurrence
that the tests compare both against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from mambavlm.ops.dispatch import use_kernels

__all__ = ["segment_sum", "ssd_scan", "ssd_scan_naive", "ssd_scan_torch", "ssd_step"]


def segment_sum(x: Tensor) -> Tensor:
    """x (..., T) -> S (..., T, T) with S[..., i, j] = x[j+1] + ... + x[i] for j <= i, -inf above the diagonal.

    exp(S) is the decay from position j to position i. Computed as a masked cumulative sum (no
    difference of two long prefix sums, which would lose precision), as the Mamba-2 paper's
    ``ssd_minimal`` does.
    """
    length = x.shape[-1]
    ones = torch.ones(length, length, dtype=torch.bool, device=x.device)
    rows = x[..., None].expand(*x.shape, length)  # [..., k, j] = x[k]
    sums = rows.masked_fill(~ones.tril(-1), 0).cumsum(-2)  # [..., i, j] = sum of x[k] for j < k <= i
    return sums.masked_fill(~ones.tril(), -torch.inf)


def _check_scan_inputs(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, initial_state: Tensor | None
) -> None:
    """Raise ValueError naming the first argument whose shape does not fit x (Bt, L, H, P)."""
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, length, heads, head_dim), got shape {tuple(x.shape)}")
    batch, length, heads, head_dim = x.shape
    if dt.shape != (batch, length, heads):
        raise ValueError(f"dt must be {(batch, length, heads)} to match x, got {tuple(dt.shape)}")
    if A.shape != (heads,):
        raise ValueError(f"A must be ({heads},), one decay rate per head, got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (batch, length):
        raise ValueError(f"B must be (batch={batch}, length={length}, groups, d_state), got {tuple(B.shape)}")
    if heads % B.shape[2] != 0:
        raise ValueError(f"the number of heads ({heads}) must be a multiple of the groups in B/C ({B.shape[2]})")
    if C.shape != B.shape:
        raise ValueError(f"C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}")
    if D is not None and D.shape != (heads,):
        raise ValueError(f"D must be ({heads},), one skip weight per head, got {tuple(D.shape)}")
    state_shape = (batch, heads, head_dim, B.shape[3])
    if initial_state is not None and initial_state.shape != state_shape:
        raise ValueError(f"initial_state must be {state_shape}, got {tuple(initial_state.shape)}")


def ssd_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
    chunk_size: int = 64,
) -> Tensor | tuple[Tensor, Tensor]:
    """Scan a sequence: x (Bt, L, H, P), dt (Bt, L, H) positive, A (H,) <= 0, B/C (Bt, L, G, N), D (H,).

    ``initial_state`` (Bt, H, P, N) is the state before the first token. Returns y (Bt, L, H, P) and,
    with ``return_final_state``, the state after the last token (Bt, H, P, N). mamba_ssm's
    ``mamba_chunk_scan_combined`` runs it when ``use_kernels(x, "mamba_ssm")``, else ``ssd_scan_torch``.
    """
    _check_scan_inputs(x, dt, A, B, C, D, initial_state)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if use_kernels(x, "mamba_ssm"):
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        return mamba_chunk_scan_combined(
            x,
            dt,
            A,
            B,
            C,
            chunk_size,
            D=D,
            initial_states=initial_state,
            return_final_states=return_final_state,
        )
    return ssd_scan_torch(x, dt, A, B, C, D, initial_state, return_final_state, chunk_size)


def ssd_scan_torch(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
    chunk_size: int = 64,
) -> Tensor | tuple[Tensor, Tensor]:
    """``ssd_scan`` in PyTorch, the chunked SSD algorithm (Mamba-2 paper, "ssd_minimal").

    The sequence is cut into chunks of ``chunk_size``: inside a chunk the output is a masked,
    attention-like product C^T B weighted by the decay between the two positions (a stable
    segment sum); across chunks only the (H, P, N) states are passed on. A sequence shorter than
    ``chunk_size`` is one chunk of its own length (the result does not depend on the chunk size; the
    cost of a chunk grows with its square). Computes in float32 or wider; y comes back in x's dtype,
    the final state in the compute dtype.
    """
    _check_scan_inputs(x, dt, A, B, C, D, initial_state)
    batch, length, heads, _ = x.shape
    chunk_size = max(1, min(chunk_size, length))
    groups = B.shape[2]
    dtype = torch.promote_types(x.dtype, torch.float32)
    pad = (-length) % chunk_size
    # Padded steps get dt = 0: no input and decay exp(0) = 1, so the final state is the one after step L.
    x_dt = F.pad(x.to(dtype) * dt.to(dtype)[..., None], (0, 0, 0, 0, 0, pad))
    log_decay = F.pad(dt.to(dtype) * A.to(dtype), (0, 0, 0, pad))
    B = F.pad(B.to(dtype), (0, 0, 0, 0, 0, pad))
    C = F.pad(C.to(dtype), (0, 0, 0, 0, 0, pad))

    # b batch, c chunk, l/s positions in a chunk, g group, j head within its group, p head_dim, n d_state
    x_dt = rearrange(x_dt, "b (c l) (g j) p -> b c l g j p", l=chunk_size, g=groups)
    B = rearrange(B, "b (c l) g n -> b c l g n", l=chunk_size)
    C = rearrange(C, "b (c l) g n -> b c l g n", l=chunk_size)
    log_decay = rearrange(log_decay, "b (c l) (g j) -> b g j c l", l=chunk_size, g=groups)
    cumulative = log_decay.cumsum(dim=-1)  # (b, g, j, c, l): log decay from the chunk start to l

    # 1. Inside each chunk: y_l = sum_{s <= l} (C_l . B_s) exp(sum_{s < r <= l} log_decay_r) x_s dt_s.
    scores = torch.einsum("bclgn,bcsgn->bgcls", C, B).unsqueeze(2) * torch.exp(segment_sum(log_decay))
    y = torch.einsum("bgjcls,bcsgjp->bclgjp", scores, x_dt)

    # 2. Each chunk's own contribution to the state at its end.
    to_chunk_end = torch.exp(cumulative[..., -1:] - cumulative)
    weighted = x_dt * rearrange(to_chunk_end, "b g j c l -> b c l g j")[..., None]
    chunk_states = torch.einsum("bclgn,bclgjp->bcgjpn", B, weighted)

    # 3. States entering each chunk: decayed sums over all earlier chunks and the initial state.
    if initial_state is None:
        start = torch.zeros_like(chunk_states[:, :1])
    else:
        start = rearrange(initial_state.to(dtype), "b (g j) p n -> b 1 g j p n", g=groups)
    chunk_states = torch.cat([start, chunk_states], dim=1)
    chunk_decay = torch.exp(segment_sum(F.pad(cumulative[..., -1], (1, 0))))  # (b, g, j, c+1, c+1)
    states = torch.einsum("bgjzc,bcgjpn->bzgjpn", chunk_decay, chunk_states)
    entering, final_state = states[:, :-1], states[:, -1]

    # 4. What the entering state adds to each position, decayed from the chunk start.
    from_chunk_start = rearrange(torch.exp(cumulative), "b g j c l -> b c l g j")[..., None]
    y = y + torch.einsum("bclgn,bcgjpn->bclgjp", C, entering) * from_chunk_start

    y = rearrange(y, "b c l g j p -> b (c l) (g j) p")[:, :length]
    if D is not None:
        y = y + x.to(dtype) * D.to(dtype)[:, None]
    y = y.to(x.dtype)
    if return_final_state:
        return y, rearrange(final_state, "b g j p n -> b (g j) p n")
    return y


def ssd_scan_naive(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``ssd_scan`` as a plain loop over tokens in x's dtype: the test reference, not for use."""
    _check_scan_inputs(x, dt, A, B, C, D, initial_state)
    batch, length, heads, head_dim = x.shape
    repeats = heads // B.shape[2]
    B = B.repeat_interleave(repeats, dim=2)
    C = C.repeat_interleave(repeats, dim=2)
    state = x.new_zeros(batch, heads, head_dim, B.shape[-1]) if initial_state is None else initial_state
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        y = (state * C[:, t, :, None, :]).sum(-1)
        if D is not None:
            y = y + D[:, None] * x[:, t]
        ys.append(y)
    y = torch.stack(ys, dim=1)
    return (y, state) if return_final_state else y


def ssd_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None) -> Tensor:
    """Advance one token: state (Bt, H, P, N) is updated in place; x (Bt, H, P), dt (Bt, H), A (H,),
    B/C (Bt, G, N), D (H,). Returns y (Bt, H, P). mamba_ssm's ``selective_state_update`` on CUDA.
    """
    if state.dim() != 4:
        raise ValueError(f"state must be (batch, heads, head_dim, d_state), got shape {tuple(state.shape)}")
    batch, heads, head_dim, d_state = state.shape
    if x.shape != (batch, heads, head_dim):
        raise ValueError(f"x must be {(batch, heads, head_dim)} to match the state, got {tuple(x.shape)}")
    if dt.shape != (batch, heads):
        raise ValueError(f"dt must be {(batch, heads)}, got {tuple(dt.shape)}")
    if A.shape != (heads,):
        raise ValueError(f"A must be ({heads},), got {tuple(A.shape)}")
    if B.dim() != 3 or B.shape[0] != batch or B.shape[2] != d_state or heads % B.shape[1] != 0:
        raise ValueError(f"B must be (batch={batch}, groups dividing {heads}, d_state={d_state}), got {tuple(B.shape)}")
    if C.shape != B.shape:
        raise ValueError(f"C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}")
    if D is not None and D.shape != (heads,):
        raise ValueError(f"D must be ({heads},), got {tuple(D.shape)}")
    if use_kernels(x, "mamba_ssm"):
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update

        # The kernel takes dt and A per channel; stride-0 views over head_dim select its
        # one-decay-per-head path. That path reads dt_bias, and mamba_ssm 2.3 fails on D=None,
        # so a zero bias and a zero D stand in for absent ones.
        zero = dt.new_zeros(()).expand(heads, head_dim)
        return selective_state_update(
            state,
            x,
            dt[..., None].expand(batch, heads, head_dim),
            A[:, None, None].expand(heads, head_dim, d_state),
            B,
            C,
            D=zero if D is None else D[:, None].expand(heads, head_dim),
            dt_bias=zero,
        )
    dtype = torch.promote_types(state.dtype, torch.float32)
    groups = B.shape[1]
    x_h = rearrange(x.to(dtype), "b (g j) p -> b g j p", g=groups)
    dt_h = rearrange(dt.to(dtype), "b (g j) -> b g j", g=groups)
    decay = rearrange(torch.exp(dt.to(dtype) * A.to(dtype)), "b (g j) -> b g j", g=groups)
    new_state = rearrange(state.to(dtype), "b (g j) p n -> b g j p n", g=groups) * decay[..., None, None]
    new_state = new_state + torch.einsum("bgjp,bgn->bgjpn", x_h * dt_h[..., None], B.to(dtype))
    y = torch.einsum("bgjpn,bgn->bgjp", new_state, C.to(dtype))
    state.copy_(rearrange(new_state, "b g j p n -> b (g j) p n"))
    y = rearrange(y, "b g j p -> b (g j) p")
    if D is not None:
        y = y + x.to(dtype) * D.to(dtype)[:, None]
    return y.to(x.dtype)
