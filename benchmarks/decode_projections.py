"""The two projections of a Mamba-1 decode step: our fused Triton kernels against cuBLAS, per launch shape.

    python -m benchmarks.decode_projections            # CUDA: Mamba-2.8B's shapes, bf16, batch 1 and 4
    python -m benchmarks.decode_projections --quick    # CPU: small shapes through Triton's interpreter (CI)

A decode step of Mamba-2.8B reads 5.5 GB of weights, 95 % of them in each block's ``in_proj`` (2560 ->
10240) and ``out_proj`` (5120 -> 2560), each a matrix-vector product per sequence. The fused step
(``mambavlm.ops.mamba_step``) does them as ``norm_in_proj_conv`` (RMSNorm of the float32 residual +
in_proj, with the conv update and ``x_proj`` of the x half in its epilogue: work the cuBLAS rows leave to
another kernel) and ``out_proj_residual`` (out_proj + the residual add); cuBLAS does what the unfused
step runs: RMSNorm then ``F.linear``, and ``F.linear`` then the add. Our kernels read the weights through
TMA tensor descriptors (their bases and rows are 16-byte aligned here). Each row runs the projection of 64 layers
(64 distinct weight copies, so that nothing is served from the 50 MB L2) inside one CUDA graph, as the
decoder replays them; the table gives us per layer, the weight bytes read per second against the HBM
bandwidth, and the launch shape (``block_n`` rows per program, ``block_k`` reduction chunk, warps,
pipeline stages: the weight tiles each program keeps in flight).

Two reference rows bound what a kernel per layer can reach: cuBLAS's matrix-vector kernel
(``torch.mv``, batch 1, without the norm or the add), and the 64 layers' weights read in one pass (one
``torch.sum`` over the stacked copies: no launch, ramp or tail per layer), the rate at which a single
kernel spanning every layer could at best stream the weights.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.report import default_out, hbm_bytes_per_s, markdown_table, write_report
from benchmarks.timing import benchmark_device, median_seconds, synchronize
from mambavlm.ops.mamba_step import (
    IN_PROJ_BLOCK_K,
    IN_PROJ_BLOCK_N,
    IN_PROJ_NUM_WARPS,
    OUT_PROJ_BLOCK_K,
    OUT_PROJ_BLOCK_N,
    OUT_PROJ_NUM_WARPS,
    PIPELINE_STAGES,
    norm_in_proj_conv,
    out_proj_residual,
    triton_available,
)

HEADERS = ["projection", "batch", "path", "block_n", "block_k", "warps", "stages", "us / layer", "TB/s", "of HBM"]
SHAPES = {"paper": (2560, 5120), "quick": (96, 192)}  # (d_model, d_inner): Mamba-2.8B, a tiny stand-in
X_PROJ_ROWS, CONV_WIDTH = 192, 4  # Mamba-2.8B's dt rank 160 + B and C of 16 states; its conv width
S = PIPELINE_STAGES
LAUNCH_SHAPES = [(n, k, w, S) for n in (4, 8, 16, 32) for k in (512, 1024, 2048) for w in (2, 4)] + [
    (n, k, 4, stages) for n in (4, 16) for k in (512, 1024) for stages in (1, 2, 4, 5)
]
"""(block_n, block_k, warps, stages): every shape at Triton's default pipelining, then deeper and
shallower pipelines for the shapes that led the first sweep (more weight bytes in flight)."""
GEMV = "reference: cuBLAS GEMV (torch.mv; no norm, no add)"
ONE_READ = "bound: every layer's weights in one read (torch.sum)"
QUICK_LAUNCH_SHAPES = [(IN_PROJ_BLOCK_N, IN_PROJ_BLOCK_K, IN_PROJ_NUM_WARPS, S), (4, 64, 2, 2)]


def replay_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` captured in a CUDA graph (on the CPU, the interpreted CI run: called
    directly, without a warm-up: nothing compiles there)."""
    if device.type != "cuda":
        return median_seconds(fn, device, repeats, warmup=0)
    fn()  # compile and warm up outside the graph
    synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_seconds(graph.replay, device, repeats, warmup=2)


def layers_of(shape: tuple[int, int], count: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``count`` distinct (N, K) weights stacked in one (count, N, K) tensor (iterating it gives the layers)."""
    generator = torch.Generator(device=device).manual_seed(0)
    return (torch.randn(count, *shape, device=device, generator=generator) / shape[1] ** 0.5).to(dtype)


def run(
    quick: bool, batches: list[int], layers: int, repeats: int, sweep: bool,
    launch_shapes: list[tuple[int, int, int, int]] | None = None,
) -> list[list[object]]:
    device = benchmark_device(quick)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    d_model, d_inner = SHAPES["quick" if quick else "paper"]
    bandwidth = hbm_bytes_per_s(device)
    in_weights = layers_of((2 * d_inner, d_model), layers, device, dtype)
    x_proj_weights = layers_of((X_PROJ_ROWS, d_inner), layers, device, dtype)
    conv_weight = torch.randn(d_inner, CONV_WIDTH, device=device).to(dtype)
    conv_bias = torch.randn(d_inner, device=device).to(dtype)
    out_weights = layers_of((d_model, d_inner), layers, device, dtype)
    gain = torch.ones(d_model, device=device, dtype=dtype)
    if launch_shapes:
        shapes = launch_shapes
    elif quick:
        shapes = QUICK_LAUNCH_SHAPES
    else:
        shapes = LAUNCH_SHAPES if sweep else [(IN_PROJ_BLOCK_N, IN_PROJ_BLOCK_K, IN_PROJ_NUM_WARPS, S),
                                              (OUT_PROJ_BLOCK_N, OUT_PROJ_BLOCK_K, OUT_PROJ_NUM_WARPS, S)]
    rows: list[list[object]] = []

    def row(name: str, batch: int, path: str, launch: tuple[int, int, int, int] | None, seconds: float,
            weight: Tensor) -> None:
        per_layer = seconds / layers
        rate = weight.numel() * weight.element_size() / per_layer
        share = f"{rate / bandwidth:.0%}" if bandwidth else "n/a"
        n, k, w, stages = launch if launch else ("", "", "", "")
        rows.append([name, batch, path, n, k, w, stages, f"{per_layer * 1e6:.2f}", f"{rate / 1e12:.2f}", share])

    def launch_row(name: str, batch: int, path: str, launch: tuple[int, int, int, int], fn: Callable[[], None],
                   weight: Tensor) -> None:
        """Our kernel at one launch shape; a shape whose pipelined weight tiles (block_n x block_k x stages)
        exceed the multiprocessor's shared memory is listed as not fitting."""
        try:
            row(name, batch, path, launch, replay_seconds(fn, device, repeats), weight)
        except Exception as error:
            shortfall = out_of_resources(error)
            if shortfall is None:
                raise
            rows.append([name, batch, f"{path}: does not fit ({shortfall})", *launch, "-", "-", "-"])

    def reference_rows(name: str, batch: int, weights: Tensor) -> None:
        if batch == 1:
            vector = torch.randn(weights.shape[2], device=device).to(dtype)
            product = torch.empty(weights.shape[1], device=device, dtype=dtype)
            row(name, batch, GEMV, None,
                replay_seconds(lambda: [torch.mv(w, vector, out=product) for w in weights], device, repeats), weights[0])
        row(name, batch, ONE_READ, None, replay_seconds(weights.sum, device, repeats), weights[0])

    for batch in batches:
        residual = torch.randn(batch, d_model, device=device)
        conv_state = torch.zeros(batch, d_inner, CONV_WIDTH, device=device, dtype=dtype)
        xdbl = torch.zeros(batch, X_PROJ_ROWS, device=device)
        y = torch.randn(batch, d_inner, device=device).to(dtype)
        stream = torch.randn(batch, d_model, device=device)

        def cublas_in() -> None:
            for w in in_weights:
                F.linear(F.rms_norm(residual, (d_model,), gain.float(), 1e-5).to(dtype), w)

        def cublas_out() -> None:
            for w in out_weights:
                stream.add_(F.linear(y, w))

        row("in_proj (+ RMSNorm)", batch, "cuBLAS (norm, F.linear)", None, replay_seconds(cublas_in, device, repeats),
            in_weights[0])
        reference_rows("in_proj (+ RMSNorm)", batch, in_weights)
        for n, k, warps, stages in shapes:
            def ours_in(n: int = n, k: int = k, warps: int = warps, stages: int = stages) -> None:
                for w, x_proj in zip(in_weights, x_proj_weights, strict=True):
                    norm_in_proj_conv(residual, gain, 1e-5, w, conv_state, conv_weight, conv_bias, x_proj, True, xdbl,
                                      block_n=n, block_k=k, num_warps=warps, num_stages=stages)

            launch_row("in_proj (+ RMSNorm)", batch, "norm_in_proj_conv", (n, k, warps, stages), ours_in, in_weights[0])
        row("out_proj (+ residual)", batch, "cuBLAS (F.linear, add)", None,
            replay_seconds(cublas_out, device, repeats), out_weights[0])
        reference_rows("out_proj (+ residual)", batch, out_weights)
        for n, k, warps, stages in shapes:
            def ours_out(n: int = n, k: int = k, warps: int = warps, stages: int = stages) -> None:
                for w in out_weights:
                    out_proj_residual(y, w, stream, block_n=n, block_k=k, num_warps=warps, num_stages=stages)

            launch_row("out_proj (+ residual)", batch, "out_proj_residual", (n, k, warps, stages), ours_out,
                       out_weights[0])
    return rows


def out_of_resources(error: Exception) -> str | None:
    """What a launch shape lacks, as "shared memory 287744 > 232448" (bytes needed > the GPU's), when
    ``error`` is Triton's ``OutOfResources``; None for any other error."""
    from triton.runtime.errors import OutOfResources

    if not isinstance(error, OutOfResources):
        return None
    return f"{error.name} {error.required} > {error.limit}"


def best_lines(rows: list[list[object]]) -> list[str]:
    """Per projection and batch: cuBLAS against our fastest launch shape, and that against the one-read bound."""
    lines = []
    for name in dict.fromkeys(r[0] for r in rows):
        for batch in dict.fromkeys(r[1] for r in rows if r[0] == name):
            group = [r for r in rows if r[0] == name and r[1] == batch]
            cublas = next(float(r[7]) for r in group if r[2].startswith("cuBLAS"))
            bound = next(float(r[7]) for r in group if r[2] == ONE_READ)
            ours = min((r for r in group if r[2] in ("norm_in_proj_conv", "out_proj_residual")),
                       key=lambda r: float(r[7]))
            lines.append(f"- {name}, batch {batch}: cuBLAS {cublas:.2f} us per layer, ours at best {ours[7]} us "
                         f"(block_n {ours[3]}, block_k {ours[4]}, {ours[5]} warps, {ours[6]} stages): "
                         f"{cublas / float(ours[7]):.2f}x; the one-read bound {bound:.2f} us "
                         f"(ours takes {float(ours[7]) / bound:.2f}x it)")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes on the CPU (Triton's interpreter)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--layers", type=int, default=64, help="distinct weight copies per replay")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-sweep", action="store_true", help="only the default launch shapes")
    parser.add_argument("--launch-shapes", nargs="+", default=None, metavar="NxKxW[xS]",
                        help="launch shapes to time (rows per program x reduction chunk x warps [x pipeline "
                        f"stages, default {S}]), e.g. 16x1024x2 16x1024x4x5")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not triton_available():
        raise SystemExit("needs triton")
    if args.quick and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--quick runs the kernels under Triton's interpreter: set TRITON_INTERPRET=1")
    device = benchmark_device(args.quick)
    layers = 2 if args.quick else args.layers
    shapes = [tuple(int(v) for v in text.split("x")) for text in args.launch_shapes] if args.launch_shapes else None
    if shapes and any(len(shape) not in (3, 4) for shape in shapes):
        raise SystemExit(f"--launch-shapes takes NxKxW or NxKxWxS, got {args.launch_shapes}")
    shapes = [shape if len(shape) == 4 else (*shape, S) for shape in shapes] if shapes else None
    rows = run(args.quick, args.batches, layers, 1 if args.quick else args.repeats, sweep=not args.no_sweep,
               launch_shapes=shapes)
    intro = (f"{'tiny stand-in' if args.quick else 'Mamba-2.8B'} projections, "
             f"{'float32' if device.type == 'cpu' else 'bfloat16'}, {layers} layers per CUDA-graph replay, "
             f"median of {1 if args.quick else args.repeats}")
    sections = [intro, markdown_table(HEADERS, rows), "\n".join(best_lines(rows))]
    out = args.out or default_out("decode_projections", args.quick)
    write_report(out, "Decode-step projections: fused Triton kernels vs cuBLAS", device, sections)


if __name__ == "__main__":
    main()
