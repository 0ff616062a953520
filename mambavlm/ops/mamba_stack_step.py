"""One decoded token through a whole Mamba-1 language model in one persistent CUDA kernel (batch 1).

``mambavlm.ops.mamba_step`` runs a block in three Triton kernels; between kernels the HBM idles while the
last programs of one finish and the next kernel starts. Here (``csrc/mamba_stack_step.cu``) one launch runs
every block, the final norm and lm_head, and the weights stream across layers without a gap:

- One block of threads per multiprocessor. Each owns a run of channels (a multiple of 8: their in_proj x and
  z rows, conv, x_proj columns, dt_proj rows and state), a run of out_proj rows and a run of vocabulary rows.
- A producer warp streams the block's weight rows in the order they are used, layer after layer, through a
  ring of shared-memory stages with 1-D bulk copies (``cp.async.bulk``, completed on mbarriers), and keeps
  the HBM fetching 64 KB further into the L2 (``cp.async.bulk.prefetch.L2``). Twenty consumer warps take the
  matrix-vector products from the ring, each warp a row (or a part of one) with its slice of the activation in
  registers, four stages at a time (17 stages of 10 KB: two in_proj rows or one out_proj row, one 16-byte
  vector a lane). A layer's small operands (x_proj's transposed rows, dt_proj's rows,
  the conv weights, A, dt's bias, D, the norm weight) and the conv and SSM states arrive by seven more bulk
  copies, issued a layer ahead (in the greedy loop below after one proxy fence a token: a bulk copy is in the
  async proxy and must see the previous token's state writes).
- What crosses blocks travels without grid-wide barriers: y and the float32 residual stream as flagged 64-bit
  words (32 bits of data, a 32-bit flag naming the launch and the layer; NCCL's LL protocol), which a reader
  polls in the L2, so one round trip both waits and delivers; x_proj's split-K sums as 64-bit atomic adds of
  fixed-point values (2^-30) above an arrival count. The producer never waits on them, so the next phase's
  weights keep streaming while the consumers wait.

Greedy decoding runs many tokens in one launch (``MambaStackStep.greedy``): each block reduces its vocabulary
rows' logits to an argmax key (the value's bits in an unsigned order above the complement of the index, so the
largest key is the first index of the largest value, as ``torch.argmax`` chooses) and adds it to the step's slot
with a 64-bit atomic max, then counts itself in (a release add); every block waits for the count, reads the
token, and takes its embedding row as the next step's residual stream. The producer streams the next token's
weights on without a break, so between tokens there is no kernel boundary, no argmax or embedding kernel and no
host.

Numerics follow ``norm_in_proj_conv`` / ``dt_state_update`` / ``out_proj_residual``: float32 residual, the
norm's output rounded to the weights' dtype, in_proj's, the conv's and out_proj's outputs rounded to it, dt,
B and C kept in float32, logits rounded to the weights' dtype (as lm_head's output). x_proj's sums are exact
in fixed point and the rest adds in a fixed order, so a step repeats bit for bit (the Triton kernels' float32
atomic adds do not).

Measured (H200, 2026-12-02, MambaVLM-2.8B shapes, bf16, random weights, batch 1, 128 CUDA-graph steps, three
alternating repeats; ``benchmarks/RESULTS.md`` a10): **1.860-1.867 ms per token** against 2.029-2.034 for the
Triton kernels and 3.283-3.287 for mamba_ssm's ``generate(cg=True)`` in the same run (1.76x; 2x was the goal).
On the way (same day): with three grid barriers per layer 2.24 ms (a9); flagged words instead 1.957 (8 consumer
warps, 16 x 10 KB stages); 16 consumer warps 1.917-1.939; 13 x 12 KB stages 1.897; the small operands by bulk
copies instead of about 2000 16-byte ``cp.async`` per layer 1.860. With every exchange between blocks
switched off (a diagnostic build, wrong results) it still takes 1.825 ms, and its bare stream (no products, no
exchanges, no small operands) 1.383-1.391: the work inside each block (the norm, the conv, x_proj's share, dt
and the state update) stops the consumers while the ring is full. out_proj split over channels, summed into
the residual rows with atomic adds (no exchange of y), took 2.75 ms: 338K atomic adds per layer. The
experiments are on branch ``experiment/stack-kernel-cuda``. Then (RESULTS.md a11) four stages a consumer warp and
the L2 prefetch: 1.778-1.803 ms against 1.831-1.836 for the build above, compared on one decoder's buffers.
Then (a13) twenty consumer warps, 17 x 10 KB stages and the products' loop without bounds checks: 0.950 of that
build's time per CUDA-graph step (about 1.68 ms). End to end (a14, each repeat's prefill and generation timed
back to back) 1.74 and 1.73 ms per decoded token against mamba_ssm's 3.27 in two runs (1.88x, 1.89x). With the
ring's stages released empty (no HBM traffic) the products take as long, yet fewer instructions a stage did not
help (a14: two groups of consumer warps taking the stages in turn, two 16-byte vectors a lane, 1.31x slower;
bf16 converted by masks 1.07x; a deferred RMSNorm scale 1.006x), nor did a cheaper producer, though per-warp
probes find it busy 80 % of the step and the consumers waiting on it a quarter of theirs (its L2 prefetch cursor
caching its segment: 1.04x, the time moving out of the products into the phases between them). The phase
probes showed where: the wait for x_proj's split-K sums, whose 192 words lay packed in 12 cache lines that
every block's atomic adds queued on; one sum to a 128-byte line (the kernel's ``XACC_STRIDE``) took the step to
1.66 ms, 0.971 of the packed layout's time (1.97x of mamba_ssm per CUDA-graph step), and end to end 1.70 and 1.69
ms per decoded token against mamba_ssm's 3.28 (1.93x). Greedy decoding 64 tokens a launch, the argmax and the
next token's embedding in the kernel (a15): bit for bit the one-step path's tokens, 1.629 ms a token against 1.660
for the one-step kernel in a CUDA graph, and end to end 1.68 ms against mamba_ssm's 3.29 (1.96x); on an H100 2.00
against 3.78 (1.90x), 1.20x the H100's 1.67 ms floor. Where the y and residual words land in the L2 moved a token
by up to 4 % (1.614-1.684 ms for six allocations); the fastest of six, timed at construction, took end to end 1.62
and 1.627 ms against mamba_ssm's 3.26 and 3.264 (2.01x, two runs on an H200, 2026-12-03).

Needs compute capability 9.0 or later (bulk copies, mbarrier transaction counts), nvcc to build the kernel on
first use (``mambavlm.ops.cuda_build``: seconds, cached), batch 1, bias-free in_proj / out_proj / x_proj, SiLU,
a float32 residual stream, and shapes whose rows fit a ring stage (``stack_step_unsupported`` says why not).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor, nn

from mambavlm.ops.cuda_build import build_library, find_nvcc

__all__ = ["MambaStackStep", "stack_step_unsupported"]

SOURCE = Path(__file__).parent / "csrc" / "mamba_stack_step.cu"
CONSUMER_WARPS = 20
"""Consumer warps per block (``-DCONSUMER_WARPS``). With MambaVLM-2.8B's rows (5 KB and 10 KB in bf16) in 10 KB
stages, 20 warps make every row part exactly one 16-byte vector a lane (with 16 a part is 40 vectors, and lanes
8-31 idle in each part's second): 0.935-0.947 of 16 warps' time in the same runs (``benchmarks/RESULTS.md`` a13).
Earlier: 16 took 1.917-1.939 ms per token against 1.953-1.956 for 8 (16 x 10 KB stages, a10). 20 is the most the
register file allows: 21 warps at 80 registers."""
STAGE_KB, RING_STAGES = 10, 17
"""The ring's stage size (KiB) and depth (``-DSTAGE_KB``, ``-DRING_STAGES``): with 20 consumer warps 17 x 10 KB
(with at most 40 channels a block) took 0.923 of 16 warps' 13 x 12 KB, 16 x 10 KB 0.924-0.947, 13 x 12 KB
0.960, 8 x 20 KB (4 in_proj rows a stage) 1.24-1.29 (a13). With 16 warps 13 x 12 KB took 1.897 ms per token
against 1.917-1.939 for 16 x 10 KB; with 8 warps 4 x 40 KB 3.31, 8 x 20 KB 2.114, 16 x 10 KB 1.957 (a10)."""
GEMV_UNROLL = 4
"""Ring stages a consumer warp takes at a time (``-DGEMV_UNROLL``): it releases each one as soon as its products
are in registers, then does the U warp sums together, so their shuffle latencies overlap. 4 took 1.803 ms per
token against 1.831-1.834 for 1 and 1.810 for 2 (8: 1.821 against 1.793 for 4). Measured as ``L2_AHEAD_KB``."""
L2_AHEAD_KB, L2_HINTS = 64, 1
"""The producer's L2 prefetch (``-DL2_AHEAD_KB``): it keeps the HBM fetching the block's rows this far past the
ring's last copy (``cp.async.bulk.prefetch.L2``); ``-DL2_HINTS=1`` marks those prefetches evict-last and the
ring's copies evict-first. With 4 stages a warp: 1.778-1.803 ms per token with both, 1.793 with the hints alone,
1.803 with neither. Further ahead the L2 thrashes (one stage a warp: 128 KB 1.90 ms, 256 KB 1.92 with the hints
and 2.52 without). A pause between polls of the exchanged words (``__nanosleep`` 32-1000 ns) cost 0.07-0.11 ms.

H200, 2026-12-02, 128 CUDA-graph steps, MambaVLM-2.8B shapes, bf16: builds compared on one decoder's buffers,
only the library changing (``scratch/l2_ahead.py`` on branch ``experiment/stack-kernel-cuda``). Two decoders
with the same build differ by up to 2.5 %: it matters where their exchanged words land in memory."""
STAGE_BYTES = STAGE_KB << 10
MAX_CHANNELS = 40
"""Channels per block at most (``-DMAX_CHANNELS``): MambaVLM-2.8B's 5120 on 132 multiprocessors are 32-40 a block.
40 rather than 48 frees a 17th ring stage and shortens the per-channel loops (0.924 against 0.935 of 16 warps'
time, a13)."""
MAX_ROWS = 64
"""out_proj rows per block at most: the kernel's MAX_OWN."""
MAX_GREEDY_STEPS = 64
"""Greedy tokens one launch decodes at most (``MambaStackStep.greedy``): the argmax slots it allocates."""

EXCHANGE_CANDIDATES, EXCHANGE_ROUNDS, EXCHANGE_STEPS = 6, 3, 4
"""Allocations of the exchanged y and residual words tried at construction, rounds and one-step launches each
(``MambaStackStep._choose_exchange_buffers``)."""

_CTYPES = {torch.bfloat16: "__nv_bfloat16", torch.float16: "__half", torch.float32: "float"}


def _rows_per_stage(row_bytes: int) -> int:
    """The kernel's ``rows_per_stage``: the most rows a stage holds that divide the consumer warps."""
    rows = CONSUMER_WARPS
    while rows > 1 and (rows * row_bytes > STAGE_BYTES or CONSUMER_WARPS % rows):
        rows -= 1
    return rows


def _grid(inner: int, multiprocessors: int) -> int:
    return min(multiprocessors, inner // 8, 255)  # x_proj's arrival counts are 8 bits


def stack_step_unsupported(model: nn.Module, batch: int) -> str | None:
    """Why ``MambaStackStep`` cannot run this transformers ``MambaForCausalLM`` at ``batch``, or None."""
    if batch != 1:
        return f"batch {batch} (it runs batch 1)"
    weight = model.lm_head.weight
    if weight.device.type != "cuda":
        return f"weights on {weight.device} (it runs on CUDA)"
    if torch.cuda.get_device_capability(weight.device) < (9, 0):
        return "a GPU before compute capability 9.0 (it needs bulk copies and mbarrier transaction counts)"
    if weight.dtype not in _CTYPES:
        return f"weights in {weight.dtype}"
    if find_nvcc() is None:
        return "no nvcc to build the kernel (set CUDA_HOME or put nvcc on PATH)"
    config = model.config
    if not (config.residual_in_fp32 or weight.dtype == torch.float32):
        return "a residual stream not in float32 (residual_in_fp32=False)"
    mixers = [layer.mixer for layer in model.backbone.layers]
    if not mixers:
        return "no layers"
    m = mixers[0]
    if any(x.in_proj.bias is not None or x.out_proj.bias is not None or x.x_proj.bias is not None for x in mixers):
        return "projections with a bias"
    if any(x.activation != "silu" for x in mixers):
        return "a conv activation other than SiLU"
    if any(p.dtype != weight.dtype for p in model.parameters() if p.dim() >= 2):
        return "weights of mixed dtypes"
    model_dim, inner, size = config.hidden_size, m.intermediate_size, weight.element_size()
    if model_dim % 8 or inner % 8:
        return f"hidden size {model_dim} or inner size {inner} not a multiple of 8"
    if m.ssm_state_size > 32:
        return f"state size {m.ssm_state_size} (at most 32)"
    per_vector = 16 // size
    for name, k in (("hidden", model_dim), ("inner", inner)):
        if k * size > STAGE_BYTES:
            return f"{name} size {k}: a row of {k * size} bytes is larger than a ring stage ({STAGE_BYTES})"
        parts = CONSUMER_WARPS // _rows_per_stage(k * size)
        if k % (parts * per_vector):
            return f"{name} size {k}: not a multiple of {parts * per_vector}"
    grid = _grid(inner, torch.cuda.get_device_properties(weight.device).multi_processor_count)
    if -(-(inner // 8) // grid) * 8 > MAX_CHANNELS:
        return f"inner size {inner}: more than {MAX_CHANNELS} channels per multiprocessor"
    if -(-model_dim // grid) > MAX_ROWS:
        return f"hidden size {model_dim}: more than {MAX_ROWS} rows per multiprocessor"
    return None


def build_options() -> dict[str, int]:
    """The kernel's build options (``-D``) besides the model's shape: the tuning constants above."""
    return {"CONSUMER_WARPS": CONSUMER_WARPS, "STAGE_KB": STAGE_KB, "RING_STAGES": RING_STAGES,
            "MAX_CHANNELS": MAX_CHANNELS, "GEMV_UNROLL": GEMV_UNROLL, "L2_AHEAD_KB": L2_AHEAD_KB, "L2_HINTS": L2_HINTS}


@functools.cache
def _library(model_dim: int, inner: int, state: int, rank: int, width: int, dtype: torch.dtype, arch: str) -> ctypes.CDLL:
    lib = build_library(SOURCE, {"MODEL_DIM": model_dim, "INNER_DIM": inner, "STATE_DIM": state, "DT_RANK": rank,
                                 "CONV_WIDTH": width, "WEIGHT_T": _CTYPES[dtype], **build_options()}, arch)
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.mamba_stack_step_launch.argtypes = [p, i, p, p, i, f, f, p, p, p, p, p, p, p, p, p, p, i, i, i, p]
    lib.mamba_stack_step_launch.restype = i
    return lib


class MambaStackStep:
    """``__call__(residual (1, D) float32) -> logits (1, V) float32`` for a transformers ``MambaForCausalLM``.

    residual: the token's embedding, as float32; overwritten with the final residual stream. ``states``: the
    decoder's ``MambaState`` s for batch 1 (conv (1, Di, W) in the weights' dtype, ssm (1, Di, N) float32),
    updated in place. The weights' and states' addresses are read once, here: build it again after moving the
    model or reallocating the states. ``refresh()`` re-reads A, dt's bias, D, the conv bias and x_proj (kept
    transposed, (Di, R + 2N), a copy of 2 % of the weights) after the weights change; the decoder calls it at
    each prefill. The returned logits are a buffer the next call overwrites. Works inside CUDA graphs.

    Raises:
        ValueError: what ``stack_step_unsupported`` names; weights or states not contiguous, or of other dtypes.
        mambavlm.ops.cuda_build.CudaBuildError: nvcc failed (its message included).
        RuntimeError: the kernel's configuration or launch failed (the CUDA error code).
    """

    def __init__(self, model: nn.Module, states: list) -> None:
        reason = stack_step_unsupported(model, states[0].conv.shape[0] if states else 0)
        if reason is not None:
            raise ValueError(f"the persistent decode step cannot run this model: {reason}")
        self.model = model
        self.mixers = [layer.mixer for layer in model.backbone.layers]
        m = self.mixers[0]
        weight = model.lm_head.weight
        device = weight.device
        for i, state in enumerate(states):
            if state.conv.dtype != weight.dtype or state.ssm.dtype != torch.float32:
                raise ValueError(f"layer {i}: conv state in {state.conv.dtype} and SSM state in {state.ssm.dtype}; "
                                 f"the kernel takes {weight.dtype} and torch.float32")
        cap = torch.cuda.get_device_capability(device)
        self.lib = _library(model.config.hidden_size, m.intermediate_size, m.ssm_state_size, m.time_step_rank,
                            m.conv_kernel_size, weight.dtype, f"{cap[0]}{cap[1]}")
        with torch.cuda.device(device):
            check = self.lib.mamba_stack_step_configure()
        if check != 0:
            raise RuntimeError(f"mamba_stack_step: raising the shared-memory limit failed (cudaError {check})")
        self.grid = _grid(m.intermediate_size, torch.cuda.get_device_properties(device).multi_processor_count)
        rank, n = m.time_step_rank, m.ssm_state_size
        layers = len(self.mixers)
        self.packed = torch.zeros(layers, m.intermediate_size, n + 4, device=device)
        # x_proj transposed (Di, R + 2N) per layer: a block's columns are one contiguous run, one bulk copy
        self.x_proj_t = torch.empty(layers, m.intermediate_size, rank + 2 * n, dtype=weight.dtype, device=device)
        self.refresh()
        rows = []
        for i, (layer, x, state, packed, x_proj_t) in enumerate(
                zip(model.backbone.layers, self.mixers, states, self.packed, self.x_proj_t)):
            tensors = (x.in_proj.weight, x.out_proj.weight, x_proj_t, x.dt_proj.weight, x.conv1d.weight,
                       layer.norm.weight, state.conv, state.ssm, packed)
            if not all(t.is_contiguous() for t in tensors):
                raise ValueError(f"layer {i}: the persistent decode step needs contiguous weights and states")
            rows.append([t.data_ptr() for t in tensors])
        self.table = torch.tensor(rows, dtype=torch.int64, device=device)
        self.states = states  # keeps the state buffers alive at the addresses in the table
        # flagged words (32 bits of data, a 32-bit flag): y, the residual stream
        self.ybuf = torch.zeros(m.intermediate_size * weight.element_size() // 4, dtype=torch.int64, device=device)
        self.rbuf = torch.zeros(model.config.hidden_size, dtype=torch.int64, device=device)
        # x_proj's sums, one to a 128-byte line (the kernel's XACC_STRIDE words apart)
        self.xacc = torch.zeros(len(self.mixers), rank + 2 * n, self.lib.mamba_stack_step_xacc_stride(),
                                dtype=torch.int64, device=device)
        self.sync = torch.zeros(2, dtype=torch.int32, device=device)
        self.logits = torch.empty(1, weight.shape[0], device=device)
        # greedy decoding: each step's argmax key and arrival count, each on a 128-byte line
        self.amax = torch.zeros(MAX_GREEDY_STEPS, self.lib.mamba_stack_step_amax_stride(), dtype=torch.int64,
                                device=device)
        self.embedding = model.get_input_embeddings().weight
        if not self.embedding.is_contiguous():
            raise ValueError("the persistent decode step needs a contiguous input embedding")
        if EXCHANGE_CANDIDATES > 1:
            self._choose_exchange_buffers()

    @torch.no_grad()
    def _choose_exchange_buffers(self) -> None:
        """Keep the fastest of ``EXCHANGE_CANDIDATES`` allocations of the y and residual words: each timed over
        ``EXCHANGE_STEPS`` one-step launches from a zero residual, the candidates alternating ``EXCHANGE_ROUNDS``
        times (median per candidate); the states are saved before and restored after. Where in the L2 these two
        20 KB buffers land moves the step by up to 3 % on an H200 (``benchmarks/RESULTS.md`` a15), and an
        allocation cannot ask for a place."""
        saved = [(state.conv.clone(), state.ssm.clone()) for state in self.states]
        residual = torch.zeros(1, self.model.config.hidden_size, device=self.logits.device)
        candidates = [(self.ybuf, self.rbuf)] + [(torch.zeros_like(self.ybuf), torch.zeros_like(self.rbuf))
                                                 for _ in range(EXCHANGE_CANDIDATES - 1)]
        events = [[] for _ in candidates]
        with torch.cuda.device(self.logits.device):
            for _ in range(EXCHANGE_ROUNDS):
                for i, (self.ybuf, self.rbuf) in enumerate(candidates):
                    self._launch(residual, None, None, None, 1)  # warm-up
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(EXCHANGE_STEPS):
                        self._launch(residual, None, None, None, 1)
                    end.record()
                    events[i].append((start, end))
            torch.cuda.synchronize()
        times = [sorted(s.elapsed_time(e) for s, e in pairs)[len(pairs) // 2] for pairs in events]
        self.ybuf, self.rbuf = candidates[min(range(len(candidates)), key=times.__getitem__)]
        self.exchange_times_ms = [t / EXCHANGE_STEPS for t in times]
        for state, (conv, ssm) in zip(self.states, saved):
            state.conv.copy_(conv)
            state.ssm.copy_(ssm)

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-read each mixer's A = -exp(A_log), dt's bias, D and the conv bias into the kernel's float32
        per-channel table (layers, Di, N + 4), and x_proj into its transposed copy (layers, Di, R + 2N): every
        layer at once, about a dozen launches (one layer at a time took about 450)."""
        n = self.mixers[0].ssm_state_size
        def stack(tensors: object) -> Tensor:
            return torch.stack(list(tensors))

        self.packed[..., :n] = stack(x.A_log for x in self.mixers).float().exp().neg()
        self.packed[..., n] = stack(x.dt_proj.bias for x in self.mixers)
        self.packed[..., n + 1] = stack(x.D for x in self.mixers)
        if all(x.conv1d.bias is not None for x in self.mixers):
            self.packed[..., n + 2] = stack(x.conv1d.bias for x in self.mixers)
        else:
            for packed, x in zip(self.packed, self.mixers):
                packed[:, n + 2] = x.conv1d.bias if x.conv1d.bias is not None else 0.0
        self.x_proj_t.copy_(stack(x.x_proj.weight for x in self.mixers).transpose(1, 2))

    def greedy(self, token: Tensor, out: Tensor) -> Tensor:
        """Greedy decoding in one launch: token (1,) int64, the last token so far -> out (S,) int64 (written), the
        next S tokens, each the argmax of its step's logits (the first index of the largest, as ``torch.argmax``)
        and the input of the next step, which reads its embedding row in the kernel; returns the last step's
        logits (1, V) float32 (a buffer the next call overwrites). The logits and tokens are those of S calls of
        the one-step path with ``torch.argmax`` between them, bit for bit, without a launch, an argmax or an
        embedding lookup between the steps.

        Raises:
            ValueError: S outside 1..MAX_GREEDY_STEPS, or token / out not contiguous int64 on the model's device.
        """
        steps = out.numel()
        if not 1 <= steps <= MAX_GREEDY_STEPS:
            raise ValueError(f"greedy decodes 1 to {MAX_GREEDY_STEPS} tokens a launch, asked for {steps}")
        for name, t, shape in (("token", token, (1,)), ("out", out, (steps,))):
            if t.shape != shape or t.dtype != torch.int64 or not t.is_contiguous() or t.device != self.logits.device:
                raise ValueError(f"{name} must be a contiguous {shape} int64 tensor on {self.logits.device}, got "
                                 f"{tuple(t.shape)} {t.dtype} on {t.device}")
        self._launch(None, self.embedding, token, out, steps)
        return self.logits

    def __call__(self, residual: Tensor) -> Tensor:
        if residual.shape != (1, self.model.config.hidden_size) or residual.dtype != torch.float32:
            raise ValueError(f"residual must be (1, {self.model.config.hidden_size}) float32, got "
                             f"{tuple(residual.shape)} {residual.dtype}")
        if not residual.is_contiguous() or residual.device != self.logits.device:
            raise ValueError(f"residual must be contiguous on {self.logits.device}")
        self._launch(residual, None, None, None, 1)
        return self.logits

    def _launch(self, residual: Tensor | None, embedding: Tensor | None, token: Tensor | None, out: Tensor | None,
                steps: int) -> None:
        def ptr(t: Tensor | None) -> int | None:
            return None if t is None else t.data_ptr()

        norm_f = self.model.backbone.norm_f
        stream = torch.cuda.current_stream(self.logits.device)
        error = self.lib.mamba_stack_step_launch(
            self.table.data_ptr(), len(self.mixers), norm_f.weight.data_ptr(), self.model.lm_head.weight.data_ptr(),
            self.model.lm_head.weight.shape[0], self.model.backbone.layers[0].norm.variance_epsilon,
            norm_f.variance_epsilon, ptr(residual), self.logits.data_ptr(), self.ybuf.data_ptr(),
            self.rbuf.data_ptr(), self.xacc.data_ptr(), self.sync.data_ptr(), ptr(embedding), ptr(token), ptr(out),
            self.amax.data_ptr(), steps, self.grid, 1, stream.cuda_stream,
        )
        if error != 0:
            raise RuntimeError(f"mamba_stack_step launch failed (cudaError {error})")
