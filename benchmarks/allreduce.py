"""The all-reduce bus bandwidth between processes, for ``benchmarks.multi_gpu``.

Its own module, importing only torch: ``torch.multiprocessing.spawn`` starts each worker by importing the module
that defines it, and the multi-GPU benchmark's module imports the whole package (seconds a process)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _allreduce_worker(rank: int, world: int, init_file: str, backend: str, numel: int, repeats: int,
                      result: str) -> None:
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    buffer = torch.ones(numel, dtype=torch.float32, device=device)
    seconds = []
    for _ in range(repeats + 1):  # the first call sets up the communicator: untimed
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        dist.all_reduce(buffer)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    if rank == 0:
        Path(result).write_text(json.dumps(sorted(seconds[1:])[len(seconds[1:]) // 2]))
    dist.destroy_process_group()


def allreduce_bus_bandwidth(processes: int, cuda: bool, nbytes: int, repeats: int = 5) -> float:
    """Bus bandwidth in bytes/s of a float32 all-reduce of ``nbytes`` over ``processes`` processes (NCCL
    between GPUs 0..n-1, or gloo between CPU processes): ``2 (n - 1) / n * bytes / seconds``, NCCL's
    ``busbw`` (the bytes each link carries in a ring all-reduce), from the median of ``repeats``."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "seconds.json"
        mp.spawn(_allreduce_worker, nprocs=processes, join=True,
                 args=(processes, str(Path(tmp) / "init"), "nccl" if cuda else "gloo", nbytes // 4, repeats,
                       str(result)))
        seconds = json.loads(result.read_text())
    return 2 * (processes - 1) / processes * nbytes / seconds
