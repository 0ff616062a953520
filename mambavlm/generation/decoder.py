"""The static decoding loop shared by every fast-path decoder: prefill, CUDA-graph step, choose, stop.

A ``StaticDecoder`` owns buffers allocated once per (batch size, cache capacity, parameter storage):
the prefill writes the prompt's state into them, and each step advances them by one token in place.
On CUDA that one-token step is captured into a CUDA graph once per allocation and replayed per
token; on the CPU the same step runs eagerly on the same buffers, so both devices produce the same
tokens as HF ``generate``. Subclasses say what the state is and how the model's layers use it:
``StaticStateDecoder`` (Mamba / Mamba-2 LMs) and ``HybridStaticDecoder`` (LLaMA and hybrids).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor
from transformers import PreTrainedModel

from mambavlm.generation.cuda_graph import CudaGraphStep
from mambavlm.generation.sampling import TokenChooser
from mambavlm.generation.settings import GenerationSettings

__all__ = ["EOS_CHECK_INTERVAL", "StaticDecoder", "check_left_padded", "trim_after_eos"]

EOS_CHECK_INTERVAL = 8
"""Tokens between the host's checks whether every row has finished (the loop's only sync)."""


class StaticDecoder(ABC):
    """Prefill + per-token step of a causal LM on static buffers, CUDA-graph replay on CUDA.

    cuda_graph: capture the step into a CUDA graph (default: when the model is on CUDA). The
    decoder keeps its buffers and graph between calls; they are rebuilt when the batch size or the
    needed capacity changes, or the model's parameters move (``.to()``, loading into new tensors).
    """

    supported_models: ClassVar[tuple[type[PreTrainedModel], ...]]

    def __init__(self, model: PreTrainedModel, cuda_graph: bool | None = None) -> None:
        if not isinstance(model, self.supported_models):
            raise TypeError(
                f"{type(self).__name__} supports {[c.__name__ for c in self.supported_models]}, "
                f"got {type(model).__name__}"
            )
        self.model = model
        device = self.device
        if cuda_graph is None:
            cuda_graph = device.type == "cuda"
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
        self.cuda_graph = cuda_graph
        self.batch_size: int | None = None
        """Batch size the buffers are allocated for (None before the first prefill)."""
        self.capacity = 0
        """Tokens (prompt + generated) the buffers hold; 0 for decoders whose state has no length."""
        self._length = 0
        self._graph: CudaGraphStep | None = None
        self._prepared_for: tuple[Any, ...] | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> StaticDecoder:
        """A fresh decoder for a copy of the model (CUDA graphs cannot be copied; it captures anew)."""
        return type(self)(copy.deepcopy(self.model, memo), self.cuda_graph)

    @property
    def device(self) -> torch.device:
        return self.model.get_output_embeddings().weight.device

    # ----------------------------------------------------------------- what subclasses provide

    def capacity_for(self, needed: int) -> int:
        """Capacity to allocate when ``needed`` tokens must fit (0: the state does not grow)."""
        return 0

    @abstractmethod
    def _allocate(self, batch: int, capacity: int) -> None:
        """Allocate the static buffers for ``batch`` rows and ``capacity`` tokens."""

    @abstractmethod
    def _prefill(self, inputs_embeds: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Prompt (B, L, D) -> next-token logits (B, V) in float32; writes the buffers. attention_mask:
        a left-padding mask with at least one zero (``prefill`` passes None for a batch without padding)."""

    @abstractmethod
    def _step_eager(self, input_ids: Tensor) -> Tensor:
        """input_ids (B,) -> logits (B, V) in float32; advances the buffers by one token."""

    # ------------------------------------------------------------------------- the shared loop

    def _prepare(self, batch: int, needed: int) -> None:
        """Allocate the buffers (and capture the step) unless the current ones fit."""
        params = tuple((p.data_ptr(), p.dtype) for p in self.model.parameters())
        wanted = self.capacity_for(needed)
        same = self._prepared_for is not None and self._prepared_for == (batch, params)
        if same and wanted <= self.capacity and not wanted < self.capacity // 2:
            return
        capacity = wanted
        self._graph = None
        self._allocate(batch, capacity)
        self.batch_size, self.capacity = batch, capacity
        if self.cuda_graph:
            self._graph = CudaGraphStep(self._step_eager, batch, self.device)
        self._prepared_for = (batch, params)

    @torch.no_grad()
    def prefill(
        self, inputs_embeds: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int = 0
    ) -> Tensor:
        """inputs_embeds (B, L, D), left-padded with attention_mask (B, L) -> next-token logits (B, V).

        Runs the prompt through every layer once and writes each layer's state, with room for
        ``max_new_tokens`` more tokens where the state grows (attention K/V).
        """
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[1] == 0:
            raise ValueError(f"inputs_embeds must be (B, L, D) with L >= 1, got {tuple(inputs_embeds.shape)}")
        hidden_size = self.model.config.hidden_size
        if inputs_embeds.shape[-1] != hidden_size:
            raise ValueError(f"inputs_embeds width {inputs_embeds.shape[-1]} != the model's hidden_size {hidden_size}")
        if inputs_embeds.device != self.device:
            raise ValueError(f"inputs_embeds are on {inputs_embeds.device}, the model on {self.device}")
        if attention_mask is not None and check_left_padded(attention_mask, tuple(inputs_embeds.shape[:2])):
            attention_mask = None
        self._prepare(inputs_embeds.shape[0], inputs_embeds.shape[1] + max_new_tokens)
        self._length = inputs_embeds.shape[1]
        return self._prefill(inputs_embeds, attention_mask)

    @torch.no_grad()
    def step(self, input_ids: Tensor) -> Tensor:
        """input_ids (B,) -> logits (B, V) for the next position; advances the state by one token.

        With a CUDA graph the returned tensor is the graph's output, overwritten by the next step.
        """
        if self._prepared_for is None:
            raise RuntimeError("call prefill before step")
        if input_ids.shape != (self.batch_size,):
            raise ValueError(f"input_ids must be ({self.batch_size},), got {tuple(input_ids.shape)}")
        if self.capacity and self._length >= self.capacity:
            raise ValueError(
                f"the static cache holds {self.capacity} tokens and is full; prefill with a larger "
                "max_new_tokens"
            )
        self._length += 1
        if self._graph is not None:
            return self._graph(input_ids)
        return self._step_eager(input_ids)

    @torch.no_grad()
    def generate(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        **generate_kwargs: Any,
    ) -> Tensor:
        """Prompt embeddings (B, L, D), left-padded, -> new token ids (B, T), T <= max_new_tokens.

        ``generate_kwargs`` are HF ``generate``'s (see ``GenerationSettings``): greedy by default,
        ``do_sample`` with temperature / top_k / top_p; generation ends once every row has emitted
        an EOS id, and finished rows are padded, as HF does.
        """
        settings = GenerationSettings.from_generate_kwargs(generate_kwargs, self.model.generation_config)
        logits = self.prefill(inputs_embeds, attention_mask, settings.max_new_tokens)
        return self.decode(logits, settings, generator)

    def decode(
        self, logits: Tensor, settings: GenerationSettings, generator: torch.Generator | None = None
    ) -> Tensor:
        """From the prefill's logits (B, V): choose, step, repeat -> new token ids (B, T)."""
        choose = TokenChooser(settings, generator)
        batch = logits.shape[0]
        tokens = torch.empty(batch, settings.max_new_tokens, dtype=torch.long, device=logits.device)
        eos = torch.tensor(settings.eos_token_ids, device=logits.device) if settings.eos_token_ids else None
        finished = torch.zeros(batch, dtype=torch.bool, device=logits.device)
        produced = settings.max_new_tokens
        for t in range(settings.max_new_tokens):
            next_ids = choose(logits)
            if eos is not None:
                next_ids = torch.where(finished, settings.fill_token_id, next_ids)
                finished |= torch.isin(next_ids, eos)
            tokens[:, t] = next_ids
            if t + 1 == settings.max_new_tokens:
                break
            if eos is not None and (t + 1) % EOS_CHECK_INTERVAL == 0 and bool(finished.all()):
                produced = t + 1
                break
            logits = self.step(next_ids)
        return trim_after_eos(tokens[:, :produced], eos)


def check_left_padded(attention_mask: Tensor, shape: tuple[int, ...]) -> bool:
    """Check a prompt batch's attention_mask (B, L) against the prompts' (B, L) ``shape``; returns whether it is
    all ones (no padding). One device-to-host copy.

    Raises:
        ValueError: a mask of another shape, or one that is not left padding (a zero in the last column, or a
            0 after a 1 in a row), naming the rows.
    """
    if tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask must be {tuple(shape)}, got {tuple(attention_mask.shape)}")
    mask = attention_mask.cpu()  # one sync, then every check on the host
    if not bool(mask[:, -1].all()):
        rows = (mask[:, -1] == 0).nonzero().flatten().tolist()
        raise ValueError(f"prompts must be left-padded: attention_mask[:, -1] has zeros (rows {rows})")
    holes = (mask[:, 1:] < mask[:, :-1]).any(dim=1).nonzero().flatten().tolist()
    if holes:
        raise ValueError(
            f"prompts must be left-padded: attention_mask rows {holes} have a 0 after a 1 "
            "(padding only before a prompt)"
        )
    return bool(mask.all())


def trim_after_eos(tokens: Tensor, eos: Tensor | None) -> Tensor:
    """tokens (B, T) -> tokens (B, T') ending where the last row to finish emitted its first EOS.

    HF ``generate`` stops at that step; the decoder checks only every ``EOS_CHECK_INTERVAL`` tokens
    and may have produced (padding) tokens beyond it.
    """
    if eos is None:
        return tokens
    is_eos = torch.isin(tokens, eos)
    if not bool(is_eos.any(dim=1).all()):
        return tokens
    first_eos = is_eos.int().argmax(dim=1)
    return tokens[:, : int(first_eos.max()) + 1]
