"""Timing and memory measurement for the benchmarks: synchronised wall clock, medians, peak memory."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import torch

__all__ = [
    "benchmark_device",
    "free_memory",
    "median_seconds",
    "peak_memory_gib",
    "reset_peak_memory",
    "synchronize",
]


def benchmark_device(quick: bool) -> torch.device:
    """CPU for --quick runs (one thread: the tiny shapes run fastest so, and a busy CI machine does
    not stall a thread pool); CUDA otherwise (the full runs are GPU benchmarks)."""
    if quick:
        torch.set_num_threads(1)
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("the full benchmark needs a CUDA device; run with --quick for the CPU check")
    return torch.device("cuda")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs, synchronised."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA only)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated device memory since the last reset, in GiB (None on the CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def free_memory(device: torch.device) -> None:
    """Collect garbage and hand cached device memory back (between models that each fill the GPU)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
