"""The fine-tuning objective: next-token cross-entropy on the answer tokens (distillation's are in
``mambavlm.distill.stages``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mambavlm.llm.tokenizer import IGNORE_INDEX

__all__ = ["NextTokenObjective", "answer_tokens"]


def answer_tokens(labels: Tensor) -> Tensor:
    """Tokens the causal-LM loss scores in labels (B, L): those after the first with a label != -100."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


@dataclass
class NextTokenObjective:
    """The LLM's causal-LM loss on a collated batch (labels -100 are ignored), reduced as transformers
    reduces it with ``num_items_in_batch``: the sum over the micro-batch's answer tokens divided by the
    answer tokens of the whole step. ``module`` is the MambaVLM (or any model taking input_ids,
    attention_mask, pixel_values, labels, num_items_in_batch and returning ``.loss``)."""

    module: nn.Module

    def num_items(self, batch: dict[str, Any]) -> Tensor:
        return answer_tokens(batch["labels"]).reshape(1).to(torch.float64)

    def loss(self, prepared: nn.Module, batch: dict[str, Any], num_items: Tensor) -> Tensor:
        return prepared(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            labels=batch["labels"],
            num_items_in_batch=num_items[0],
        ).loss
