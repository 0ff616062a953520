"""The fine-tuning objective: next-token cross-entropy on the answer tokens (distillation's are in
``mambavlm.distill.stages``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

__all__ = ["NextTokenObjective"]


@dataclass
class NextTokenObjective:
    """The LLM's causal-LM loss on a collated batch (labels -100 are ignored), as transformers reduces
    it: the mean over the micro-batch's answer tokens. ``module`` is the MambaVLM (or any model taking
    input_ids, attention_mask, pixel_values, labels and returning ``.loss``)."""

    module: nn.Module

    def loss(self, prepared: nn.Module, batch: dict[str, Any]) -> Tensor:
        return prepared(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            labels=batch["labels"],
        ).loss
