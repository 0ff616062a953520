"""A Mamba-1 block's one-token step in four Triton kernels (batch <= ``FUSED_GEMV_MAX_BATCH``).

mamba_ssm's ``Mamba.step`` (and ``StatefulMambaMixer.step``) runs five kernels between ``in_proj`` and
``out_proj``: the conv update, ``x_proj``, ``dt_proj``, the selective state update, and a copy or two.
At batch 1 each moves a few kilobytes to a few megabytes and costs mostly its launch and its tail, 64
times per token. Here:

- ``conv_x_proj``: the causal conv's state shift, its output (+ bias, SiLU) for a block of channels,
  and that block's share of ``x_proj`` (dt's low rank, B, C), summed across blocks into one float32
  buffer with atomic adds (split-K): one kernel, a column of programs per sequence;
- ``dt_state_update``: ``dt_proj`` (rank R dot per channel) + bias + softplus, the selective state
  update ``h = exp(dt A) h + dt B x``, ``y = C h + D x`` gated by ``silu(z)``: one kernel, a column
  of programs per sequence.

Both compute in float32 and keep dt, B and C in float32 (the unfused path rounds them to the model's
dtype after ``x_proj``), so in float32 they equal the unfused step up to summation order.

Around them, for small batches (where a step is a matrix-vector product per projection and launches
and tails dominate), the block boundary and both projections:

- ``norm_in_proj``: RMSNorm of the float32 residual stream (recomputed by every program from the
  whole row: a few kilobytes against its slice of the weight) rounded to the weight's dtype as
  mamba_ssm's fused norm rounds it, then ``in_proj``; it also zeroes the ``x_proj`` accumulator
  ``conv_x_proj`` adds into, so no memset kernel runs;
- ``out_proj_residual``: ``out_proj`` with the residual add as its epilogue (``residual += W y``),
  each program owning its output rows: deterministic, no split-K reduction kernel.

On Hopper and later each of the four is launched with programmatic dependent launch (``launch_pdl``):
each program releases the next kernel (``gdc_launch_dependents``) once its long reads are done, so the
next kernel's programs are scheduled into this one's tail, on the SMs its finished programs free, and
load what no kernel of the step writes (their weights) before ``gdc_wait``, which returns once the
previous kernel has finished and its writes are visible. A kernel releases its successor only after
its own wait, so at most two overlap. Releasing at the end rather than right after the wait took the
batch-1 fused step from 2.53 to 2.38 ms per token (H200, 2026-12-01, MambaVLM-2.8B shapes, bf16,
random weights, 128 CUDA-graph steps, four alternating repeats each): released early, the next
kernel's programs sat in ``gdc_wait`` on SM slots the running kernel's later waves needed.

So a block is four launches instead of seven (norm, in_proj, memset, the two above, out_proj's
split-K GEMV and its reduction). They run on CUDA, and anywhere under Triton's interpreter
(``TRITON_INTERPRET=1``), which the CPU tests use.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from mambavlm.ops.dispatch import triton_available

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None
try:
    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    _TRITON_HAS_PDL = "launch_pdl" in CUDAOptions.__dataclass_fields__
except ImportError:  # pragma: no cover - an older Triton
    _TRITON_HAS_PDL = False

__all__ = [
    "FUSED_GEMV_MAX_BATCH",
    "conv_x_proj",
    "dt_state_update",
    "norm_in_proj",
    "out_proj_residual",
    "triton_available",
]

FUSED_GEMV_MAX_BATCH = 4
"""The largest batch ``norm_in_proj`` / ``out_proj_residual`` take: each program reads its weight slice
once per sequence (from L2 after the first), a matrix-vector product per row; larger batches are
matrix products, cuBLAS's work."""

IN_PROJ_BLOCK_N, IN_PROJ_BLOCK_K, IN_PROJ_NUM_WARPS = 8, 1024, 2
OUT_PROJ_BLOCK_N, OUT_PROJ_BLOCK_K, OUT_PROJ_NUM_WARPS = 4, 1024, 2
"""Output rows per program, the reduction chunk and the warps of the two projection kernels: the fastest of
``python -m benchmarks.decode_projections --batches 1`` on an H200 (bf16, batch 1, 64 layers per CUDA
graph, 30 launch shapes, 3 pipeline stages): in_proj + RMSNorm 18.9 us per layer against 22.6 for
RMSNorm + cuBLAS (1.19x); out_proj + residual 10.8 us against 13.9 for cuBLAS + add (1.29x)
(``benchmarks/results/decode_projections.md``); 18.2 and 10.6 us once each kernel released its successor
at its end (module docstring), against cuBLAS's bare GEMV's 15.1 and 11.1. The earlier defaults (16 x
512 and 4 x 512, 4 warps) ran at 22.4 and 15.0 us: fewer warps each owning a longer row chunk keep more
bytes in flight per thread. The first version (32 and 8 rows, the norm recomputed in ten chunks, the
weights re-read for each sequence) ran the whole step at 3.57 ms per token against cuBLAS's 2.94. Two
variants measured no faster on the H200 (2026-12-01) and were not kept: accumulating the products
elementwise and reducing across threads once after the loop (in_proj 21.8 us at 8 x 1024 x 2 warps), and
persistent grids of 132-1056 programs each looping over many row blocks in one pipelined loop (in_proj
21.6 us at best, out_proj 10.9). Loading each program's first weight tile before ``gdc_wait`` gave the
whole fused step 2.66 and 3.01 ms per token at batch 1 (two tables of one run) against 2.62 and 2.63
without it: no gain, perhaps because programs launched early hold SM slots the previous kernel needs.
With each kernel released at its end (see the module docstring) the first-tile load cost more: 2.80 ms
per token against 2.38 (2.61 with the old release against 2.53); so did prefetching each program's whole
weight slice into L2 (``prefetch.global.L2``) before ``gdc_wait``: 3.74 ms (in_proj alone 3.32, out_proj
alone 2.80) against 2.38."""
CONV_BLOCK_D, SSM_BLOCK_D = 32, 32
"""Channels per program of ``conv_x_proj`` and ``dt_state_update``. A sweep on an H200 (2026-12-01,
Mamba-2.8B shapes, bf16, random weights; the launchers patched with each shape, a script not kept as a
benchmark; the whole fused step at batch 1, ms per token over 128 CUDA-graph steps; 16 shapes, 16-128
x 8-64 channels) found 32 / 32 fastest:
2.52-2.54 ms per token in four alternating repeats against 2.61 for the earlier 32 / 16, and 2.56-2.58
for 64 / 32; 128 channels per conv program took 2.65-2.89."""
PIPELINE_STAGES = 3
"""Weight tiles in flight per program (Triton's software pipelining of the reduction loop; 3 is
Triton's default on NVIDIA GPUs)."""


if triton is not None:

    @triton.jit
    def _conv_x_proj_kernel(
        x_ptr, stride_x_b,  # (B, Di) conv input (the x half of in_proj's output)
        state_ptr,  # (B, Di, W) conv state, oldest first; shifted in place
        conv_w_ptr, conv_b_ptr,  # (Di, W), (Di,)
        x_proj_ptr,  # (R2, Di) x_proj weight
        out_ptr,  # (B, Di) conv output, the model's dtype
        xdbl_ptr,  # (B, R2) float32, zeroed: receives dt_low | B | C
        channels, rows,
        W: tl.constexpr, W_POW2: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr,
    ):
        d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < channels
        b = tl.program_id(1)
        k = tl.arange(0, W_POW2)
        k_ok = k < W
        w = tl.load(conv_w_ptr + d[:, None] * W + k[None, :], mask=d_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(conv_b_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
        r = tl.arange(0, BLOCK_R)
        r_ok = r < rows
        proj = tl.load(x_proj_ptr + r[:, None] * channels + d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        proj = proj.to(tl.float32)
        if PDL:  # the weights above are the step's constants; what follows reads in_proj's output
            gdc_wait()
        x = tl.load(x_ptr + b * stride_x_b + d, mask=d_ok, other=0.0)
        state_row = state_ptr + b * channels * W + d[:, None] * W
        older = tl.load(state_row + k[None, :] + 1, mask=d_ok[:, None] & (k[None, :] + 1 < W), other=0.0)
        window = tl.where(k[None, :] == W - 1, x[:, None].to(older.dtype), older)
        tl.store(state_row + k[None, :], window, mask=d_ok[:, None] & k_ok[None, :])
        out = tl.sum(window.to(tl.float32) * w, axis=1)
        if HAS_BIAS:
            out += bias
        if SILU:
            out = out * tl.sigmoid(out)
        out = tl.where(d_ok, out, 0.0)
        tl.store(out_ptr + b * channels + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)
        if PDL:  # the long reads are done: let the next kernel fill the SMs this one frees
            gdc_launch_dependents()
        share = tl.sum(proj * out[None, :], axis=1)
        tl.atomic_add(xdbl_ptr + b * rows + r, share, mask=r_ok)

    @triton.jit
    def _dt_state_update_kernel(
        xdbl_ptr,  # (B, R2) float32: dt_low | B | C
        x_ptr,  # (B, Di) conv output
        z_ptr, stride_z_b,  # (B, Di) gate (the z half of in_proj's output)
        dt_w_ptr, dt_bias_ptr,  # (Di, R), (Di,) float32
        a_ptr, d_skip_ptr,  # (Di, N) float32 (A = -exp(A_log)), (Di,)
        state_ptr,  # (B, Di, N) float32, updated in place
        y_ptr,  # (B, Di), the model's dtype
        channels, rank,
        N: tl.constexpr, N_POW2: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_RANK: tl.constexpr,
        PDL: tl.constexpr,
    ):
        d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < channels
        b = tl.program_id(1)
        j = tl.arange(0, BLOCK_RANK)
        j_ok = j < rank
        dt_w = tl.load(dt_w_ptr + d[:, None] * rank + j[None, :], mask=d_ok[:, None] & j_ok[None, :], other=0.0)
        dt_w = dt_w.to(tl.float32)
        dt_bias = tl.load(dt_bias_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
        n = tl.arange(0, N_POW2)
        n_ok = n < N
        dn_ok = d_ok[:, None] & n_ok[None, :]
        a = tl.load(a_ptr + d[:, None] * N + n[None, :], mask=dn_ok, other=0.0).to(tl.float32)
        d_skip = tl.load(d_skip_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
        if PDL:  # dt_proj, A, D: constants of the step; xdbl and x come from conv_x_proj
            gdc_wait()
        row_width = rank + 2 * N
        low = tl.load(xdbl_ptr + b * row_width + j, mask=j_ok, other=0.0)
        b_in = tl.load(xdbl_ptr + b * row_width + rank + n, mask=n_ok, other=0.0)
        c_out = tl.load(xdbl_ptr + b * row_width + rank + N + n, mask=n_ok, other=0.0)
        dt = tl.sum(dt_w * low[None, :], axis=1) + dt_bias
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)  # softplus, as mamba_ssm's threshold
        x = tl.load(x_ptr + b * channels + d, mask=d_ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + b * stride_z_b + d, mask=d_ok, other=0.0).to(tl.float32)
        state_row = state_ptr + b * channels * N + d[:, None] * N + n[None, :]
        h = tl.load(state_row, mask=dn_ok, other=0.0)
        h = h * tl.exp(dt[:, None] * a) + (dt * x)[:, None] * b_in[None, :]
        tl.store(state_row, h, mask=dn_ok)
        if PDL:  # the long reads are done: let the next kernel fill the SMs this one frees
            gdc_launch_dependents()
        y = tl.sum(h * c_out[None, :], axis=1) + d_skip * x
        y = y * z * tl.sigmoid(z)
        tl.store(y_ptr + b * channels + d, y.to(y_ptr.dtype.element_ty), mask=d_ok)


    @triton.jit
    def _row_tile(ptr, rows, rows_ok, cols, cols_ok, width):
        """The (rows, cols) tile of a row-major matrix of ``width`` columns, float32, zeros outside."""
        return tl.load(ptr + rows[:, None] * width + cols[None, :], mask=rows_ok[:, None] & cols_ok[None, :],
                       other=0.0).to(tl.float32)

    @triton.jit
    def _norm_in_proj_kernel(
        residual_ptr,  # (B, D) float32 residual stream
        norm_w_ptr,  # (D,) RMSNorm weight
        w_ptr,  # (N_out, D) in_proj weight
        out_ptr,  # (B, N_out), the weight's dtype
        zero_ptr, zero_count,  # a float32 buffer zeroed by program 0 (the x_proj accumulator)
        batch, n_out, eps,
        D: tl.constexpr, D_POW2: tl.constexpr, B_POW2: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_Z: tl.constexpr, PDL: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if PDL:
            gdc_wait()
        if pid == 0:
            zi = tl.arange(0, BLOCK_Z)
            tl.store(zero_ptr + zi, tl.zeros([BLOCK_Z], dtype=tl.float32), mask=zi < zero_count)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_ok = rows < n_out
        bi = tl.arange(0, B_POW2)
        b_ok = bi < batch
        d = tl.arange(0, D_POW2)
        whole = tl.load(residual_ptr + bi[:, None] * D + d[None, :], mask=b_ok[:, None] & (d[None, :] < D), other=0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(whole * whole, axis=1) / D + eps)  # (B_POW2,): every row at once
        k = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_N, B_POW2], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):  # each weight tile read once for the whole batch
            k_ok = k0 + k < D
            g = tl.load(norm_w_ptr + k0 + k, mask=k_ok, other=0.0).to(tl.float32)
            r = _row_tile(residual_ptr, bi, b_ok, k0 + k, k_ok, D)
            x = (r * rstd[:, None] * g[None, :]).to(w_ptr.dtype.element_ty).to(tl.float32)  # the norm's rounding
            acc += tl.sum(_row_tile(w_ptr, rows, rows_ok, k0 + k, k_ok, D)[:, None, :] * x[None, :, :], axis=2)
        if PDL:  # the long reads are done: let the next kernel fill the SMs this one frees
            gdc_launch_dependents()
        tl.store(out_ptr + bi[None, :] * n_out + rows[:, None], acc.to(out_ptr.dtype.element_ty),
                 mask=rows_ok[:, None] & b_ok[None, :])

    @triton.jit
    def _out_proj_residual_kernel(
        y_ptr,  # (B, D_in)
        w_ptr,  # (D_out, D_in) out_proj weight
        residual_ptr,  # (B, D_out) float32, += W y in place
        batch, d_out,
        D_IN: tl.constexpr, B_POW2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PDL: tl.constexpr,
    ):
        if PDL:
            gdc_wait()
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_ok = rows < d_out
        bi = tl.arange(0, B_POW2)
        b_ok = bi < batch
        k = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_N, B_POW2], dtype=tl.float32)
        for k0 in range(0, D_IN, BLOCK_K):  # each weight tile read once for the whole batch
            k_ok = k0 + k < D_IN
            y = _row_tile(y_ptr, bi, b_ok, k0 + k, k_ok, D_IN)
            acc += tl.sum(_row_tile(w_ptr, rows, rows_ok, k0 + k, k_ok, D_IN)[:, None, :] * y[None, :, :], axis=2)
        # the projection rounds to the weight's dtype before the add, as nn.Linear + add does
        acc = acc.to(w_ptr.dtype.element_ty).to(tl.float32)
        if PDL:  # the long reads are done: let the next kernel fill the SMs this one frees
            gdc_launch_dependents()
        out = residual_ptr + bi[None, :] * d_out + rows[:, None]
        ok = rows_ok[:, None] & b_ok[None, :]
        tl.store(out, tl.load(out, mask=ok, other=0.0) + acc, mask=ok)


@functools.cache
def _device_has_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def _pdl(t: Tensor) -> dict[str, bool]:
    """The launch arguments for programmatic dependent launch: on for a CUDA tensor of a Hopper or
    later GPU with a Triton that has it (off under Triton's interpreter)."""
    on = _TRITON_HAS_PDL and t.is_cuda and _device_has_pdl(t.device.index or 0)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


def _check_small_batch(name: str, x: Tensor) -> None:
    if x.shape[0] > FUSED_GEMV_MAX_BATCH:
        raise ValueError(f"{name} takes at most {FUSED_GEMV_MAX_BATCH} sequences, got {x.shape[0]}")


def norm_in_proj(
    residual: Tensor, norm_weight: Tensor, eps: float, in_proj_weight: Tensor, zero: Tensor,
    block_n: int = IN_PROJ_BLOCK_N, block_k: int = IN_PROJ_BLOCK_K, num_warps: int = IN_PROJ_NUM_WARPS,
    num_stages: int = PIPELINE_STAGES,
) -> Tensor:
    """residual (B, D) float32, B <= FUSED_GEMV_MAX_BATCH; norm_weight (D,); in_proj_weight (N_out, D)
    without bias. Returns ``in_proj(rms_norm(residual))`` (B, N_out) in the weight's dtype, the norm's
    output rounded to that dtype first (mamba_ssm's fused norm). Zeroes ``zero`` (float32, contiguous)
    on the way. ``block_n`` output rows per program, ``block_k`` the reduction chunk, ``num_warps``,
    ``num_stages`` (``PIPELINE_STAGES``): launch shape (``benchmarks/decode_projections.py`` compares
    them). Raises ValueError for a larger batch."""
    _check_small_batch("norm_in_proj", residual)
    batch, d_model = residual.shape
    n_out = in_proj_weight.shape[0]
    out = torch.empty(batch, n_out, device=residual.device, dtype=in_proj_weight.dtype)
    _norm_in_proj_kernel[(triton.cdiv(n_out, block_n),)](
        residual, norm_weight, in_proj_weight, out, zero, zero.numel(), batch, n_out, eps,
        D=d_model, D_POW2=triton.next_power_of_2(d_model), B_POW2=triton.next_power_of_2(batch),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_Z=triton.next_power_of_2(max(zero.numel(), 1)),
        num_warps=num_warps, num_stages=num_stages, **_pdl(residual),
    )
    return out


def out_proj_residual(
    y: Tensor, out_proj_weight: Tensor, residual: Tensor,
    block_n: int = OUT_PROJ_BLOCK_N, block_k: int = OUT_PROJ_BLOCK_K, num_warps: int = OUT_PROJ_NUM_WARPS,
    num_stages: int = PIPELINE_STAGES,
) -> None:
    """``residual += out_proj(y)`` in place: y (B, D_in), B <= FUSED_GEMV_MAX_BATCH; out_proj_weight
    (D_out, D_in) without bias; residual (B, D_out) float32, contiguous. The projection is rounded to
    the weight's dtype before the add, as the unfused block rounds it. Launch shape as
    ``norm_in_proj``'s. Raises ValueError for a larger batch."""
    _check_small_batch("out_proj_residual", y)
    batch, d_in = y.shape
    d_out = out_proj_weight.shape[0]
    _out_proj_residual_kernel[(triton.cdiv(d_out, block_n),)](
        y, out_proj_weight, residual, batch, d_out, D_IN=d_in, B_POW2=triton.next_power_of_2(batch),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages, **_pdl(y),
    )


def conv_x_proj(
    x: Tensor, conv_state: Tensor, conv_weight: Tensor, conv_bias: Tensor | None, x_proj_weight: Tensor, silu: bool,
    xdbl: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """x (B, Di) (rows may be strided), conv_state (B, Di, W) contiguous, updated in place; conv_weight
    (Di, W), conv_bias (Di,) or None; x_proj_weight (R + 2N, Di). Returns the conv output (B, Di) in x's
    dtype and x_proj of it, (B, R + 2N) in float32: into ``xdbl`` when given (contiguous, zeroed by the
    caller: ``norm_in_proj`` zeroes it), else a new zeroed buffer."""
    batch, channels = x.shape
    rows = x_proj_weight.shape[0]
    width = conv_weight.shape[1]
    out = torch.empty(batch, channels, device=x.device, dtype=x.dtype)
    if xdbl is None:
        xdbl = torch.zeros(batch, rows, device=x.device, dtype=torch.float32)
    block_d = CONV_BLOCK_D
    _conv_x_proj_kernel[(triton.cdiv(channels, block_d), batch)](
        x, x.stride(0), conv_state, conv_weight, conv_bias if conv_bias is not None else conv_weight,
        x_proj_weight, out, xdbl, channels, rows,
        W=width, W_POW2=triton.next_power_of_2(width), HAS_BIAS=conv_bias is not None, SILU=silu,
        BLOCK_D=block_d, BLOCK_R=triton.next_power_of_2(rows), **_pdl(x),
    )
    return out, xdbl


def dt_state_update(
    xdbl: Tensor, x: Tensor, z: Tensor, dt_weight: Tensor, dt_bias: Tensor, A: Tensor, D: Tensor, ssm_state: Tensor
) -> Tensor:
    """xdbl (B, R + 2N) float32 (dt's low rank, B, C); x (B, Di) the conv output; z (B, Di) (rows may be
    strided); dt_weight (Di, R), dt_bias (Di,) float32; A (Di, N) float32, D (Di,); ssm_state
    (B, Di, N) float32, updated in place. Returns y (B, Di) in x's dtype."""
    batch, channels = x.shape
    rank = dt_weight.shape[1]
    d_state = A.shape[1]
    y = torch.empty_like(x)
    block_d = SSM_BLOCK_D
    _dt_state_update_kernel[(triton.cdiv(channels, block_d), batch)](
        xdbl, x, z, z.stride(0), dt_weight, dt_bias, A, D, ssm_state, y, channels, rank,
        N=d_state, N_POW2=triton.next_power_of_2(d_state), BLOCK_D=block_d,
        BLOCK_RANK=triton.next_power_of_2(rank), **_pdl(x),
    )
    return y
