"""A decoding step captured once into a CUDA graph and replayed for every token.

The step reads its token ids from a static input tensor and returns logits in a tensor that the
graph owns; everything else it touches (weights, the static decoding state) keeps its address.
As in mamba_ssm's ``cg=True`` decoding, the step first runs a few times on a side stream (lazy
initialisation and Triton compilation happen outside the capture), then once under capture.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["CudaGraphStep"]

WARMUP_STEPS = 2
"""Eager runs on a side stream before capture."""


class CudaGraphStep:
    """``step_fn(input_ids (B,)) -> logits (B, V)`` captured for batch B on a CUDA device.

    Calling it copies the ids into the static input, replays the graph and returns the static
    logits tensor, which the next call overwrites. The warm-up runs change whatever state
    ``step_fn`` updates: capture before that state is filled (before the prefill).
    """

    def __init__(self, step_fn: Callable[[Tensor], Tensor], batch: int, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.input_ids = torch.zeros(batch, dtype=torch.long, device=device)
        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    step_fn(self.input_ids)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = step_fn(self.input_ids)

    def __call__(self, input_ids: Tensor) -> Tensor:
        """input_ids (B,) -> logits (B, V) (the graph's output tensor)."""
        self.input_ids.copy_(input_ids)
        self.graph.replay()
        return self.logits
