"""A guard for ``accelerate launch``: the processes it started must form one process group."""

from __future__ import annotations

import os

from accelerate import Accelerator

__all__ = ["check_process_group"]


def check_process_group(accelerator: Accelerator) -> None:
    """Raise RuntimeError when the launcher started several processes (``WORLD_SIZE`` > 1) but this
    one runs alone: an accelerate config for GPUs (``configs/accelerate/ddp.yaml``, one process per
    GPU) launched on a machine without them starts that many independent copies of the same run, each
    writing the same output directory."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        raise RuntimeError(
            f"the launcher started {launched} processes, but they did not join one process group (this one "
            f"runs alone, on {accelerator.device}): each would repeat the whole run. An accelerate config for "
            "GPUs needs GPUs; on a CPU run the script directly, or start N CPU processes with "
            "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N"
        )
