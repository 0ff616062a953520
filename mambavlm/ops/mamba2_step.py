"""A Mamba-2 layer's one-token state update in one Triton kernel, between the conv and the gated norm.

``Mamba2Mixer.step`` (``mambavlm.llm.mamba2``) runs, between the conv update and the gated RMSNorm, a
chain of small kernels per layer: dt's bias, softplus and clamp, the repeat of x and B from key/value
heads to the H heads (a seeded student's grouped layout), mmMamba's x / dt and its float32 copies of B
and C, mamba_ssm's ``selective_state_update`` with its zero stand-ins, and the D skip. At batch 1 each
moves a few kilobytes and costs its launch and its tail, for every layer of every token; the linear
student of ``benchmarks/long_context.py`` spends about 4.1 ms per token where its weights take about 1
ms to read (``benchmarks/RESULTS.md`` c2). mamba_ssm has no kernel that takes these layouts (x and B at
key/value width, the unscaled input), so this one is ours.

``mamba2_ssm_step`` computes, for each sequence b and head h (x head k = h // (H / K) and B, C group
g = h // (H / G), read in place from the conv output, no repeat materialised):

    dt = clamp(softplus(dt_raw + dt_bias), low, high)       (then max(dt, UNSCALED_MIN_DT) and
    u = dt x                                                  u = dt (x / dt) without dt_scales_input)
    S = exp(dt A) S + u B^T        y = S C + D x

in float32, as the unfused step does, so that in float32 they agree up to summation order. y is
returned in x's dtype with ``dt_scales_input`` (mamba_ssm's kernel returns its input's dtype) and in
float32 without (the unfused step scans x / dt in float32).

It runs on CUDA, and anywhere under Triton's interpreter (``TRITON_INTERPRET=1``), which the CPU
tests use.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None

__all__ = ["mamba2_ssm_step"]

HEAD_DIM_BLOCK = 16
"""Channels of a head per program: a head's (P, N) state is split over P / 16 programs, so that a
layer's few heads (16 in the students of ``benchmarks/long_context.py``) still fill the GPU."""


if triton is not None:

    @triton.jit
    def _mamba2_ssm_step_kernel(
        xbc_ptr,  # (B, conv_dim) the conv output: x (K P), B (K' N), C (G N)
        dt_ptr,  # (B, H) dt before its bias
        state_ptr,  # (B, H, P, N) float32, updated in place
        a_ptr, dt_bias_ptr, d_ptr,  # (H,) float32 each
        y_ptr,  # (B, H, P)
        stride_xbc_b, stride_dt_b,
        dt_low, dt_high, min_dt,
        P: tl.constexpr, N: tl.constexpr, N_POW2: tl.constexpr, BLOCK_P: tl.constexpr,
        HEADS_PER_XB: tl.constexpr, HEADS_PER_B: tl.constexpr, HEADS_PER_GROUP: tl.constexpr,
        B_OFFSET: tl.constexpr, C_OFFSET: tl.constexpr, H: tl.constexpr, SCALES_INPUT: tl.constexpr,
    ):
        p_block, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        p = p_block * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = p < P
        n = tl.arange(0, N_POW2)
        n_ok = n < N
        row = xbc_ptr + b * stride_xbc_b
        x = tl.load(row + (h // HEADS_PER_XB) * P + p, mask=p_ok, other=0.0).to(tl.float32)
        b_in = tl.load(row + B_OFFSET + (h // HEADS_PER_B) * N + n, mask=n_ok, other=0.0).to(tl.float32)
        c_out = tl.load(row + C_OFFSET + (h // HEADS_PER_GROUP) * N + n, mask=n_ok, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + b * stride_dt_b + h).to(tl.float32) + tl.load(dt_bias_ptr + h)
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)  # softplus, as torch's threshold of 20
        dt = tl.minimum(tl.maximum(dt, dt_low), dt_high)
        if SCALES_INPUT:
            u = dt * x
        else:  # mmMamba's unscaled input: the unfused step scans x / dt with the decay's dt
            dt = tl.maximum(dt, min_dt)
            u = dt * (x / dt)
        decay = tl.exp(dt * tl.load(a_ptr + h))
        cell = state_ptr + ((b * H + h) * P + p[:, None]) * N + n[None, :]
        ok = p_ok[:, None] & n_ok[None, :]
        s = tl.load(cell, mask=ok, other=0.0)
        s = s * decay + u[:, None] * b_in[None, :]
        tl.store(cell, s, mask=ok)
        y = tl.sum(s * c_out[None, :], axis=1) + tl.load(d_ptr + h) * x
        tl.store(y_ptr + (b * H + h) * P + p, y.to(y_ptr.dtype.element_ty), mask=p_ok)


def mamba2_ssm_step(
    xbc: Tensor, dt: Tensor, state: Tensor, A: Tensor, dt_bias: Tensor, D: Tensor, *, xb_heads: int,
    b_groups: int, n_groups: int, dt_limit: tuple[float, float], dt_scales_input: bool, min_dt: float,
) -> Tensor:
    """One token's state update of a Mamba-2 layer (module docstring), state updated in place.

    xbc (Bt, conv_dim): the conv output, x of ``xb_heads`` (K) heads of P channels, then B of
    ``b_groups`` (K') groups and C of ``n_groups`` (G) groups of N states (rows may be strided,
    channels contiguous); dt (Bt, H) before its bias; state (Bt, H, P, N) float32, contiguous; A,
    dt_bias, D (H,) float32 (D zeros for no skip). ``dt_limit`` (low, high) clamps dt after the
    softplus; without ``dt_scales_input`` dt is floored at ``min_dt`` and x / dt is scanned. Returns y
    (Bt, H, P): x's dtype with ``dt_scales_input``, float32 without. Raises ValueError where the
    shapes disagree (naming the tensor).
    """
    batch, heads, head_dim, d_state = state.shape
    if not state.is_contiguous() or state.dtype != torch.float32:
        raise ValueError(f"state must be a contiguous float32 (B, H, P, N) tensor, got {state.dtype} "
                         f"strides {tuple(state.stride())}")
    conv_dim = xb_heads * head_dim + (b_groups + n_groups) * d_state
    if xbc.shape != (batch, conv_dim) or xbc.stride(1) != 1:
        raise ValueError(f"xbc must be ({batch}, {conv_dim}) with contiguous channels, got {tuple(xbc.shape)} "
                         f"strides {tuple(xbc.stride())}")
    if dt.shape != (batch, heads):
        raise ValueError(f"dt must be ({batch}, {heads}), got {tuple(dt.shape)}")
    for name, t in (("A", A), ("dt_bias", dt_bias), ("D", D)):
        if t.shape != (heads,) or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 ({heads},) tensor, got {t.dtype} {tuple(t.shape)}")
    for name, count in (("xb_heads", xb_heads), ("b_groups", b_groups), ("n_groups", n_groups)):
        if count <= 0 or heads % count:
            raise ValueError(f"{name} ({count}) must divide the {heads} heads")
    if dt.stride(1) != 1:
        dt = dt.contiguous()
    y = torch.empty(batch, heads, head_dim, device=xbc.device,
                    dtype=xbc.dtype if dt_scales_input else torch.float32)
    block_p = min(HEAD_DIM_BLOCK, triton.next_power_of_2(head_dim))
    _mamba2_ssm_step_kernel[(triton.cdiv(head_dim, block_p), heads, batch)](
        xbc, dt, state, A, dt_bias, D, y, xbc.stride(0), dt.stride(0),
        float(dt_limit[0]), float(dt_limit[1]), float(min_dt),
        P=head_dim, N=d_state, N_POW2=triton.next_power_of_2(d_state), BLOCK_P=block_p,
        HEADS_PER_XB=heads // xb_heads, HEADS_PER_B=heads // b_groups, HEADS_PER_GROUP=heads // n_groups,
        B_OFFSET=xb_heads * head_dim, C_OFFSET=xb_heads * head_dim + b_groups * d_state, H=heads,
        SCALES_INPUT=dt_scales_input,
    )
    return y
