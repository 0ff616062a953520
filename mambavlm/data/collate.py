"""Batching of :class:`LlavaDataset` samples: right padding, skipped-record reporting, image stacking."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from mambavlm.data.llava import SkippedSample
from mambavlm.llm.tokenizer import IGNORE_INDEX

__all__ = ["VLMCollator"]


@dataclass(frozen=True)
class VLMCollator:
    """Collate samples into a batch dict.

    Returns ``input_ids`` (B, L) right-padded with ``pad_token_id``, ``attention_mask`` (B, L) long
    (1 = real token), ``labels`` (B, L) padded with -100, ``pixel_values`` = one tensor
    (N_img, 3, H_k, W_k) per vision encoder holding the images of the samples that have one, in batch
    order (None when no sample has an image), ``ids`` (B,), ``skipped`` = the dropped
    :class:`SkippedSample` items, ``num_truncated`` and ``num_tokens`` (the real tokens, attention_mask's
    sum, as a host int: counting it on the GPU would stall the training loop). When every item was
    skipped, ``input_ids``, ``attention_mask``, ``labels`` and ``pixel_values`` are None.
    """

    pad_token_id: int

    def __call__(self, items: Sequence[dict[str, Any] | SkippedSample]) -> dict[str, Any]:
        skipped = [item for item in items if isinstance(item, SkippedSample)]
        samples = [item for item in items if not isinstance(item, SkippedSample)]
        batch: dict[str, Any] = {
            "ids": [s["id"] for s in samples],
            "skipped": skipped,
            "num_truncated": sum(bool(s.get("truncated", False)) for s in samples),
            "num_tokens": sum(len(s["input_ids"]) for s in samples),
            "input_ids": None,
            "attention_mask": None,
            "labels": None,
            "pixel_values": None,
        }
        if not samples:
            return batch
        input_ids = [s["input_ids"] for s in samples]
        batch["input_ids"] = pad_sequence(
            input_ids, batch_first=True, padding_value=self.pad_token_id
        )
        batch["labels"] = pad_sequence(
            [s["labels"] for s in samples], batch_first=True, padding_value=IGNORE_INDEX
        )
        batch["attention_mask"] = pad_sequence(
            [torch.ones_like(ids) for ids in input_ids], batch_first=True, padding_value=0
        )
        batch["pixel_values"] = _stack_images(samples)
        return batch


def _stack_images(samples: list[dict[str, Any]]) -> list[torch.Tensor] | None:
    """One (N_img, 3, H_k, W_k) tensor per encoder over the samples with images, or None."""
    per_sample = [(s["id"], s["pixel_values"]) for s in samples if s["pixel_values"] is not None]
    if not per_sample:
        return None
    num_encoders = len(per_sample[0][1])
    for sample_id, views in per_sample:
        if len(views) != num_encoders:
            raise ValueError(
                f"sample {sample_id} has {len(views)} image tensors, sample {per_sample[0][0]} has "
                f"{num_encoders}: every sample needs one per vision encoder"
            )
    return [torch.stack([views[k] for _, views in per_sample]) for k in range(num_encoders)]
