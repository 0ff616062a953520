"""Mamba-1's selective scan, forward and backward: our Triton scan against mamba_ssm's CUDA kernel.

    python -m benchmarks.selective_scan               # CUDA: one Mamba-2.8B layer's scan in training
    python -m benchmarks.selective_scan --launch-shapes 16x16x8 32x8x8   # block_d x block_t x warps
    python -m benchmarks.selective_scan --methods sequential              # one of the two kernel pairs
    python -m benchmarks.selective_scan --shapes 8x5120x16x1522 2x5120x16x6088   # batch x channels x N x length
    TRITON_INTERPRET=1 python -m benchmarks.selective_scan --quick   # CPU: tiny shapes (CI)

The default shape is one training step's scan of one Mamba-2.8B layer at micro-batch 8 x 1522 tokens (u, delta,
z (8, 5120, 1522) bf16, A (5120, 16), B / C (8, 16, 1522), D and delta_bias, softplus): what
``mamba_inner_fn`` runs 64 times per step, where mamba_ssm's backward kernel alone was 49 % of the step on
an H200 (``results/training_throughput.md``). Each row gives the median ms of the forward alone and of
the forward + backward, the peak memory of a forward + backward, and the ratio to mamba_ssm's; our rows also
the largest difference of their output and gradients from mamba_ssm's, relative to each tensor's
largest value (both compute in float32 and round to bf16). ``--shapes`` times others, one table each
(the sequential kernels run batch x channels threads, one channel each: fewer sequences leave the GPU
emptier).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The command line, built before the imports below: --help and a usage error answer without
    loading torch, transformers and mambavlm (seconds)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (Triton's interpreter)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--launch-shapes", nargs="+", default=None, metavar="DxTxW",
                        help="launch shapes to time (channels per program x steps per chunk x warps)")
    parser.add_argument("--methods", nargs="+", choices=["chunked", "sequential"], default=["chunked", "sequential"],
                        help="the kernel pairs to time (each at its launch shapes)")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="BxDxNxL",
                        help="scan shapes to time, one table each (default: Mamba-2.8B at 8 x 1522 tokens)")
    parser.add_argument("--out", type=Path, default=None)
    return parser


if __name__ == "__main__":  # --help and usage errors exit here, before the heavy imports
    build_parser().parse_args()

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from benchmarks.report import default_out, markdown_table, write_report  # noqa: E402
from benchmarks.timing import (  # noqa: E402
    benchmark_device,
    median_seconds,
    peak_memory_gib,
    reset_peak_memory,
)
from mambavlm.ops.selective_scan import selective_scan_torch  # noqa: E402
from mambavlm.ops.selective_scan_triton import LAUNCH, ScanMethod, selective_scan_triton  # noqa: E402

SHAPES = {"paper": (8, 5120, 16, 1522), "quick": (1, 16, 4, 20)}
"""(batch, channels, state size, length): Mamba-2.8B's training step, a tiny stand-in."""
LAUNCH_SHAPES: dict[str, list[tuple[int, int, int]]] = {
    "chunked": [(8, 16, 4), (16, 16, 8), (16, 16, 4), (16, 32, 8), (32, 8, 4)],
    "sequential": [(32, 16, 1), (64, 8, 1), (64, 32, 1), (128, 16, 1), (64, 16, 2), (128, 16, 2), (128, 16, 4)],
}
"""(block_d, block_t, num_warps) per method, timed after the method's defaults (``LAUNCH``;
the sequential kernels hold an (N, block_d) state per program, one channel per thread at block_d = 32 x warps)."""
HEADERS = ["scan", "method", "layout", "block_d", "block_t", "warps", "forward ms", "forward + backward ms", "peak GiB",
           "vs the reference (fwd + bwd)", "largest difference from it"]


def inputs(shape: tuple[int, int, int, int], device: torch.device, dtype: torch.dtype) -> list[Tensor]:
    batch, dim, n, length = shape
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*size: int, scale: float = 1.0, kind: torch.dtype = dtype) -> Tensor:
        return (torch.randn(*size, generator=g, device=device) * scale).to(kind)

    A = -torch.arange(1, n + 1, device=device, dtype=torch.float32).expand(dim, n).contiguous()  # S4D-real init
    return [randn(batch, dim, length), randn(batch, dim, length, scale=0.5), A, randn(batch, n, length),
            randn(batch, n, length), torch.ones(dim, device=device), randn(batch, dim, length),
            randn(dim, scale=0.3, kind=torch.float32)]


def channels_last(x: Tensor) -> Tensor:
    """(B, D, L) with the channels contiguous: a (B, L, D) tensor's transpose, as a mixer computing in
    (B, L, D) hands its sequences to the scan."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def forward_backward(fn: Callable[..., Tensor], args: list[Tensor], grad: Tensor) -> tuple[Tensor, list[Tensor]]:
    leaves = [a.detach().requires_grad_(True) for a in args]
    out = fn(*leaves, delta_softplus=True)
    out.backward(grad)
    return out.detach(), [leaf.grad for leaf in leaves]


def largest_difference(got: tuple[Tensor, list[Tensor]], want: tuple[Tensor, list[Tensor]]) -> float:
    pairs = [(got[0], want[0]), *zip(got[1], want[1], strict=True)]
    return max(((g.float() - w.float()).abs().max() / w.float().abs().max().clamp(min=1e-6)).item() for g, w in pairs)


LAYOUTS = ("sequence", "channel")
"""Which dimension of u, delta, z and the output gradient is contiguous: the sequence (what mamba_ssm's
kernels read, after ``mamba_inner_fn``'s transposes) or the channels (``channels_last``: what the
projections compute, and what ``_triton_scan_mixer`` passes; the sequential kernels read through strides,
the chunked ones copy it to the sequence layout first)."""


def run(quick: bool, repeats: int, launch_shapes: list[tuple[ScanMethod, int, int, int, str]],
        shape: tuple[int, int, int, int]) -> tuple[list[list[object]], list[str]]:
    device = benchmark_device(quick)
    dtype = torch.float32 if quick else torch.bfloat16
    args = inputs(shape, device, dtype)
    grad = torch.randn(args[0].shape, generator=torch.Generator(device=device).manual_seed(1), device=device).to(dtype)
    if quick:
        reference_name, reference = "PyTorch (selective_scan_torch)", selective_scan_torch
    else:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        reference_name, reference = "mamba_ssm selective_scan_fn", selective_scan_fn
    warmup = 0 if quick else 3  # the interpreter compiles nothing; measure() runs the step once first anyway

    by_layout = {"sequence": (args, grad),
                 "channel": ([channels_last(a) if i in (0, 1, 6) else a for i, a in enumerate(args)], channels_last(grad))}

    def measure(fn: Callable[..., Tensor], layout: str = "sequence"
                ) -> tuple[float, float, float | None, tuple[Tensor, list[Tensor]]]:
        xs, g = by_layout[layout]
        result = forward_backward(fn, xs, g)  # also the warm-up's compilation
        with torch.no_grad():
            forward = median_seconds(lambda: fn(*xs, delta_softplus=True), device, repeats, warmup)
        both = median_seconds(lambda: forward_backward(fn, xs, g), device, repeats, warmup)
        reset_peak_memory(device)
        forward_backward(fn, xs, g)
        return forward, both, peak_memory_gib(device), result

    rows: list[list[object]] = []
    ref_fwd, ref_both, ref_peak, ref_result = measure(reference)
    rows.append([reference_name, "", "sequence", "", "", "", f"{ref_fwd * 1e3:.2f}", f"{ref_both * 1e3:.2f}",
                 "n/a" if ref_peak is None else f"{ref_peak:.2f}", "1.00x", ""])
    best = None
    for method, block_d, block_t, warps, layout in launch_shapes:
        def ours(*a: Tensor, delta_softplus: bool, bd: int = block_d, bt: int = block_t, w: int = warps,
                 m: ScanMethod = method) -> Tensor:
            return selective_scan_triton(*a, delta_softplus=delta_softplus, block_d=bd, block_t=bt, num_warps=w,
                                         method=m)

        fwd, both, peak, result = measure(ours, layout)
        speedup = ref_both / both
        key = (speedup, method, block_d, block_t, warps, layout)
        best = max(best or key, key)
        rows.append(["ours (selective_scan_triton)", method, layout, block_d, block_t, warps, f"{fwd * 1e3:.2f}",
                     f"{both * 1e3:.2f}",
                     "n/a" if peak is None else f"{peak:.2f}", f"{speedup:.2f}x",
                     f"{largest_difference(result, ref_result):.1e}"])
    lines = []
    if best is not None:
        lines.append(f"- fastest: {best[1]}, {best[5]}-contiguous, block_d {best[2]}, block_t {best[3]}, {best[4]} "
                     f"warps: {best[0]:.2f}x {reference_name}'s forward + backward")
    return rows, lines


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--quick runs the kernels under Triton's interpreter: set TRITON_INTERPRET=1")
    shapes = [tuple(int(v) for v in text.split("x")) for text in args.launch_shapes] if args.launch_shapes else None
    if shapes and any(len(shape) != 3 for shape in shapes):
        raise SystemExit(f"--launch-shapes takes DxTxW, got {args.launch_shapes}")
    if shapes is None:
        defaults = {m: [shape for (method, _), shape in LAUNCH.items() if method == m] for m in args.methods}
        per_method = {m: [(8, 8, 2)] if args.quick else list(dict.fromkeys([*defaults[m], *LAUNCH_SHAPES[m]]))
                      for m in args.methods}
    else:
        per_method = {m: shapes for m in args.methods}
    launches = [(m, *shape, layout) for m, method_shapes in per_method.items() for shape in method_shapes
                for layout in (LAYOUTS if m == "sequential" else LAYOUTS[:1])]
    repeats = 1 if args.quick else args.repeats
    scan_shapes = ([tuple(int(v) for v in text.split("x")) for text in args.shapes] if args.shapes
                   else [SHAPES["quick" if args.quick else "paper"]])
    if any(len(shape) != 4 for shape in scan_shapes):
        raise SystemExit(f"--shapes takes BxDxNxL, got {args.shapes}")
    reference = "PyTorch's selective_scan_torch" if args.quick else "mamba_ssm's selective_scan_fn"
    sections = []
    for batch, dim, n, length in scan_shapes:
        rows, lines = run(args.quick, repeats, launches, (batch, dim, n, length))
        intro = (f"{'tiny stand-in' if args.quick else 'one Mamba-2.8B layer'}: u, delta, z ({batch}, {dim}, "
                 f"{length}) {'float32' if args.quick else 'bf16'}, N = {n}, D, delta_bias, softplus; median of "
                 f"{repeats}; the reference: {reference}")
        sections += [intro, markdown_table(HEADERS, rows), "\n".join(lines)]
    write_report(args.out or default_out("selective_scan", args.quick),
                 "Selective scan, forward and backward: Triton vs mamba_ssm", benchmark_device(args.quick), sections)


if __name__ == "__main__":
    main()
