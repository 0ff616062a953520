"""Choosing the next token on the device, with no host synchronisation.

Greedy is ``argmax``. Sampling applies transformers' own warpers in HF ``generate``'s order
(temperature, top-k, top-p) and then draws with the exponential race: argmax_i p_i / E_i with
E_i ~ Exp(1) picks i with probability p_i (the way mamba_ssm and vLLM sample), which needs no
``multinomial`` and so no sync. The draws use ``generator`` (or the default one of the device).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mambavlm.generation.settings import GenerationSettings

__all__ = ["TokenChooser", "sample_from_probs"]


def sample_from_probs(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """probs (B, V), rows summing to 1 -> one index per row (B,), drawn with probability probs[b, i]."""
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return torch.argmax(probs / race, dim=-1)


class TokenChooser:
    """logits (B, V) -> next token ids (B,): greedy, or sampled as ``settings`` says."""

    def __init__(self, settings: GenerationSettings, generator: torch.Generator | None = None) -> None:
        self.settings = settings
        self.generator = generator
        warpers = LogitsProcessorList()
        if settings.do_sample:
            if settings.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_k != 0:
                warpers.append(TopKLogitsWarper(top_k=settings.top_k))
            if settings.top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p=settings.top_p))
        self.warpers = warpers

    def filtered_logits(self, logits: Tensor) -> Tensor:
        """The warped float32 logits sampling draws from (-inf where a token is filtered out)."""
        return self.warpers(None, logits.float())

    def __call__(self, logits: Tensor) -> Tensor:
        if not self.settings.do_sample:
            return torch.argmax(logits, dim=-1)
        probs = torch.softmax(self.filtered_logits(logits), dim=-1)
        return sample_from_probs(probs, self.generator)
