"""Where the GPU's time goes: CUDA kernel intervals recorded by torch.profiler (CUDA-graph kernels
included), the idle gaps between them, and the kernels of one decoding step.

Times are microseconds from the profiler's clock; a CUDA device is required (the profiler records no
kernels elsewhere, and the reports say so).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.report import markdown_table


@dataclass
class KernelTrace:
    """The CUDA kernels one call ran: ``(start_us, end_us, name)`` sorted by start."""

    kernels: list[tuple[float, float, str]]

    @property
    def span_us(self) -> float:
        """From the first kernel's start to the last kernel's end."""
        return self.kernels[-1][1] - self.kernels[0][0] if self.kernels else 0.0

    def busy_and_gaps(self) -> tuple[float, list[tuple[float, str, str]]]:
        """The union of the kernel intervals (us) and every idle gap ``(us, kernel before, kernel after)``."""
        if not self.kernels:
            return 0.0, []
        busy, gaps = 0.0, []
        start, end, name = self.kernels[0]
        for k_start, k_end, k_name in self.kernels[1:]:
            if k_start > end:
                busy += end - start
                gaps.append((k_start - end, name, k_name))
                start = k_start
            if k_end > end:
                end, name = k_end, k_name
        return busy + end - start, gaps

    def by_name(self) -> dict[str, tuple[float, int]]:
        """Total kernel time (us) and launch count per kernel name."""
        totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for start, end, name in self.kernels:
            totals[name][0] += end - start
            totals[name][1] += 1
        return {name: (t, int(n)) for name, (t, n) in totals.items()}


def trace_cuda_kernels(fn: Callable[[], object]) -> KernelTrace:
    """Run ``fn`` once under torch.profiler (CUDA activity) and return its kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return KernelTrace(sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
    ))


def gpu_idle_profile(fn: Callable[[], object], gaps: int) -> str:
    """How much of the span from ``fn``'s first CUDA kernel to its last the GPU ran none, and the
    ``gaps`` longest idle gaps with the kernels either side (markdown)."""
    trace = trace_cuda_kernels(fn)
    if not trace.kernels:
        return "no CUDA kernels were recorded"
    busy, idle = trace.busy_and_gaps()
    span = trace.span_us
    idle.sort(reverse=True)
    over = [gap for gap in idle if gap[0] >= 500]
    lines = [
        f"- span {span / 1e3:.1f} ms, GPU busy {busy / 1e3:.1f} ms ({100 * busy / span:.1f} %), idle "
        f"{(span - busy) / 1e3:.1f} ms in {len(idle)} gaps; {len(over)} gaps >= 0.5 ms total "
        f"{sum(g for g, _, _ in over) / 1e3:.1f} ms",
        "",
        markdown_table(["idle ms", "after kernel", "before kernel"],
                       [[f"{g / 1e3:.2f}", a[:70], b[:70]] for g, a, b in idle[:gaps]]),
    ]
    return "\n".join(lines)


KERNEL_LABEL_WIDTH = 90


def kernel_label(name: str, width: int = KERNEL_LABEL_WIDTH) -> str:
    """A CUDA kernel's name cut to about ``width`` characters for a table, keeping what tells PyTorch's
    templated kernels apart: where the cut drops the innermost functors (``MulFunctor<float>``,
    ``CUDAFunctor_add<c10::BFloat16>``, ...), they follow the head after " ... "."""
    if len(name) <= width:
        return name
    functors = dict.fromkeys(re.findall(r"\b(\w*Functor\w*<[^<>]*>)", name))
    inner = [f for f in functors if not f.startswith(("BinaryFunctor", "AUnaryFunctor", "BUnaryFunctor"))]
    shown = [f for f in inner or list(functors) if f not in name[:width]]
    if not shown:
        return name[:width]
    tail = " ... " + ", ".join(shown)
    return name[: max(width - len(tail), 40)] + tail


def _kernel_table(per_call: dict[str, tuple[float, float]], busy_us: float, span_us: float, unit: str,
                  top: int) -> str:
    """Markdown: busy vs span per ``unit``, then the ``top`` kernels by time (us, share, launches)."""
    rows = sorted(((t, n, name) for name, (t, n) in per_call.items() if n > 0), reverse=True)
    launches = sum(n for _, n, _ in rows)
    table = markdown_table(
        [f"us / {unit}", "share of busy", f"launches / {unit}", "us / launch", "kernel"],
        [[f"{t:.1f}", f"{100 * t / busy_us:.1f} %", f"{n:.0f}", f"{t / n:.2f}", kernel_label(name)] for t, n, name in rows[:top]],
    )
    return "\n".join([
        f"- per {unit}: span {span_us / 1e3:.3f} ms, GPU busy {busy_us / 1e3:.3f} ms "
        f"({100 * busy_us / span_us:.1f} %), {launches:.0f} kernel launches",
        "",
        table,
    ])


def kernel_profile(fn: Callable[[], object], top: int, unit: str = "call") -> str:
    """The kernels of one call of ``fn`` (run it once before, to warm up): busy vs span, and the
    ``top`` kernels by time (markdown)."""
    trace = trace_cuda_kernels(fn)
    if not trace.kernels:
        return "no CUDA kernels were recorded"
    per_call = {name: (t, float(n)) for name, (t, n) in trace.by_name().items()}
    return _kernel_table(per_call, trace.busy_and_gaps()[0], trace.span_us, unit, top)


def step_kernel_profile(short: Callable[[], object], long: Callable[[], object], steps: int, top: int) -> str:
    """The kernels of one decoding step, by difference: ``long`` must do the same work as ``short``
    plus ``steps`` more decoding steps (for example the prefill, and generating 1 + steps tokens), so
    the prefill cancels. Reports per step: GPU busy time and the span (busy + idle), and the ``top``
    kernels by time with launches and mean duration (markdown)."""
    first, second = trace_cuda_kernels(short), trace_cuda_kernels(long)
    if not second.kernels:
        return "no CUDA kernels were recorded"
    busy = (second.busy_and_gaps()[0] - first.busy_and_gaps()[0]) / steps
    span = (second.span_us - first.span_us) / steps
    a, b = first.by_name(), second.by_name()
    per_step = {
        name: ((t - a.get(name, (0.0, 0))[0]) / steps, (n - a.get(name, (0.0, 0))[1]) / steps)
        for name, (t, n) in b.items()
    }
    return _kernel_table(per_step, busy, span, "step", top)
