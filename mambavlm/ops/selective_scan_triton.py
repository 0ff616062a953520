"""Mamba-1's selective scan in Triton, forward and backward, with the channel reduction of dB / dC in
registers.

Semantics: ``mambavlm.ops.selective_scan.selective_scan_torch`` (mamba_ssm's ``selective_scan_fn``) for
real A (Dm, N), B / C (Bt, N, L) or grouped (Bt, G, N, L) (channel d reads group d // (Dm / G)):

    dt = softplus(delta + delta_bias)                    (without softplus: delta + delta_bias)
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t     h_{-1} = 0,   per (b, d, n)
    y_t = sum_n C_t[n] * h_t[n] + D * u_t;               out = y * silu(z) when z is given

Why our own: mamba_ssm's backward (``selective_scan_bwd_kernel``, about half of a Mamba-2.8B training
step on an H200) runs one thread block per (batch, channel) and adds each element of dB and dC with a
float32 ``atomicAdd``, 2 x Bt x Dm x N x L of them (2.0 G per layer at micro-batch 8 x 1522 tokens),
every address contended by all Dm channels. Here a program owns ``block_d`` channels, sums dB / dC
over them in registers, and the channel blocks' sums meet once. It is also the training scan on CUDA
where mamba_ssm is not installed (``mambavlm.llm.mamba_training``).

The forward keeps the state entering each chunk of ``block_t`` steps (float32) for the backward, which
walks the chunks in reverse: it recomputes the chunk's states from the saved one, runs dh backwards
(dh_t = exp(dt_{t+1} A) dh_{t+1} + C_t dy_t), and forms every gradient from them.

Two kernel pairs do this (``method``):

- ``"sequential"`` (the default) walks one time step per iteration, as mamba_ssm's threads walk theirs,
  the (N, block_d) state in registers, one channel per thread (A^T, the saved states and the backward's
  history are channel-contiguous, so Triton lays the tile's channel axis over a warp's threads and every
  sum over the N states stays in a thread); per step a few (block_d,) and (N,) loads whose addresses do
  not depend on the state, an exp and a few multiply-adds per state element. The backward first
  recomputes a chunk's incoming states into a per-program buffer (block_t x N x block_d float32) and
  then reads it in reverse; dB / dC are summed over the program's channels into the program's own rows
  (Bt, programs, L, N), which one ``sum`` reduces afterwards: atomics there would have every program of a
  batch row adding to the same (n, t) at about the same step. On an H200 (one Mamba-2.8B layer, bf16),
  forward + backward against mamba_ssm's 10.9 ms: 11.1 ms on sequence-contiguous inputs (0.98x), 7.8 ms
  on channel-contiguous ones (1.40x; a warp's loads then cover 32 consecutive channels), forward 2.3-2.6
  ms against 2.45 (``benchmarks/results/selective_scan.md``).
- ``"chunked"`` runs each chunk as a parallel scan (``tl.associative_scan`` on the pairs (decay, input),
  which compose as (a1, b1) then (a2, b2) -> (a1 a2, a2 b1 + b2)) over (block_d, N, block_t) tiles and
  adds dB / dC atomically once per program and step: 20.0 ms forward + backward on the H200 (0.54x),
  its forward alone 1.9x mamba_ssm's: the scans' log-depth work costs more than the atomics saved.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from mambavlm.ops.selective_scan import check_scan_inputs

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None

__all__ = ["LAUNCH", "METHOD", "MemoryOrder", "ScanMethod", "memory_order", "selective_scan_triton"]

ScanMethod = Literal["chunked", "sequential"]

MemoryOrder = Literal["sequence", "channel"]

LAUNCH: dict[tuple[ScanMethod, MemoryOrder], tuple[int, int, int]] = {
    ("chunked", "sequence"): (8, 16, 4),
    ("sequential", "sequence"): (32, 8, 1),
    ("sequential", "channel"): (64, 16, 1),
}
"""The default launch shape, (channels per program, time steps per chunk, warps), per method and memory
order of u / delta / z (``memory_order``; the chunked kernels copy to the sequence order first): the
fastest of ``python -m benchmarks.selective_scan`` on an H200 (one Mamba-2.8B layer, micro-batch 8 x
1522 tokens, bf16; ``benchmarks/results/selective_scan.md``), forward + backward against mamba_ssm's
10.9 ms: sequential on sequence-contiguous inputs 32 x 8 x 1 11.1 ms, on channel-contiguous ones (what
the training mixer passes) 64 x 16 x 1 7.8 ms (1.40x; 32 x 8 x 1 took 9.8 there), chunked 8 x 16 x 4
20.0."""
METHOD: ScanMethod = "sequential"
"""How a program walks the time steps (module docstring): ``"sequential"``, one step per iteration with
the state in registers (the faster, 1.8x the chunked kernels on the H200), or ``"chunked"``,
``block_t`` steps at a time as one parallel scan."""

if triton is not None:

    @triton.jit
    def _compose(a1, b1, a2, b2):
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _softplus(x, SOFTPLUS: tl.constexpr):
        if SOFTPLUS:
            x = tl.where(x <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))), x)  # torch's threshold
        return x

    @triton.jit
    def _step_sizes(raw, bias, SOFTPLUS: tl.constexpr):
        return _softplus(raw + bias[:, None], SOFTPLUS)

    @triton.jit
    def _program_channels(a_ptr, d_ptr, bias_ptr, dim, length, channels_per_group, N: tl.constexpr,
                          BLOCK_D: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
                          STATE_MAJOR: tl.constexpr = False):
        """What every kernel's program (batch row b, channel block) starts from: b, its channels d (BD,)
        and which exist, the state indices n (N,), A (BD, N) (``STATE_MAJOR``: A^T (N, BD) from A^T
        (N, Dm) in memory), D (BD,) and delta_bias (BD,) of its channels (zeros where absent), where
        each channel's sequence starts (BD,), and its group of B / C (every channel of the program reads
        the same one)."""
        b = tl.program_id(0)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < dim
        n = tl.arange(0, N)
        if STATE_MAJOR:
            a = tl.load(a_ptr + n[:, None] * dim + d[None, :], mask=d_ok[None, :], other=0.0)
        else:
            a = tl.load(a_ptr + d[:, None] * N + n[None, :], mask=d_ok[:, None], other=0.0)
        skip = tl.load(d_ptr + d, mask=d_ok, other=0.0) if HAS_D else tl.zeros([BLOCK_D], tl.float32)
        bias = tl.load(bias_ptr + d, mask=d_ok, other=0.0) if HAS_BIAS else tl.zeros([BLOCK_D], tl.float32)
        row = (b * dim + d) * length
        group = tl.program_id(1) * BLOCK_D // channels_per_group
        return b, d, d_ok, n, a, skip, bias, row, group

    @triton.jit
    def _selective_scan_fwd_kernel(
        u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, out_ptr, states_ptr,
        dim, length, n_chunks, groups, channels_per_group,
        N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    ):
        b, d, d_ok, n, a, skip, bias, row, group = _program_channels(
            a_ptr, d_ptr, bias_ptr, dim, length, channels_per_group, N, BLOCK_D, HAS_D, HAS_BIAS)
        t = tl.arange(0, BLOCK_T)
        h = tl.zeros([BLOCK_D, N], tl.float32)
        for chunk in range(n_chunks):
            t0 = chunk * BLOCK_T
            tl.store(states_ptr + ((b * dim + d[:, None]) * n_chunks + chunk) * N + n[None, :], h,
                     mask=d_ok[:, None])
            tt = t0 + t
            t_ok = tt < length
            ok = d_ok[:, None] & t_ok[None, :]
            offs = row[:, None] + tt[None, :]
            u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            dt = _step_sizes(tl.load(delta_ptr + offs, mask=ok, other=0.0).to(tl.float32), bias, SOFTPLUS)
            bc = ((b * groups + group) * N + n[:, None]) * length + tt[None, :]
            bm = tl.load(b_ptr + bc, mask=t_ok[None, :], other=0.0).to(tl.float32)  # (N, BT)
            cm = tl.load(c_ptr + bc, mask=t_ok[None, :], other=0.0).to(tl.float32)
            live = t_ok[None, None, :]
            decay = tl.where(live, tl.exp(dt[:, None, :] * a[:, :, None]), 1.0)  # (BD, N, BT)
            drive = tl.where(live, (dt * u)[:, None, :] * bm[None, :, :], 0.0)
            drive = tl.where(t[None, None, :] == 0, drive + decay * h[:, :, None], drive)
            _, hs = tl.associative_scan((decay, drive), axis=2, combine_fn=_compose)
            y = tl.sum(hs * cm[None, :, :], axis=1) + skip[:, None] * u
            if HAS_Z:
                zv = tl.load(z_ptr + offs, mask=ok, other=0.0).to(tl.float32)
                y = y * zv * tl.sigmoid(zv)
            tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=ok)
            h = tl.sum(tl.where(t[None, None, :] == BLOCK_T - 1, hs, 0.0), axis=2)

    @triton.jit
    def _selective_scan_bwd_kernel(
        u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, dout_ptr, states_ptr,
        du_ptr, ddelta_ptr, dz_ptr, da_ptr, db_ptr, dc_ptr, dd_ptr, dbias_ptr,
        dim, length, n_chunks, groups, channels_per_group,
        N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    ):
        b, d, d_ok, n, a, skip, bias, row, group = _program_channels(
            a_ptr, d_ptr, bias_ptr, dim, length, channels_per_group, N, BLOCK_D, HAS_D, HAS_BIAS)
        t = tl.arange(0, BLOCK_T)
        dh_next = tl.zeros([BLOCK_D, N], tl.float32)  # dh at the first step of the chunk after this one
        grad_a = tl.zeros([BLOCK_D, N], tl.float32)
        grad_skip = tl.zeros([BLOCK_D], tl.float32)
        grad_bias = tl.zeros([BLOCK_D], tl.float32)
        for step in range(n_chunks):
            chunk = n_chunks - 1 - step
            t0 = chunk * BLOCK_T
            tt = t0 + t
            t_ok = tt < length
            ok = d_ok[:, None] & t_ok[None, :]
            offs = row[:, None] + tt[None, :]
            u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            raw = tl.load(delta_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            dt = _step_sizes(raw, bias, SOFTPLUS)
            nxt_ok = d_ok[:, None] & (tt + 1 < length)[None, :]
            dt_next = _step_sizes(tl.load(delta_ptr + offs + 1, mask=nxt_ok, other=0.0).to(tl.float32), bias, SOFTPLUS)
            bc = ((b * groups + group) * N + n[:, None]) * length + tt[None, :]
            bm = tl.load(b_ptr + bc, mask=t_ok[None, :], other=0.0).to(tl.float32)
            cm = tl.load(c_ptr + bc, mask=t_ok[None, :], other=0.0).to(tl.float32)
            live = t_ok[None, None, :]
            # the chunk's states again, from the one saved at its start
            h0 = tl.load(states_ptr + ((b * dim + d[:, None]) * n_chunks + chunk) * N + n[None, :],
                         mask=d_ok[:, None], other=0.0)
            decay = tl.where(live, tl.exp(dt[:, None, :] * a[:, :, None]), 1.0)
            drive = tl.where(live, (dt * u)[:, None, :] * bm[None, :, :], 0.0)
            first = t[None, None, :] == 0
            carried = decay * h0[:, :, None]  # exp(dt_0 A) h_{-1} at the first step
            _, hs = tl.associative_scan((decay, tl.where(first, drive + carried, drive)), axis=2,
                                        combine_fn=_compose)
            decayed_prev = hs - drive  # exp(dt_t A) h_{t-1}
            dy = tl.load(dout_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            if HAS_Z:
                zv = tl.load(z_ptr + offs, mask=ok, other=0.0).to(tl.float32)
                y = tl.sum(hs * cm[None, :, :], axis=1) + skip[:, None] * u
                sig = tl.sigmoid(zv)
                tl.store(dz_ptr + offs, (dy * y * sig * (1.0 + zv * (1.0 - sig))).to(dz_ptr.dtype.element_ty),
                         mask=ok)
                dy = dy * zv * sig
            grad_skip += tl.sum(dy * u, axis=1)
            # dC_t[n] = sum_d dy_t h_t[n]: this program's channels summed before the one atomic add
            tl.atomic_add(dc_ptr + bc, tl.sum(dy[:, None, :] * hs, axis=0), mask=t_ok[None, :])
            # dh_t = exp(dt_{t+1} A) dh_{t+1} + C_t dy_t, backwards through the chunk
            decay_next = tl.where((tt + 1 < length)[None, None, :], tl.exp(dt_next[:, None, :] * a[:, :, None]), 0.0)
            feed = cm[None, :, :] * dy[:, None, :]
            last = t[None, None, :] == BLOCK_T - 1
            feed = tl.where(last, feed + decay_next * dh_next[:, :, None], feed)
            _, dh = tl.associative_scan((decay_next, feed), axis=2, combine_fn=_compose, reverse=True)
            dh_next = tl.sum(tl.where(first, dh, 0.0), axis=2)
            ddt = tl.sum(dh * (a[:, :, None] * decayed_prev + bm[None, :, :] * u[:, None, :]), axis=1)
            du = skip[:, None] * dy + tl.sum(dh * bm[None, :, :], axis=1) * dt
            grad_a += tl.sum(dh * dt[:, None, :] * decayed_prev, axis=2)
            tl.atomic_add(db_ptr + bc, tl.sum(dh * (dt * u)[:, None, :], axis=0), mask=t_ok[None, :])
            if SOFTPLUS:
                x = raw + bias[:, None]
                ddt = tl.where(x <= 20.0, ddt * tl.sigmoid(x), ddt)
            ddt = tl.where(ok, ddt, 0.0)
            grad_bias += tl.sum(ddt, axis=1)
            tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=ok)
            tl.store(ddelta_ptr + offs, ddt.to(ddelta_ptr.dtype.element_ty), mask=ok)
        tl.atomic_add(da_ptr + d[:, None] * N + n[None, :], grad_a, mask=d_ok[:, None])
        if HAS_D:
            tl.atomic_add(dd_ptr + d, grad_skip, mask=d_ok)
        if HAS_BIAS:
            tl.atomic_add(dbias_ptr + d, grad_bias, mask=d_ok)

    @triton.jit
    def _sequential_fwd_kernel(
        u_ptr, delta_ptr, a_t_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, out_ptr, states_ptr,
        dim, length, n_chunks, groups, channels_per_group,
        u_sb, u_sd, u_st, delta_sb, delta_sd, delta_st, z_sb, z_sd, z_st, out_sb, out_sd, out_st,
        N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    ):
        """One time step per iteration, the (N, BLOCK_D) state in registers; the state entering each
        chunk of BLOCK_T steps saved for the backward, (Bt, chunks, N, Dm)."""
        b, d, d_ok, n, a, skip, bias, _, group = _program_channels(
            a_t_ptr, d_ptr, bias_ptr, dim, length, channels_per_group, N, BLOCK_D, HAS_D, HAS_BIAS, True)
        bc_row = (b * groups + group) * length * N + n  # (N,) at t = 0 of B^T / C^T (Bt, G, L, N)
        u_row, delta_row, z_row = b * u_sb + d * u_sd, b * delta_sb + d * delta_sd, b * z_sb + d * z_sd
        out_row = b * out_sb + d * out_sd
        states = states_ptr + b * n_chunks * N * dim + n[:, None] * dim + d[None, :]  # (N, BD) at chunk 0
        h = tl.zeros([N, BLOCK_D], tl.float32)
        for chunk in range(n_chunks):
            t0 = chunk * BLOCK_T
            tl.store(states + chunk * N * dim, h, mask=d_ok[None, :])
            for t in range(t0, tl.minimum(t0 + BLOCK_T, length)):
                u = tl.load(u_ptr + u_row + t * u_st, mask=d_ok, other=0.0).to(tl.float32)
                dt = _softplus(tl.load(delta_ptr + delta_row + t * delta_st, mask=d_ok, other=0.0).to(tl.float32) + bias, SOFTPLUS)
                bt = tl.load(b_ptr + bc_row + t * N).to(tl.float32)
                ct = tl.load(c_ptr + bc_row + t * N).to(tl.float32)
                h = tl.exp(dt[None, :] * a) * h + (dt * u)[None, :] * bt[:, None]
                y = tl.sum(h * ct[:, None], axis=0) + skip * u
                if HAS_Z:
                    zv = tl.load(z_ptr + z_row + t * z_st, mask=d_ok, other=0.0).to(tl.float32)
                    y = y * zv * tl.sigmoid(zv)
                tl.store(out_ptr + out_row + t * out_st, y.to(out_ptr.dtype.element_ty), mask=d_ok)

    @triton.jit
    def _sequential_bwd_kernel(
        u_ptr, delta_ptr, a_t_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, dout_ptr, states_ptr, history_ptr,
        du_ptr, ddelta_ptr, dz_ptr, da_t_ptr, db_part_ptr, dc_part_ptr, dd_ptr, dbias_ptr,
        dim, length, n_chunks, groups, channels_per_group,
        u_sb, u_sd, u_st, delta_sb, delta_sd, delta_st, z_sb, z_sd, z_st, dout_sb, dout_sd, dout_st,
        du_sb, du_sd, du_st, ddelta_sb, ddelta_sd, ddelta_st, dz_sb, dz_sd, dz_st,
        N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    ):
        """The chunks in reverse: the chunk's states recomputed from the saved one (each step's
        incoming state written to the program's slice of ``history``, (BLOCK_T, N, BLOCK_D)), then its
        steps in reverse, dh carried in registers; dB / dC summed over the program's channels into the
        program's own rows of ``db_part`` / ``dc_part`` (Bt, programs, L, N), which the caller sums over
        the programs; dA^T (N, Dm) added atomically."""
        b, d, d_ok, n, a, skip, bias, _, group = _program_channels(
            a_t_ptr, d_ptr, bias_ptr, dim, length, channels_per_group, N, BLOCK_D, HAS_D, HAS_BIAS, True)
        bc_row = (b * groups + group) * length * N + n  # (N,) at t = 0 of B^T / C^T (Bt, G, L, N)
        u_row, delta_row, z_row = b * u_sb + d * u_sd, b * delta_sb + d * delta_sd, b * z_sb + d * z_sd
        dout_row = b * dout_sb + d * dout_sd
        du_row, ddelta_row, dz_row = b * du_sb + d * du_sd, b * ddelta_sb + d * ddelta_sd, b * dz_sb + d * dz_sd
        program = b * tl.num_programs(1) + tl.program_id(1)
        part_row = program * length * N + n  # (N,) at t = 0
        states = states_ptr + b * n_chunks * N * dim + n[:, None] * dim + d[None, :]
        history = history_ptr + program * BLOCK_T * N * BLOCK_D + n[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
        dh_carry = tl.zeros([N, BLOCK_D], tl.float32)  # exp(dt_{t+1} A) dh_{t+1}
        grad_a = tl.zeros([N, BLOCK_D], tl.float32)
        grad_skip = tl.zeros([BLOCK_D], tl.float32)
        grad_bias = tl.zeros([BLOCK_D], tl.float32)
        for step in range(n_chunks):
            chunk = n_chunks - 1 - step
            t0 = chunk * BLOCK_T
            t1 = tl.minimum(t0 + BLOCK_T, length)
            h = tl.load(states + chunk * N * dim, mask=d_ok[None, :], other=0.0)
            for t in range(t0, t1):
                tl.store(history + (t - t0) * N * BLOCK_D, h)  # h_{t-1}
                u = tl.load(u_ptr + u_row + t * u_st, mask=d_ok, other=0.0).to(tl.float32)
                dt = _softplus(tl.load(delta_ptr + delta_row + t * delta_st, mask=d_ok, other=0.0).to(tl.float32) + bias, SOFTPLUS)
                bt = tl.load(b_ptr + bc_row + t * N).to(tl.float32)
                h = tl.exp(dt[None, :] * a) * h + (dt * u)[None, :] * bt[:, None]
            tl.debug_barrier()  # the history written above is read below
            for i in range(0, t1 - t0):
                t = t1 - 1 - i
                h_prev = tl.load(history + (t - t0) * N * BLOCK_D)
                u = tl.load(u_ptr + u_row + t * u_st, mask=d_ok, other=0.0).to(tl.float32)
                x = tl.load(delta_ptr + delta_row + t * delta_st, mask=d_ok, other=0.0).to(tl.float32) + bias
                dt = _softplus(x, SOFTPLUS)
                bt = tl.load(b_ptr + bc_row + t * N).to(tl.float32)
                ct = tl.load(c_ptr + bc_row + t * N).to(tl.float32)
                dy = tl.load(dout_ptr + dout_row + t * dout_st, mask=d_ok, other=0.0).to(tl.float32)
                decay = tl.exp(dt[None, :] * a)
                decayed_prev = decay * h_prev  # exp(dt_t A) h_{t-1}
                h = decayed_prev + (dt * u)[None, :] * bt[:, None]
                if HAS_Z:
                    zv = tl.load(z_ptr + z_row + t * z_st, mask=d_ok, other=0.0).to(tl.float32)
                    y = tl.sum(h * ct[:, None], axis=0) + skip * u
                    sig = tl.sigmoid(zv)
                    tl.store(dz_ptr + dz_row + t * dz_st, (dy * y * sig * (1.0 + zv * (1.0 - sig))).to(dz_ptr.dtype.element_ty),
                             mask=d_ok)
                    dy = dy * zv * sig
                grad_skip += dy * u
                tl.store(dc_part_ptr + part_row + t * N, tl.sum(dy[None, :] * h, axis=1))
                dh = dh_carry + ct[:, None] * dy[None, :]
                ddt = tl.sum(dh * (a * decayed_prev + bt[:, None] * u[None, :]), axis=0)
                du = skip * dy + tl.sum(dh * bt[:, None], axis=0) * dt
                grad_a += dh * dt[None, :] * decayed_prev
                tl.store(db_part_ptr + part_row + t * N, tl.sum(dh * (dt * u)[None, :], axis=1))
                if SOFTPLUS:
                    ddt = tl.where(x <= 20.0, ddt * tl.sigmoid(x), ddt)
                ddt = tl.where(d_ok, ddt, 0.0)
                grad_bias += ddt
                tl.store(du_ptr + du_row + t * du_st, du.to(du_ptr.dtype.element_ty), mask=d_ok)
                tl.store(ddelta_ptr + ddelta_row + t * ddelta_st, ddt.to(ddelta_ptr.dtype.element_ty), mask=d_ok)
                dh_carry = decay * dh
            tl.debug_barrier()  # the next chunk's states overwrite this one's history
        tl.atomic_add(da_t_ptr + n[:, None] * dim + d[None, :], grad_a, mask=d_ok[None, :])
        if HAS_D:
            tl.atomic_add(dd_ptr + d, grad_skip, mask=d_ok)
        if HAS_BIAS:
            tl.atomic_add(dbias_ptr + d, grad_bias, mask=d_ok)


def memory_order(x: Tensor) -> MemoryOrder:
    """``"channel"`` for a (Bt, Dm, L) tensor whose channels are contiguous (a (Bt, L, Dm) tensor's
    transpose, or a slice of one), else ``"sequence"``."""
    return "channel" if x.stride(1) == 1 and x.stride(2) != 1 else "sequence"


def _empty_in_order_of(x: Tensor) -> Tensor:
    """An empty (Bt, Dm, L) tensor like x, channel-contiguous (a (Bt, L, Dm) buffer's transpose) where x
    is, else contiguous: the sequential kernels then store as they load."""
    if memory_order(x) == "channel":
        return torch.empty(x.shape[0], x.shape[2], x.shape[1], device=x.device, dtype=x.dtype).transpose(1, 2)
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)


def _grouped(weight: Tensor) -> Tensor:
    """B or C as (Bt, G, N, L), contiguous (one group for a (Bt, N, L) tensor)."""
    return (weight if weight.dim() == 4 else weight.unsqueeze(1)).contiguous()


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
        delta_bias: Tensor | None, delta_softplus: bool, launch: tuple[int, int, int, str],
    ) -> Tensor:
        batch, dim, length = u.shape
        n_state = A.shape[1]
        block_d, block_t, num_warps, method = launch
        n_chunks = triton.cdiv(length, block_t)
        D = None if D is None else D.float().contiguous()
        delta_bias = None if delta_bias is None else delta_bias.float().contiguous()
        if method == "sequential":
            # u, delta, z read through their strides (sequence- or channel-contiguous), out stored in u's
            # order; channel-contiguous A^T (N, Dm), states (Bt, chunks, N, Dm); B^T, C^T (Bt, G, L, N)
            out = _empty_in_order_of(u)
            A = A.float().t().contiguous()
            B, C = B.transpose(2, 3).contiguous(), C.transpose(2, 3).contiguous()
            states = torch.empty(batch, n_chunks, n_state, dim, device=u.device, dtype=torch.float32)
            kernel = _sequential_fwd_kernel
            strides = (*u.stride(), *delta.stride(), *(z if z is not None else u).stride(), *out.stride())
        else:
            u, delta = u.contiguous(), delta.contiguous()
            z = None if z is None else z.contiguous()
            out = torch.empty_like(u)
            A = A.float().contiguous()
            states = torch.empty(batch, dim, n_chunks, n_state, device=u.device, dtype=torch.float32)
            kernel = _selective_scan_fwd_kernel
            strides = ()
        grid = (batch, triton.cdiv(dim, block_d))
        kernel[grid](
            u, delta, A, B, C, D if D is not None else A, z if z is not None else u,
            delta_bias if delta_bias is not None else A, out, states, dim, length, n_chunks, B.shape[1],
            dim // B.shape[1], *strides,
            N=n_state, BLOCK_D=block_d, BLOCK_T=block_t, HAS_D=D is not None, HAS_Z=z is not None,
            HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, num_warps=num_warps,
        )
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.delta_softplus, ctx.launch, ctx.n_chunks = delta_softplus, launch, n_chunks
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        block_d, block_t, num_warps, method = ctx.launch
        batch, dim, length = u.shape
        n_state = A.shape[1] if method != "sequential" else A.shape[0]
        if method == "sequential":  # each gradient in its input's order, dout read through its strides
            du, ddelta = _empty_in_order_of(u), _empty_in_order_of(delta)
            dz = _empty_in_order_of(z) if z is not None else None
        else:
            dout = dout.contiguous()
            du, ddelta = torch.empty_like(u), torch.empty_like(delta)
            dz = torch.empty_like(z) if z is not None else None
        dA = torch.zeros_like(A)  # A^T's shape for the sequential kernels
        dD = torch.zeros_like(D) if D is not None else None
        dbias = torch.zeros_like(delta_bias) if delta_bias is not None else None
        groups = B.shape[1]
        grid = (batch, triton.cdiv(dim, block_d))
        if method == "sequential":
            # each program's incoming states of one chunk, (BLOCK_T, N, BLOCK_D) float32, and its own rows of
            # dB / dC, summed over the programs of a group below (no atomics: every program of a batch row
            # would add to the same (n, t) at about the same step)
            history = torch.empty(batch * grid[1] * block_t * block_d * n_state, device=u.device, dtype=torch.float32)
            dB = torch.empty(batch, grid[1], length, n_state, device=B.device, dtype=torch.float32)
            dC = torch.empty_like(dB)
            kernel, extra = _sequential_bwd_kernel, (history,)
            zs, dzs = (z, dz) if z is not None else (u, du)
            strides = (*u.stride(), *delta.stride(), *zs.stride(), *dout.stride(), *du.stride(), *ddelta.stride(),
                       *dzs.stride())
        else:
            dB = torch.zeros(B.shape, device=B.device, dtype=torch.float32)
            dC = torch.zeros(C.shape, device=C.device, dtype=torch.float32)
            kernel, extra, strides = _selective_scan_bwd_kernel, (), ()
        kernel[grid](
            u, delta, A, B, C, D if D is not None else A, z if z is not None else u,
            delta_bias if delta_bias is not None else A, dout, states, *extra,
            du, ddelta, dz if dz is not None else du, dA, dB, dC,
            dD if dD is not None else dA, dbias if dbias is not None else dA,
            dim, length, ctx.n_chunks, groups, dim // groups, *strides,
            N=n_state, BLOCK_D=block_d, BLOCK_T=block_t, HAS_D=D is not None, HAS_Z=z is not None,
            HAS_BIAS=delta_bias is not None, SOFTPLUS=ctx.delta_softplus, num_warps=num_warps,
        )
        if method == "sequential":  # (Bt, programs, L, N) -> (Bt, G, N, L): a group's programs are consecutive
            dB, dC = (part.view(batch, groups, grid[1] // groups, length, n_state).sum(2).transpose(2, 3)
                      for part in (dB, dC))
            dA = dA.t()
        return du, ddelta, dA, dB.to(B.dtype), dC.to(C.dtype), dD, dz, dbias, None, None


def selective_scan_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    block_d: int | None = None,
    block_t: int | None = None,
    num_warps: int | None = None,
    method: ScanMethod = METHOD,
) -> Tensor:
    """The selective scan with autograd (module docstring): u, delta, z (Bt, Dm, L); A (Dm, N) real, N a
    power of 2; B, C (Bt, N, L) or (Bt, G, N, L); D, delta_bias (Dm,). Returns (Bt, Dm, L) in u's
    dtype; gradients for every tensor argument (A, D, delta_bias in float32, B and C in their dtype).
    The sequential kernels read u, delta, z through their strides and store the output and the
    gradients in their inputs' order, so channel-contiguous sequences ((Bt, L, Dm) tensors' transposes,
    z a view into in_proj's output) are taken as they are (the fast order: a warp's 32 channels per
    load); the chunked kernels copy them sequence-contiguous first.
    ``block_d`` channels per program, ``block_t`` time steps per chunk (powers of 2), ``num_warps``: the
    launch shape of both kernels, each left out taken from ``LAUNCH[method, memory_order(u)]`` (a default
    ``block_d`` shrunk to divide the channels per group); ``method``: ``"sequential"`` or ``"chunked"`` kernels
    (``METHOD``; ``benchmarks/selective_scan.py`` compares them all).

    Raises:
        ValueError: shapes that do not fit (``check_scan_inputs``), N not a power of 2, ``block_d`` not
            dividing the channels per group, another method.
        RuntimeError: without Triton.
    """
    if triton is None:
        raise RuntimeError("selective_scan_triton needs triton")
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    n_state = A.shape[1]
    if n_state & (n_state - 1):
        raise ValueError(f"selective_scan_triton needs N a power of 2, got {n_state}")
    if method not in get_args(ScanMethod):
        raise ValueError(f"selective_scan_triton's method must be 'chunked' or 'sequential', got {method!r}")
    groups = B.shape[1] if B.dim() == 4 else 1
    default_d, default_t, default_warps = LAUNCH[method, memory_order(u) if method == "sequential" else "sequence"]
    if block_d is None:  # the largest power of 2 up to the default dividing the channels per group
        block_d = math.gcd(default_d, u.shape[1] // groups) if groups > 1 else default_d
    block_t = default_t if block_t is None else block_t
    num_warps = default_warps if num_warps is None else num_warps
    if groups > 1 and (u.shape[1] // groups) % block_d:
        raise ValueError(
            f"selective_scan_triton needs block_d ({block_d}) to divide the channels per group "
            f"({u.shape[1]} / {groups} groups): a program's channels share one group of B and C"
        )
    B, C = _grouped(B), _grouped(C)
    launch = (block_d, block_t, num_warps, method)
    return _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, launch)
