"""A Mamba-1 block's one-token step in three Triton kernels (batch <= ``FUSED_GEMV_MAX_BATCH``).

mamba_ssm's ``Mamba.step`` (and ``StatefulMambaMixer.step``) runs five kernels between ``in_proj`` and
``out_proj``: the conv update, ``x_proj``, ``dt_proj``, the selective state update, and a copy or two.
At batch 1 each moves a few kilobytes to a few megabytes and costs mostly its launch and its tail, 64
times per token. Here:

- ``conv_x_proj``: the causal conv's state shift, its output (+ bias, SiLU) for a block of channels,
  and that block's share of ``x_proj`` (dt's low rank, B, C), summed across blocks into one float32
  buffer with atomic adds (split-K): one kernel, a column of programs per sequence (between cuBLAS's
  projections; for one sequence ``norm_in_proj_conv`` below does the same work in in_proj's epilogue);
- ``dt_state_update``: ``dt_proj`` (rank R dot per channel) + bias + softplus, the selective state
  update ``h = exp(dt A) h + dt B x``, ``y = C h + D x`` gated by ``silu(z)``: one kernel, a column
  of programs per sequence.

Both compute in float32 and keep dt, B and C in float32 (the unfused path rounds them to the model's
dtype after ``x_proj``), so in float32 they equal the unfused step up to summation order.

Around them, for small batches (where a step is a matrix-vector product per projection and launches
and tails dominate), the block boundary and both projections:

- ``norm_in_proj_conv``: RMSNorm of the float32 residual stream (recomputed by every program from the
  whole row: a few kilobytes against its slice of the weight) rounded to the weight's dtype as
  mamba_ssm's fused norm rounds it, then ``in_proj``; a program holding x rows then runs their
  channels' conv update and adds their share of ``x_proj`` into the float32 accumulator, as
  ``conv_x_proj`` does;
- ``out_proj_residual``: ``out_proj`` with the residual add as its epilogue (``residual += W y``),
  each program owning its output rows: deterministic, no split-K reduction kernel; it also zeroes the
  accumulator for the next block, so no memset kernel runs.

On Hopper and later each of them is launched with programmatic dependent launch (``launch_pdl``):
each program releases the next kernel (``gdc_launch_dependents``) once its long reads are done, so the
next kernel's programs are scheduled into this one's tail, on the SMs its finished programs free, and
load what no kernel of the step writes (their weights) before ``gdc_wait``, which returns once the
previous kernel has finished and its writes are visible. A kernel releases its successor only after
its own wait, so at most two overlap. Releasing at the end rather than right after the wait took the
batch-1 fused step from 2.53 to 2.38 ms per token (H200, 2026-12-01, MambaVLM-2.8B shapes, bf16,
random weights, 128 CUDA-graph steps, four alternating repeats each): released early, the next
kernel's programs sat in ``gdc_wait`` on SM slots the running kernel's later waves needed.

So a block is three launches (``norm_in_proj_conv``, ``dt_state_update``, ``out_proj_residual``)
instead of seven (norm, in_proj, memset, the conv + ``x_proj`` and state-update kernels, out_proj's
split-K GEMV and its reduction). Folding the conv into in_proj's epilogue took the batch-1 step from
2.38 to 2.26 ms per token (H200, 2026-12-01, same setup) once in_proj ran 16 rows per program with 4
warps; at its earlier 8 rows and 2 warps it took 2.42, the extra per-program atomic adds and
``x_proj`` column reads costing more than the launch saved.

The projections' reduction loops are software-pipelined through ``tl.range(..., num_stages=...)``. The
kernel-level ``num_stages`` they were launched with until 2026-12-01 pipelines only loads that feed a
``tl.dot``: the compiled kernels had no asynchronous copies, each program read its weight tiles one loop
iteration at a time, and every "stages" figure measured before then was nominal. Pipelined, with in_proj
at 16 x 512 x 4 warps x 3 stages, the batch-1 step took 2.24-2.25 ms per token against 2.26 for the
unpipelined kernels of commit ``f07c139`` (H200, 2026-12-01, alternating in one run).

The two projections read their weight tiles through tensor descriptors (``TensorDescriptor``): on
Hopper each tile is one bulk copy of the Tensor Memory Accelerator into shared memory, completed on an
mbarrier, with no address arithmetic or per-thread loads; ``tl.range`` pipelines them as it pipelines
pointer loads. A weight whose base or rows are not 16-byte aligned (as the TMA requires) is read through
pointers instead. With in_proj at 2 warps, the whole batch-1 step took 2.118 ms per token with both
projections on descriptors, 2.127 with in_proj alone on one, and 2.155 with pointers, against 2.255 for
the previous defaults (pointers, in_proj at 4 warps) (H200, 2026-12-01, MambaVLM-2.8B shapes, bf16, 128
CUDA-graph steps, two to three alternating repeats, 33 launch-shape pairs). Loading in_proj's conv and
``x_proj`` operands before its reduction loop rather than in the epilogue took it to 2.29 (held in
registers through the loop).

Between the kernels the HBM would idle: a kernel's last programs finish their reads, the next one
waits for them, starts, and only then issues its first. So once its own reads are done, each program
of the two projections asks the L2 for its share of the first few megabytes of the weight read next
(in_proj: its block's out_proj; out_proj: the next block's in_proj, or lm_head's weight), with bulk
prefetches (``cp.async.bulk.prefetch.L2``) that nobody waits for: the next kernel's first tiles then
come from the L2. The batch-1 step took 2.030-2.040 ms per token against 2.095-2.108 without (H200,
2026-12-01, MambaVLM-2.8B shapes, bf16, 128 CUDA-graph steps, alternating in one run; the sweep is at
``IN_PROJ_PREFETCH_BYTES``). More than a few megabytes costs time: the prefetches then compete with
the kernel's own reads.

RMSNorm needs each row's 1 / rms before in_proj's first product, so every in_proj program read the
whole residual row and reduced it before its first weight read. ``out_proj_residual``, which writes the
row, now also sums its squares (each program adds its rows' share atomically into one float32 per
sequence, a buffer the next in_proj zeroes for the block after), and the next block's in_proj reads one
number. The first block of a step still reduces the row itself. With both (H200, 2026-12-01, same
setup, four alternating repeats of each): 2.000-2.002 ms per token; the prefetch alone 2.022-2.027; the
row sums alone 2.071-2.074; neither 2.093-2.096. (A scratch run before the row sums moved in: float32
logits within 3e-6 of the per-row reduction over five steps of a 4-layer model.)

Loading the state h in ``dt_state_update`` before ``gdc_wait`` (no kernel of the step writes it before
that one) rather than after was tried and not kept: 2.026-2.033 ms per token at batch 1 against
2.041-2.048, but 2.782-2.785 at batch 4 against 2.747-2.749 (H200, 2026-12-01, four alternating repeats).

Running the state update in in_proj's kernel, two kernels per block, was tried and not kept (branch
``experiment/state-update-in-in-proj``): each program of x rows counted itself in an arrival counter (a
release) once its conv output and ``x_proj`` share were written; each program of gate rows, whose 16
rows are the gates of 16 channels, then waited for all of them (an acquire; the x programs have the
lower program ids, so CUDA schedules them first) and ran those channels' dt_proj, state update and
gating. Equal to the three kernels in float32 under the interpreter, but slower on the device: 2.034-2.035
ms per token at batch 1 against 1.993-1.996 (H200, 2026-12-01, MambaVLM-2.8B shapes, bf16, 128 CUDA-graph
steps, four alternating repeats). The waiting gate programs hold SM slots and poll the L2 while the last
x programs stream their rows, and out_proj's programs wait for the slowest of them; a short kernel
between the two projections costs less.

So was the state update in out_proj's kernel (branch ``experiment/state-update-in-out-proj``): the grid's
first 160 programs ran 32 channels' dt_proj, state update and gating each, then counted themselves in an
arrival counter; the out_proj programs after them asked the L2 for their own weight rows, waited for the
count and streamed their rows from the L2, so the HBM would read out_proj while the state update ran.
Equal to the two kernels under the interpreter and on CUDA for one call (float32 and bf16), but slower on
the device: 2.37 ms per token at batch 1 with the rows prefetched (2.33 with a 100 ns back-off between
polls, 2.30 at 8 rows per program), 2.14 without the prefetch, against 2.01-2.03 for three kernels (H200,
2026-12-01, MambaVLM-2.8B shapes, bf16, 128 CUDA-graph steps, three alternating repeats). Fed the same
tokens, its logits were as close to the unfused step's as the three kernels' are (float32, 16 layers:
within 1e-3 over six steps). Prefetching all of out_proj into the L2 takes longer than streaming it, as
in a5, and 640 programs polling one counter delay the releases they wait for.

One kernel for the whole stack was tried and not kept (branch ``experiment/persistent-decode-step``):
every layer's three phases in one cooperative launch, separated by grid-wide barriers (a release /
acquire arrival counter), the weights addressed through a table of their addresses. It was correct
(float32: within 2e-6 of these kernels at 1, 7 and 132 programs, the same greedy tokens) but slower: 2.44
ms per token at best (2 programs per SM, 4 warps, 3 stages) against 2.29 in the same run. With phases
switched off, per layer: the three barriers took 3 us together, in_proj 17-22 us, its conv and ``x_proj``
2-6, the state update 2.5, out_proj 10-11. A resident grid of 2 programs per SM (about 250 registers
each) streamed the projections more slowly than these kernels' many short programs do, which cost more
than the barriers saved over launches; 3-5 programs per SM (registers capped at 96-168) were slower still.
Its projections read through TMA descriptors over stacked copies of every layer's weights (same branch,
2026-12-01): 2.33 ms for the 64 blocks at best against 1.97-2.04 for these kernels in the same run.

One persistent CUDA kernel for the whole step was tried and not kept (branch ``experiment/stack-kernel-cuda``,
2026-12-02): a producer warp per multiprocessor streaming its block's weight rows across layers through a ring of
shared-memory stages (1-D bulk copies on mbarriers), eight consumer warps taking the products, three grid
barriers per layer. Correct, but 2.24-2.27 ms per token with four 40 KB stages against 2.01 for these kernels in
the same run (H200, MambaVLM-2.8B shapes, bf16), and 1.97 with eight 20 KB stages (not side by side); its bare
stream takes 1.35-1.38 ms, and in-kernel clocks put most of each layer's 29-34 us in L2 round trips (the
barriers, the residual row, x_proj's sums, y) that the ring cannot cover (``benchmarks/RESULTS.md`` a9). Without
the barriers (what crosses blocks sent as flagged words, NCCL's LL protocol, polled in the L2) it took 1.957 ms
against 2.02 for these kernels and 3.40 for mamba_ssm in the same run, and 1.77 with every exchange between
blocks switched off (a diagnostic build): the work inside each block stalls the stream, whatever the exchanges
cost. With out_proj split over channels and summed into the residual rows with 64-bit atomic adds it took 2.75
(a10). With sixteen consumer warps and its small operands fetched by bulk copies it took 1.860 ms against 2.03
for these kernels, and 1.78-1.80 with four ring stages per consumer warp and an L2 prefetch ahead of the ring
(a11): it ships as the opt-in persistent step, ``mambavlm.ops.mamba_stack_step``.

They run on CUDA, and anywhere under Triton's interpreter (``TRITON_INTERPRET=1``), which the CPU tests use.
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
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - Triton before 3.4
    TensorDescriptor = None

__all__ = [
    "FUSED_GEMV_MAX_BATCH",
    "conv_x_proj",
    "dt_state_update",
    "norm_in_proj_conv",
    "out_proj_residual",
    "triton_available",
]

FUSED_GEMV_MAX_BATCH = 4
"""The largest batch ``norm_in_proj_conv`` / ``out_proj_residual`` take: each program reads its weight slice
once per sequence (from L2 after the first), a matrix-vector product per row; larger batches are
matrix products, cuBLAS's work."""

IN_PROJ_BLOCK_N, IN_PROJ_BLOCK_K, IN_PROJ_NUM_WARPS = 16, 512, 2
OUT_PROJ_BLOCK_N, OUT_PROJ_BLOCK_K, OUT_PROJ_NUM_WARPS = 4, 1024, 2
"""Output rows per program, the reduction chunk and the warps of the two projection kernels. With the
weights read through TMA descriptors (the whole fused step at batch 1, H200, 2026-12-01, MambaVLM-2.8B
shapes, bf16, 128 CUDA-graph steps, two repeats; in_proj then out_proj as rows x chunk x warps x stages):
16 x 512 x 2 x 3, 4 x 1024 x 2 x 3: 2.118 / 2.118 ms per token; in_proj at 1 warp 2.128 / 2.131; its
pointers at 16 x 512 x 2 x 3 2.155, at 16 x 512 x 4 x 3 (the previous default) 2.255; in_proj 16 x 1024
x 2 x 2 2.17; 32 x 512 x 2 x 3 2.23; 16 x 256 x 2-4 warps x 3-4 2.26-2.74; 4 stages at 16 x 512 x 2
2.37; 8-row blocks 2.45-2.56; out_proj on descriptors at 4 x 1024 x 2 x 4, 8 x 1024 x 2 x 3, 4 x 2048 x 2
x 2 and 2 x 2048 x 1 x 2 2.15-2.22. Each projection alone over 64 layers
(``python -m benchmarks.decode_projections --batches 1``, same day): in_proj + RMSNorm + conv
19.62 us per layer (RMSNorm + cuBLAS 22.58, cuBLAS's GEMV alone 15.07, one read of all 64 layers 12.85),
out_proj + residual 8.53 (cuBLAS + add 13.97, GEMV 11.1 in a5, the one-read bound 6.45). With the
reduction loops pipelined through pointers (``PIPELINE_STAGES``; in_proj, out_proj as rows x chunk x warps x stages;
the whole fused step at batch 1, H200, 2026-12-01, MambaVLM-2.8B shapes, bf16, 128 CUDA-graph steps, two
repeats): 16 x 512 x 4 x 3, 4 x 1024 x 2 x 3: 2.233 / 2.234 ms per token; unpipelined (x 1, as the
kernels ran before): 16 x 1024 x 4, 4 x 1024 x 2: 2.293 / 2.292; 16 x 1024 x 4 x 2, same out_proj: 2.29;
16 x 1024 x 4 x 3: 2.48; 8 or 32 rows, 2048-wide out_proj chunks, 8-row out_proj blocks: 2.50-2.62.
Before the pipelining, in_proj's: the fastest whole fused step at batch 1 with the conv in its epilogue
(H200, 2026-12-01, same setup): 16 x 1024 x 4 warps 2.26 ms per token; 16 x 1024 x 2
2.30; 16 x 512 x 4 2.35; 8 x 1024 x 2 2.42; 32 x 512 x 4 2.59; 8 x 1024 x 4 2.65. Before the conv
moved in (in_proj alone, 8 x 1024 x 2, and out_proj's, still the default): the fastest of
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
IN_PROJ_PREFETCH_BYTES, OUT_PROJ_PREFETCH_BYTES = 4 << 20, 6 << 20
"""How much of the weight read next each projection kernel asks the L2 to fetch once its own reads
are done (``prefetch``, see the module docstring): in_proj the first 4 MiB of its block's out_proj,
out_proj the first 6 MiB of the next block's in_proj (or of lm_head). The whole fused step at batch 1
(H200, 2026-12-01, MambaVLM-2.8B shapes, bf16, 128 CUDA-graph steps, two alternating repeats each, in
MiB as in_proj's + out_proj's): 4 + 6 2.030-2.040 ms per token, 4 + 4 2.028-2.037, 6 + 4 2.028-2.038,
4 + 8 2.038-2.043, 3 + 6 2.042, 6 + 6 2.040, 12 + 6 2.070, 8 + 8 2.032; out_proj's alone: 2 MiB 2.074,
4-8 2.055-2.058, 12 2.092, 16 2.135-2.139; in_proj's alone: 2-8 MiB 2.078-2.090; neither: 2.095-2.108.
4 KiB and 64 KiB prefetches instead of 16 KiB (``L2_PREFETCH_CHUNK``) measured the same within 0.01 ms;
prefetching only each in_proj row block's first tile (1-2 KiB of every row, so every program's first
read hits the L2, 4-10 MiB in all) 2.047-2.078. Prefetching out_proj from ``dt_state_update``, whose
programs start as in_proj's reads end, cost time: a quarter of it 2.19, all of it 2.64. Swept again
once out_proj summed the rows' squares (same setup, two repeats): 4 + 6 1.999-2.004, 8 + 6 2.003, 3 + 5
2.004-2.005, 6 + 6 2.000-2.017, 4 + 8 2.007, 2 + 4 2.016-2.018, 4 + 4 2.017-2.021; in_proj's launch
shape with 4 + 6: 16 x 512 x 1 warp x 3 stages 1.993, 16 x 512 x 2 x 2 2.029, 16 x 1024 x 2 x 2 2.07,
16 x 256 x 2 x 3 2.16, 8 x 512 x 1 x 3 2.27, 32 x 256 x 2 x 3-4 2.36-2.42."""
L2_PREFETCH_CHUNK = 16 << 10
"""Bytes per bulk L2 prefetch instruction (``cp.async.bulk.prefetch.L2``)."""
PIPELINE_STAGES = 3
"""Weight tiles in flight per program of the projection kernels: ``tl.range``'s software pipelining of
the reduction loop (asynchronous copies into shared memory, so block_n x block_k x stages weights must
fit in it). The kernel-level ``num_stages`` pipelines only loads that feed ``tl.dot``."""


if triton is not None:

    @triton.jit
    def _prefetch_l2(base, start, stop, PIECES: tl.constexpr, CHUNK: tl.constexpr):
        """Ask the L2 for bytes [start, stop) of the int8 pointer ``base``: up to PIECES bulk prefetches
        (``cp.async.bulk.prefetch.L2.global``, PTX ISA 8.0, sm_90) of CHUNK bytes, each issued by one
        thread and not waited for. start, stop and the address must be multiples of 16 (the
        instruction's rule); empty pieces issue nothing."""
        lo = start + tl.arange(0, PIECES) * CHUNK
        size = tl.maximum(tl.minimum(stop - lo, CHUNK), 0).to(tl.int32)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [base + lo, size], dtype=tl.int32, is_pure=False, pack=1,
        )

    @triton.jit
    def _row_tile(ptr, rows, rows_ok, cols, cols_ok, width):
        """The (rows, cols) tile of a row-major matrix of ``width`` columns, float32, zeros outside."""
        return tl.load(ptr + rows[:, None] * width + cols[None, :], mask=rows_ok[:, None] & cols_ok[None, :],
                       other=0.0).to(tl.float32)

    @triton.jit
    def _weight_tile(w, rows, rows_ok, row0, cols, cols_ok, k0, width, TMA: tl.constexpr):
        """A (BLOCK_N, BLOCK_K) weight tile in float32, zeros outside: through the tensor descriptor ``w``
        (the Tensor Memory Accelerator's bulk copy on Hopper) when ``TMA``, else through pointer ``w``."""
        if TMA:
            tile = w.load([row0, k0]).to(tl.float32)
        else:
            tile = _row_tile(w, rows, rows_ok, cols, cols_ok, width)
        return tile

    @triton.jit
    def _conv_operands(
        rows,  # (BLOCK,) channels
        conv_w_ptr, conv_b_ptr,  # (Di, W), (Di,)
        x_proj_ptr,  # (R2, Di) x_proj weight
        channels, r2,
        W: tl.constexpr, W_POW2: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        """The weights a block of channels' conv update and x_proj share read, constants of the step: the
        conv weights (BLOCK, W_POW2) and bias (BLOCK,) in float32, the x_proj columns (BLOCK_R, BLOCK) in
        their dtype."""
        d_ok = rows < channels
        j = tl.arange(0, W_POW2)
        conv_w = tl.load(conv_w_ptr + rows[:, None] * W + j[None, :], mask=d_ok[:, None] & (j < W)[None, :],
                         other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(conv_b_ptr + rows, mask=d_ok, other=0.0).to(tl.float32)
        else:
            bias = tl.zeros_like(rows).to(tl.float32)
        ri = tl.arange(0, BLOCK_R)
        proj = tl.load(x_proj_ptr + ri[:, None] * channels + rows[None, :], mask=(ri < r2)[:, None] & d_ok[None, :],
                       other=0.0)
        return conv_w, bias, proj

    @triton.jit
    def _conv_x_proj_apply(
        xz,  # (BLOCK, S): the channels' new conv inputs, one column per sequence
        rows, bi, seq_ok,  # (BLOCK,) channels, (S,) sequences, (1, S) which sequences exist
        conv_w, bias, proj,  # _conv_operands' tensors
        state_ptr,  # (B, Di, W) conv state, oldest first; shifted in place
        x_ptr,  # (B, Di) conv output, the model's dtype
        xdbl_ptr,  # (B, R2) float32: receives this block's share of dt_low | B | C
        channels, r2,
        W: tl.constexpr, W_POW2: tl.constexpr, SILU: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr,
    ):
        """A block of channels' conv update (state shift, conv + bias + SiLU, stored to x) and their share
        of ``x_proj``, added into xdbl with atomic adds (the other channel blocks add theirs)."""
        d_ok = rows < channels
        j = tl.arange(0, W_POW2)
        live = d_ok[:, None, None] & seq_ok[:, :, None] & (j < W)[None, None, :]
        cell = state_ptr + bi[None, :, None] * channels * W + rows[:, None, None] * W + j[None, None, :]
        old = tl.load(cell, mask=live, other=0.0)  # (BLOCK, S, W_POW2)
        # The window shifted left (window[j] = old[j + 1]) in registers, not by loading cell + 1: a store
        # to cell j then depends on its whole row's loads, so no thread overwrites a cell that another is
        # yet to read. (Loading cell + 1 races with the store to cell j wherever a row's cells lie in
        # different warps: it gave wrong states on an H200 in the persistent-kernel experiment's layout,
        # where a barrier between loads and stores, as conv_x_proj has, would have stopped the
        # pipelining of the loop around this code.)
        shift = j[None, None, None, :] == j[None, None, :, None] + 1  # (.., destination j, source j)
        older = tl.sum(tl.where(shift, old[:, :, None, :].to(tl.float32), 0.0), axis=3)
        window = tl.where(j[None, None, :] == W - 1, xz[:, :, None].to(old.dtype).to(tl.float32), older)
        tl.store(cell, window.to(old.dtype), mask=live)
        out = tl.sum(window * conv_w[:, None, :], axis=2) + bias[:, None]  # (BLOCK, S)
        if SILU:
            out = out * tl.sigmoid(out)
        out = tl.where(d_ok[:, None] & seq_ok, out, 0.0)
        tl.store(x_ptr + bi[None, :] * channels + rows[:, None], out.to(x_ptr.dtype.element_ty),
                 mask=d_ok[:, None] & seq_ok)
        if PDL:  # the long reads are done: let the next kernel fill the SMs this one frees
            gdc_launch_dependents()
        ri = tl.arange(0, BLOCK_R)
        share = tl.sum(proj.to(tl.float32)[:, :, None] * out[None, :, :], axis=1)  # (BLOCK_R, S)
        tl.atomic_add(xdbl_ptr + bi[None, :] * r2 + ri[:, None], share, mask=(ri < r2)[:, None] & seq_ok,
                      sem="relaxed")

    @triton.jit
    def _conv_x_proj_rows(
        xz, rows, bi, seq_ok, state_ptr, conv_w_ptr, conv_b_ptr, x_proj_ptr, x_ptr, xdbl_ptr, channels, r2,
        W: tl.constexpr, W_POW2: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
        BLOCK_R: tl.constexpr, PDL: tl.constexpr,
    ):
        """``_conv_operands`` then ``_conv_x_proj_apply``."""
        conv_w, bias, proj = _conv_operands(rows, conv_w_ptr, conv_b_ptr, x_proj_ptr, channels, r2, W, W_POW2,
                                            HAS_BIAS, BLOCK_R)
        _conv_x_proj_apply(xz, rows, bi, seq_ok, conv_w, bias, proj, state_ptr, x_ptr, xdbl_ptr, channels, r2, W,
                           W_POW2, SILU, BLOCK_R, PDL)

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
        """One block of channels of one sequence (``conv_x_proj``): what ``_conv_x_proj_apply`` computes for
        in_proj's epilogue, in the (channels, window) layout. Sharing that helper's (channels, sequences,
        window) layout here took the fused step at batch 4 from 2.83 to 3.04 ms per token (H200,
        2026-12-01, one run, MambaVLM-2.8B shapes, bf16)."""
        d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < channels
        b = tl.program_id(1)
        conv_w, bias, proj = _conv_operands(d, conv_w_ptr, conv_b_ptr, x_proj_ptr, channels, rows, W, W_POW2,
                                            HAS_BIAS, BLOCK_R)
        proj = proj.to(tl.float32)
        if PDL:  # the weights above are the step's constants; what follows reads in_proj's output
            gdc_wait()
        x = tl.load(x_ptr + b * stride_x_b + d, mask=d_ok, other=0.0)
        k = tl.arange(0, W_POW2)
        k_ok = k < W
        state_row = state_ptr + b * channels * W + d[:, None] * W
        older = tl.load(state_row + k[None, :] + 1, mask=d_ok[:, None] & (k[None, :] + 1 < W), other=0.0)
        window = tl.where(k[None, :] == W - 1, x[:, None].to(older.dtype), older)
        tl.debug_barrier()  # cell k is another thread's cell + 1: every old value is read before any is written
        tl.store(state_row + k[None, :], window, mask=d_ok[:, None] & k_ok[None, :])
        out = tl.sum(window.to(tl.float32) * conv_w, axis=1) + bias
        if SILU:
            out = out * tl.sigmoid(out)
        out = tl.where(d_ok, out, 0.0)
        tl.store(out_ptr + b * channels + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)
        if PDL:  # the long reads are done: let the next kernel fill the SMs this one frees
            gdc_launch_dependents()
        r = tl.arange(0, BLOCK_R)
        tl.atomic_add(xdbl_ptr + b * rows + r, tl.sum(proj * out[None, :], axis=1), mask=r < rows)

    @triton.jit
    def _ssm_operands(
        block,  # the channel block
        dt_w_ptr, dt_bias_ptr,  # (Di, R), (Di,) float32
        a_ptr, d_skip_ptr,  # (Di, N) float32 (A = -exp(A_log)), (Di,)
        channels, rank,
        N: tl.constexpr, N_POW2: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_RANK: tl.constexpr,
    ):
        """The weights a block of channels' state update reads, constants of the step, in float32: dt_proj's
        rows (BLOCK_D, BLOCK_RANK), dt's bias (BLOCK_D,), A (BLOCK_D, N_POW2), D (BLOCK_D,)."""
        d = block * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < channels
        j = tl.arange(0, BLOCK_RANK)
        dt_w = tl.load(dt_w_ptr + d[:, None] * rank + j[None, :], mask=d_ok[:, None] & (j < rank)[None, :], other=0.0)
        dt_bias = tl.load(dt_bias_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
        n = tl.arange(0, N_POW2)
        dn_ok = d_ok[:, None] & (n < N)[None, :]
        a = tl.load(a_ptr + d[:, None] * N + n[None, :], mask=dn_ok, other=0.0).to(tl.float32)
        d_skip = tl.load(d_skip_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
        return dt_w.to(tl.float32), dt_bias, a, d_skip

    @triton.jit
    def _ssm_apply(
        block, b,  # the channel block and the sequence
        dt_w, dt_bias, a, d_skip,  # _ssm_operands' tensors
        xdbl_ptr,  # (B, R2) float32: dt_low | B | C
        x_ptr,  # (B, Di) conv output
        z_ptr, stride_z_b,  # (B, Di) gate (the z half of in_proj's output)
        state_ptr,  # (B, Di, N) float32, updated in place
        y_ptr,  # (B, Di), the model's dtype
        channels, rank,
        N: tl.constexpr, N_POW2: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_RANK: tl.constexpr, PDL: tl.constexpr,
    ):
        """dt_proj + bias + softplus, the selective state update ``h = exp(dt A) h + dt B x`` and the gated
        output ``y = (C h + D x) silu(z)`` of one block of channels of one sequence."""
        d = block * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < channels
        j = tl.arange(0, BLOCK_RANK)
        n = tl.arange(0, N_POW2)
        n_ok = n < N
        row_width = rank + 2 * N
        low = tl.load(xdbl_ptr + b * row_width + j, mask=j < rank, other=0.0)
        b_in = tl.load(xdbl_ptr + b * row_width + rank + n, mask=n_ok, other=0.0)
        c_out = tl.load(xdbl_ptr + b * row_width + rank + N + n, mask=n_ok, other=0.0)
        dt = tl.sum(dt_w * low[None, :], axis=1) + dt_bias
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)  # softplus, as mamba_ssm's threshold
        x = tl.load(x_ptr + b * channels + d, mask=d_ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + b * stride_z_b + d, mask=d_ok, other=0.0).to(tl.float32)
        state_row = state_ptr + b * channels * N + d[:, None] * N + n[None, :]
        dn_ok = d_ok[:, None] & n_ok[None, :]
        h = tl.load(state_row, mask=dn_ok, other=0.0)
        h = h * tl.exp(dt[:, None] * a) + (dt * x)[:, None] * b_in[None, :]
        tl.store(state_row, h, mask=dn_ok)
        if PDL:  # the long reads are done: let the next kernel fill the SMs this one frees
            gdc_launch_dependents()
        y = tl.sum(h * c_out[None, :], axis=1) + d_skip * x
        y = y * z * tl.sigmoid(z)
        tl.store(y_ptr + b * channels + d, y.to(y_ptr.dtype.element_ty), mask=d_ok)

    @triton.jit
    def _dt_state_update_kernel(
        xdbl_ptr, x_ptr, z_ptr, stride_z_b, dt_w_ptr, dt_bias_ptr, a_ptr, d_skip_ptr, state_ptr, y_ptr,
        channels, rank,
        N: tl.constexpr, N_POW2: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_RANK: tl.constexpr,
        PDL: tl.constexpr,
    ):
        block, b = tl.program_id(0), tl.program_id(1)
        dt_w, dt_bias, a, d_skip = _ssm_operands(block, dt_w_ptr, dt_bias_ptr, a_ptr, d_skip_ptr, channels, rank, N,
                                                 N_POW2, BLOCK_D, BLOCK_RANK)
        if PDL:  # dt_proj, A, D: constants of the step; xdbl, x and z come from the previous kernel
            gdc_wait()
        _ssm_apply(block, b, dt_w, dt_bias, a, d_skip, xdbl_ptr, x_ptr, z_ptr, stride_z_b, state_ptr, y_ptr, channels,
                   rank, N, N_POW2, BLOCK_D, BLOCK_RANK, PDL)

    @triton.jit
    def _rstd(residual_ptr, batch, eps, D: tl.constexpr, D_POW2: tl.constexpr, B_POW2: tl.constexpr):
        """RMSNorm's 1 / rms of each sequence's float32 row, (B_POW2,), from the whole (B, D) stream."""
        bi = tl.arange(0, B_POW2)
        d = tl.arange(0, D_POW2)
        whole = tl.load(residual_ptr + bi[:, None] * D + d[None, :], mask=(bi < batch)[:, None] & (d[None, :] < D),
                        other=0.0)
        return 1.0 / tl.sqrt(tl.sum(whole * whole, axis=1) / D + eps)

    @triton.jit
    def _norm_in_proj_tile(
        acc, rows, rows_ok, bi, b_ok, k0, rstd,  # acc (BLOCK_N, B_POW2) float32; rstd (B_POW2,) each row's 1 / rms
        residual_ptr,  # (B, D) float32 residual stream
        norm_w_ptr,  # (D,) RMSNorm weight
        w,  # (2 Di, D) in_proj weight, the x rows then the z rows: a (BLOCK_N, BLOCK_K)-block descriptor or a pointer
        row0,  # rows[0]
        ROUND_TO: tl.constexpr,  # the weight's dtype
        D: tl.constexpr, BLOCK_K: tl.constexpr, TMA: tl.constexpr,
    ):
        """acc + the columns k0 .. k0 + BLOCK_K of ``in_proj(rms_norm(residual))`` for ``rows``: the norm's
        output rounded to the weight's dtype, as mamba_ssm's fused norm rounds it; each weight tile read
        once for the whole batch."""
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < D
        g = tl.load(norm_w_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        r = _row_tile(residual_ptr, bi, b_ok, k, k_ok, D)
        x = (r * rstd[:, None] * g[None, :]).to(ROUND_TO).to(tl.float32)
        tile = _weight_tile(w, rows, rows_ok, row0, k, k_ok, k0, D, TMA)
        return acc + tl.sum(tile[:, None, :] * x[None, :, :], axis=2)

    @triton.jit
    def _in_proj_conv_epilogue(
        acc, block, rows, rows_ok, bi, b_ok,  # acc (BLOCK_N, B_POW2): in_proj's rows ``rows`` in float32
        state_ptr, conv_w_ptr, conv_b_ptr, x_proj_ptr,  # as _conv_x_proj_rows
        x_ptr, z_ptr,  # (B, Di) each, the weight's dtype: the conv output and the gate
        xdbl_ptr,  # (B, R2) float32: receives dt_low | B | C
        channels, r2,
        W: tl.constexpr, W_POW2: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """A finished block of in_proj rows: z rows are stored; x rows run their channels' conv update and
        x_proj share (``_conv_x_proj_rows``)."""
        xz = acc.to(x_ptr.dtype.element_ty)  # (BLOCK_N, B_POW2): in_proj's output, rounded as nn.Linear's
        seq_ok = b_ok[None, :]
        gate = rows >= channels
        tl.store(z_ptr + bi[None, :] * channels + (rows - channels)[:, None], xz,
                 mask=(rows_ok & gate)[:, None] & seq_ok)
        if block * BLOCK_N < channels:  # x rows: the conv update, its output and its share of x_proj
            _conv_x_proj_rows(xz, rows, bi, seq_ok, state_ptr, conv_w_ptr, conv_b_ptr, x_proj_ptr, x_ptr, xdbl_ptr,
                              channels, r2, W, W_POW2, HAS_BIAS, SILU, BLOCK_R, False)

    @triton.jit
    def _norm_in_proj_conv_kernel(
        residual_ptr, norm_w_ptr, w, state_ptr, conv_w_ptr, conv_b_ptr, x_proj_ptr, x_ptr, z_ptr, xdbl_ptr,
        batch, channels, r2, eps,
        D: tl.constexpr, D_POW2: tl.constexpr, B_POW2: tl.constexpr, W: tl.constexpr, W_POW2: tl.constexpr,
        HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, STAGES: tl.constexpr, TMA: tl.constexpr, PDL: tl.constexpr,
        prefetch_ptr, prefetch_share, prefetch_total, PREFETCH_PIECES: tl.constexpr, PREFETCH_CHUNK: tl.constexpr,
        squares_ptr,  # (B,) float32: each residual row's sum of squares (SQUARES_IN)
        zero_squares_ptr,  # (B,) float32, zeroed by program 0 (ZERO_SQUARES): what this block's out_proj sums into
        SQUARES_IN: tl.constexpr, ZERO_SQUARES: tl.constexpr,
    ):
        if PDL:
            gdc_wait()
        block = tl.program_id(0)
        if SQUARES_IN:  # summed by the previous block's out_proj: one load instead of the whole row
            bq = tl.arange(0, B_POW2)
            rstd = 1.0 / tl.sqrt(tl.load(squares_ptr + bq, mask=bq < batch, other=0.0) / D + eps)
        else:
            rstd = _rstd(residual_ptr, batch, eps, D, D_POW2, B_POW2)  # every program, every row: a few kilobytes
        if ZERO_SQUARES:
            if block == 0:
                bz = tl.arange(0, B_POW2)
                tl.store(zero_squares_ptr + bz, tl.zeros([B_POW2], dtype=tl.float32), mask=bz < batch)
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_ok = rows < 2 * channels
        bi = tl.arange(0, B_POW2)
        b_ok = bi < batch
        acc = tl.zeros([BLOCK_N, B_POW2], dtype=tl.float32)
        for k0 in tl.range(0, D, BLOCK_K, num_stages=STAGES):
            acc = _norm_in_proj_tile(acc, rows, rows_ok, bi, b_ok, k0, rstd, residual_ptr, norm_w_ptr, w,
                                     block * BLOCK_N, z_ptr.dtype.element_ty, D, BLOCK_K, TMA)
        if PREFETCH_PIECES > 0:  # its share of the next weight, while the HBM would idle between kernels
            _prefetch_l2(prefetch_ptr, block * prefetch_share,
                         tl.minimum((block + 1) * prefetch_share, prefetch_total), PREFETCH_PIECES, PREFETCH_CHUNK)
        if PDL:  # the long reads are done: let the next kernel fill the SMs this one frees
            gdc_launch_dependents()
        _in_proj_conv_epilogue(acc, block, rows, rows_ok, bi, b_ok, state_ptr, conv_w_ptr, conv_b_ptr, x_proj_ptr,
                               x_ptr, z_ptr, xdbl_ptr, channels, r2, W, W_POW2, HAS_BIAS, SILU, BLOCK_R, BLOCK_N)

    @triton.jit
    def _out_proj_tile(
        acc, rows, rows_ok, bi, b_ok, k0,  # acc (BLOCK_N, B_POW2) float32
        y_ptr,  # (B, D_in)
        w, row0,  # (D_out, D_in) out_proj weight (a descriptor or a pointer, as _norm_in_proj_tile's); rows[0]
        D_IN: tl.constexpr, BLOCK_K: tl.constexpr, TMA: tl.constexpr,
    ):
        """acc + the columns k0 .. k0 + BLOCK_K of ``out_proj(y)`` for ``rows``, each weight tile read once
        for the whole batch."""
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < D_IN
        y = _row_tile(y_ptr, bi, b_ok, k, k_ok, D_IN)
        tile = _weight_tile(w, rows, rows_ok, row0, k, k_ok, k0, D_IN, TMA)
        return acc + tl.sum(tile[:, None, :] * y[None, :, :], axis=2)

    @triton.jit
    def _residual_add(acc, rows, rows_ok, bi, b_ok, residual_ptr, d_out, ROUND_TO: tl.constexpr, squares_ptr,
                      SQUARES: tl.constexpr):
        """``residual[:, rows] += acc`` (acc (BLOCK_N, B_POW2) float32, rounded to ``ROUND_TO`` first, as
        nn.Linear's output is rounded before the add); each row owned by one block: no reduction across
        blocks. With ``SQUARES`` the new rows' sum of squares is added into ``squares_ptr`` (B,)."""
        acc = acc.to(ROUND_TO).to(tl.float32)
        out = residual_ptr + bi[None, :] * d_out + rows[:, None]
        ok = rows_ok[:, None] & b_ok[None, :]
        new = tl.load(out, mask=ok, other=0.0) + acc
        tl.store(out, new, mask=ok)
        if SQUARES:
            tl.atomic_add(squares_ptr + bi, tl.sum(new * new, axis=0), mask=b_ok, sem="relaxed")

    @triton.jit
    def _out_proj_residual_kernel(
        y_ptr, w, residual_ptr,
        zero_ptr, zero_count,  # a float32 buffer zeroed by program 0 (the next block's x_proj accumulator)
        batch, d_out,
        D_IN: tl.constexpr, B_POW2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_Z: tl.constexpr, STAGES: tl.constexpr, TMA: tl.constexpr, PDL: tl.constexpr,
        prefetch_ptr, prefetch_share, prefetch_total, PREFETCH_PIECES: tl.constexpr, PREFETCH_CHUNK: tl.constexpr,
        squares_ptr,  # (B,) float32, zero on entry: receives each updated row's sum of squares (SQUARES_OUT)
        SQUARES_OUT: tl.constexpr,
    ):
        if PDL:
            gdc_wait()
        if BLOCK_Z > 0:
            if tl.program_id(0) == 0:
                zi = tl.arange(0, BLOCK_Z)
                tl.store(zero_ptr + zi, tl.zeros([BLOCK_Z], dtype=tl.float32), mask=zi < zero_count)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_ok = rows < d_out
        bi = tl.arange(0, B_POW2)
        b_ok = bi < batch
        acc = tl.zeros([BLOCK_N, B_POW2], dtype=tl.float32)
        for k0 in tl.range(0, D_IN, BLOCK_K, num_stages=STAGES):
            acc = _out_proj_tile(acc, rows, rows_ok, bi, b_ok, k0, y_ptr, w, tl.program_id(0) * BLOCK_N, D_IN, BLOCK_K,
                                 TMA)
        if PREFETCH_PIECES > 0:  # its share of the next weight, while the HBM would idle between kernels
            block = tl.program_id(0)
            _prefetch_l2(prefetch_ptr, block * prefetch_share,
                         tl.minimum((block + 1) * prefetch_share, prefetch_total), PREFETCH_PIECES, PREFETCH_CHUNK)
        if PDL:  # the long reads are done: let the next kernel fill the SMs this one frees
            gdc_launch_dependents()
        if TMA:
            round_to: tl.constexpr = w.dtype
        else:
            round_to: tl.constexpr = w.dtype.element_ty
        _residual_add(acc, rows, rows_ok, bi, b_ok, residual_ptr, d_out, round_to, squares_ptr, SQUARES_OUT)


@functools.cache
def _device_has_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def _pdl(t: Tensor) -> dict[str, bool]:
    """The launch arguments for programmatic dependent launch: on for a CUDA tensor of a Hopper or
    later GPU with a Triton that has it (off under Triton's interpreter)."""
    on = _TRITON_HAS_PDL and t.is_cuda and _device_has_pdl(t.device.index or 0)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


def _prefetch_shares(size: int, nbytes: int, programs: int) -> tuple[int, int, int]:
    """How ``programs`` programs prefetch the first ``nbytes`` of a ``size``-byte tensor: (each program's
    share, a multiple of 16 bytes; the total, clamped to the tensor and rounded down to 16 bytes; the
    pieces of at most ``L2_PREFETCH_CHUNK`` bytes per program, a power of two as ``tl.arange`` needs, the
    spare ones empty). Program i fetches [i share, min((i + 1) share, total))."""
    total = min(nbytes, size) // 16 * 16
    if total <= 0:
        return 0, 0, 0
    share = -(-total // programs)
    share = -(-share // 16) * 16
    return share, total, 1 << (-(-share // L2_PREFETCH_CHUNK) - 1).bit_length()


def _prefetch_args(prefetch: Tensor | None, nbytes: int, programs: int, like: Tensor) -> dict[str, object]:
    """The kernel arguments for the L2 prefetch of the first ``nbytes`` of ``prefetch`` by ``programs``
    programs (``_prefetch_shares``). Off (no pieces) for None, nothing to fetch, a base not 16-byte
    aligned, or anything but CUDA tensors on a Hopper or later GPU. Raises ValueError for a
    non-contiguous ``prefetch``."""
    off = {"prefetch_ptr": like, "prefetch_share": 0, "prefetch_total": 0, "PREFETCH_PIECES": 0,
           "PREFETCH_CHUNK": L2_PREFETCH_CHUNK}
    if prefetch is None:
        return off
    if not prefetch.is_contiguous():
        raise ValueError(f"prefetch must be contiguous, got strides {tuple(prefetch.stride())}")
    share, total, pieces = _prefetch_shares(prefetch.numel() * prefetch.element_size(), nbytes, programs)
    hopper = like.is_cuda and prefetch.is_cuda and _device_has_pdl(like.device.index or 0)
    if pieces == 0 or not hopper or prefetch.data_ptr() % 16:
        return off
    return {"prefetch_ptr": prefetch.view(-1).view(torch.int8), "prefetch_share": share, "prefetch_total": total,
            "PREFETCH_PIECES": pieces, "PREFETCH_CHUNK": L2_PREFETCH_CHUNK}


def _weight_operand(name: str, weight: Tensor, block_n: int, block_k: int) -> tuple[object, bool]:
    """A projection weight as its kernel reads it, and whether that is a tensor descriptor: one of
    (block_n, block_k) blocks (the Tensor Memory Accelerator's bulk copies on Hopper; Triton lowers it to
    plain loads on older GPUs) when its base and rows are 16-byte aligned, as the TMA requires; otherwise
    the weight itself, read through pointers. Raises ValueError for a weight that is not row-major
    contiguous."""
    if not weight.is_contiguous():
        raise ValueError(f"{name} must be contiguous (row-major), got strides {tuple(weight.stride())}")
    aligned = (
        TensorDescriptor is not None and weight.data_ptr() % 16 == 0
        and weight.stride(0) * weight.element_size() % 16 == 0
    )
    return (TensorDescriptor.from_tensor(weight, [block_n, block_k]), True) if aligned else (weight, False)


def _check_row_sums(name: str, sums: Tensor | None, residual: Tensor) -> Tensor:
    """``sums`` (or ``residual`` as an unused stand-in when None), checked to be one contiguous float32
    value per residual row on its device. Raises ValueError otherwise."""
    if sums is None:
        return residual
    if sums.shape != residual.shape[:1] or sums.dtype != torch.float32 or not sums.is_contiguous() \
            or sums.device != residual.device:
        raise ValueError(f"{name} must be a contiguous float32 ({residual.shape[0]},) tensor on {residual.device}, "
                         f"got {sums.dtype} {tuple(sums.shape)} strides {tuple(sums.stride())} on {sums.device}")
    return sums


def _check_small_batch(name: str, x: Tensor) -> None:
    if x.shape[0] > FUSED_GEMV_MAX_BATCH:
        raise ValueError(f"{name} takes at most {FUSED_GEMV_MAX_BATCH} sequences, got {x.shape[0]}")


def norm_in_proj_conv(
    residual: Tensor, norm_weight: Tensor, eps: float, in_proj_weight: Tensor, conv_state: Tensor,
    conv_weight: Tensor, conv_bias: Tensor | None, x_proj_weight: Tensor, silu: bool, xdbl: Tensor,
    block_n: int = IN_PROJ_BLOCK_N, block_k: int = IN_PROJ_BLOCK_K, num_warps: int = IN_PROJ_NUM_WARPS,
    num_stages: int = PIPELINE_STAGES, prefetch: Tensor | None = None, prefetch_bytes: int = IN_PROJ_PREFETCH_BYTES,
    sum_squares: Tensor | None = None, zero_sum_squares: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """A block's input side in one kernel: ``xz = in_proj(rms_norm(residual))``, then the causal conv
    update of the x half and its share of ``x_proj``.

    residual (B, D) float32, B <= FUSED_GEMV_MAX_BATCH; norm_weight (D,); in_proj_weight (2 Di, D)
    contiguous, without bias (read through a TMA descriptor where 16-byte aligned); conv_state
    (B, Di, W) contiguous, shifted in place; conv_weight (Di, W), conv_bias (Di,) or None;
    x_proj_weight (R2, Di); xdbl (B, R2) float32, contiguous and zero on entry
    (``out_proj_residual(..., zero=xdbl)`` leaves it so): ``x_proj`` of the conv output is added into
    it, in float32. Returns the conv output x (+ bias, then SiLU when ``silu``) and the gate z, (B, Di)
    each in the weight's dtype. The norm's output and in_proj's are rounded to the weight's dtype, as
    mamba_ssm's fused norm and ``nn.Linear`` round them. ``block_n`` output rows per program (each
    program owning x rows also runs their channels' conv), ``block_k`` the reduction chunk,
    ``num_warps``, ``num_stages``: the launch shape (``benchmarks/decode_projections.py`` compares
    them). ``prefetch`` (contiguous), when given, is the weight read next (the block's out_proj): on
    Hopper and later GPUs, once its reduction loop is done, each program asks the L2 for its share of
    the first ``prefetch_bytes`` of it (module docstring). ``sum_squares`` (B,) float32, when given,
    holds each residual row's sum of squares (the previous block's ``out_proj_residual`` sums them):
    RMSNorm's 1 / rms comes from it rather than from every program reading the whole row.
    ``zero_sum_squares`` (B,) float32, when given, is zeroed once the previous kernel has finished: the
    buffer this block's ``out_proj_residual`` sums into. Raises ValueError for a larger batch, a
    mismatched in_proj, a non-contiguous weight or ``prefetch``, or row sums that are not contiguous
    float32 (B,).
    """
    _check_small_batch("norm_in_proj_conv", residual)
    batch, d_model = residual.shape
    channels, width = conv_weight.shape
    if in_proj_weight.shape[0] != 2 * channels:
        raise ValueError(f"in_proj has {in_proj_weight.shape[0]} rows; {channels} conv channels need {2 * channels}")
    r2 = x_proj_weight.shape[0]
    x = torch.empty(batch, channels, device=residual.device, dtype=in_proj_weight.dtype)
    z = torch.empty_like(x)
    weight, tma = _weight_operand("in_proj_weight", in_proj_weight, block_n, block_k)
    programs = triton.cdiv(2 * channels, block_n)
    _norm_in_proj_conv_kernel[(programs,)](
        residual, norm_weight, weight, conv_state, conv_weight,
        conv_bias if conv_bias is not None else conv_weight, x_proj_weight, x, z, xdbl, batch, channels, r2, eps,
        D=d_model, D_POW2=triton.next_power_of_2(d_model), B_POW2=triton.next_power_of_2(batch),
        W=width, W_POW2=triton.next_power_of_2(width), HAS_BIAS=conv_bias is not None, SILU=silu,
        BLOCK_R=triton.next_power_of_2(r2), BLOCK_N=block_n, BLOCK_K=block_k, STAGES=num_stages, TMA=tma,
        num_warps=num_warps, **_pdl(residual), **_prefetch_args(prefetch, prefetch_bytes, programs, residual),
        squares_ptr=_check_row_sums("sum_squares", sum_squares, residual),
        zero_squares_ptr=_check_row_sums("zero_sum_squares", zero_sum_squares, residual),
        SQUARES_IN=sum_squares is not None, ZERO_SQUARES=zero_sum_squares is not None,
    )
    return x, z


def out_proj_residual(
    y: Tensor, out_proj_weight: Tensor, residual: Tensor, zero: Tensor | None = None,
    block_n: int = OUT_PROJ_BLOCK_N, block_k: int = OUT_PROJ_BLOCK_K, num_warps: int = OUT_PROJ_NUM_WARPS,
    num_stages: int = PIPELINE_STAGES, prefetch: Tensor | None = None, prefetch_bytes: int = OUT_PROJ_PREFETCH_BYTES,
    sum_squares: Tensor | None = None,
) -> None:
    """``residual += out_proj(y)`` in place: y (B, D_in), B <= FUSED_GEMV_MAX_BATCH; out_proj_weight
    (D_out, D_in) contiguous, without bias; residual (B, D_out) float32, contiguous. The projection is rounded to
    the weight's dtype before the add, as the unfused block rounds it. ``zero`` (float32, contiguous),
    when given, is zeroed once the previous kernel has finished: the next block's ``xdbl``. Launch
    shape, weight reads and ``prefetch`` (here the next block's in_proj, or lm_head's weight after the
    last block) as ``norm_in_proj_conv``'s. ``sum_squares`` (B,) float32, zero on entry, when given:
    receives each updated residual row's sum of squares, for the next block's norm (one atomic add per
    program and row, so its float32 rounding varies with their order). Raises ValueError for a larger
    batch, a non-contiguous weight or ``prefetch``, or row sums that are not contiguous float32 (B,)."""
    _check_small_batch("out_proj_residual", y)
    batch, d_in = y.shape
    d_out = out_proj_weight.shape[0]
    weight, tma = _weight_operand("out_proj_weight", out_proj_weight, block_n, block_k)
    programs = triton.cdiv(d_out, block_n)
    _out_proj_residual_kernel[(programs,)](
        y, weight, residual, zero if zero is not None else residual, 0 if zero is None else zero.numel(),
        batch, d_out, D_IN=d_in, B_POW2=triton.next_power_of_2(batch), BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_Z=0 if zero is None else triton.next_power_of_2(max(zero.numel(), 1)), STAGES=num_stages, TMA=tma,
        num_warps=num_warps, **_pdl(y), **_prefetch_args(prefetch, prefetch_bytes, programs, y),
        squares_ptr=_check_row_sums("sum_squares", sum_squares, residual), SQUARES_OUT=sum_squares is not None,
    )


def conv_x_proj(
    x: Tensor, conv_state: Tensor, conv_weight: Tensor, conv_bias: Tensor | None, x_proj_weight: Tensor, silu: bool,
) -> tuple[Tensor, Tensor]:
    """x (B, Di) (rows may be strided), conv_state (B, Di, W) contiguous, updated in place; conv_weight
    (Di, W), conv_bias (Di,) or None; x_proj_weight (R + 2N, Di). Returns the conv output (B, Di) in x's
    dtype and x_proj of it, (B, R + 2N) in float32."""
    batch, channels = x.shape
    rows = x_proj_weight.shape[0]
    width = conv_weight.shape[1]
    out = torch.empty(batch, channels, device=x.device, dtype=x.dtype)
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
