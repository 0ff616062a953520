"""The MambaVLM processor: images and chat-formatted text -> ``input_ids``, ``attention_mask``,
``pixel_values``, as LLaVA-HF's and PaliGemma's processors give them.

- ``MambaVLMImageProcessor`` (a transformers ``BaseImageProcessor``): every encoder's preprocessing in
  the model's one geometry (``mambavlm.vision.preprocess.ImagePreprocess``: resize rule, size, mean,
  std, interpolation), one (N, 3, S_m, S_m) tensor per encoder.
- ``MambaVLMProcessor`` (a ``ProcessorMixin``): that image processor, the tokenizer, and the
  conversation format as its chat template. ``processor(images=..., text=...)`` takes prompts as the
  chat template writes them (``processor.apply_chat_template(messages, add_generation_prompt=True)``)
  and expands each ``<image>`` into the model's ``num_visual_tokens`` placeholder ids, left-padding
  the batch: ``model.generate(**processor(images=image, text=prompt))``.

Both are saved in ``processor_config.json`` / ``chat_template.jinja`` + the tokenizer's files, and
registered with ``AutoImageProcessor`` / ``AutoProcessor`` (``mambavlm/__init__.py``). Written here
because no transformers image processor applies two encoders' normalisations to one geometry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import BaseImageProcessor, BatchFeature, PreTrainedTokenizerBase, ProcessorMixin

from mambavlm.llm.tokenizer import IMAGE_TOKEN, tokenize_prompt
from mambavlm.vision.preprocess import ImagePreprocess

__all__ = ["MambaVLMImageProcessor", "MambaVLMProcessor", "left_pad"]


class MambaVLMImageProcessor(BaseImageProcessor):
    """PIL images -> ``pixel_values``: one float tensor (N, 3, S_m, S_m) per encoder m.

    Args:
        encoders: one ``ImagePreprocess`` (or its fields as a dict) per encoder, in the model's order.
    """

    model_input_names = ["pixel_values"]

    def __init__(self, encoders: Sequence[ImagePreprocess | dict[str, Any]] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.encoders = [
            dataclasses.asdict(e) if isinstance(e, ImagePreprocess) else dict(e) for e in encoders
        ]
        self._transforms = [ImagePreprocess(**_tuples(e)) for e in self.encoders]

    def preprocess(self, images: Image.Image | Sequence[Image.Image], **kwargs: Any) -> BatchFeature:
        """images: one PIL image or a list -> ``BatchFeature(pixel_values=[(N, 3, S_m, S_m)] * M)``.

        Raises TypeError for anything but PIL images (naming the position) and ValueError for an
        image processor without encoders.
        """
        if not self._transforms:
            raise ValueError("this MambaVLMImageProcessor has no encoders")
        images = [images] if isinstance(images, Image.Image) else list(images)
        for index, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise TypeError(f"image {index} is a {type(image).__name__}, expected a PIL image")
        return BatchFeature({"pixel_values": [torch.stack([t(image) for image in images]) for t in self._transforms]})

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("_transforms", None)
        return out


def _tuples(fields: dict[str, Any]) -> dict[str, Any]:
    """JSON lists back to the tuples ``ImagePreprocess`` holds."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def left_pad(ids: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (input_ids (B, L), attention_mask (B, L)), each row padded on the left with
    ``pad_token_id`` to the longest (the layout batched generation needs)."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, width - len(x) :] = torch.tensor(x, dtype=torch.long)
        attention_mask[row, width - len(x) :] = 1
    return input_ids, attention_mask


class MambaVLMProcessor(ProcessorMixin):
    """Image processor + tokenizer + chat template of one MambaVLM.

    Args:
        image_processor: the model's ``MambaVLMImageProcessor``.
        tokenizer: its tokenizer.
        chat_template: its conversation format (``ConversationTemplate.chat_template``).
        num_visual_tokens: placeholder ids per ``<image>`` (the model's ``num_visual_tokens``).
        add_bos: whether prompts start with BOS (LLaMA-family LLMs).
    """

    attributes = ["image_processor", "tokenizer"]

    def __init__(
        self,
        image_processor: MambaVLMImageProcessor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        chat_template: str | None = None,
        num_visual_tokens: int = 0,
        add_bos: bool = False,
        **kwargs: Any,
    ) -> None:
        self.num_visual_tokens = num_visual_tokens
        self.add_bos = add_bos
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def __call__(
        self,
        images: Image.Image | Sequence[Image.Image] | None = None,
        text: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Prompts (each with as many ``<image>`` as it has images) and their images, in order ->
        ``input_ids`` (B, L) and ``attention_mask`` (B, L), left-padded, and ``pixel_values`` (one
        (N, 3, S_m, S_m) per encoder, N = all images) when there are images.

        Raises ValueError when the ``<image>`` placeholders and the images do not match in number,
        and for a call without text.
        """
        if text is None:
            raise ValueError("MambaVLMProcessor needs text (a prompt per sample, with <image> where its image goes)")
        texts = [text] if isinstance(text, str) else list(text)
        images = [] if images is None else ([images] if isinstance(images, Image.Image) else list(images))
        placeholders = sum(t.count(IMAGE_TOKEN) for t in texts)
        if placeholders != len(images):
            raise ValueError(
                f"the prompts hold {placeholders} {IMAGE_TOKEN} placeholders for {len(images)} images "
                "(write the prompt with processor.apply_chat_template, an image part per image)"
            )
        ids = [tokenize_prompt(t, self.tokenizer, self.num_visual_tokens, self.add_bos) for t in texts]
        input_ids, attention_mask = left_pad(ids, self.tokenizer.pad_token_id)
        data: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if images:
            data["pixel_values"] = self.image_processor(images)["pixel_values"]
        return BatchFeature(data)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        """The tokenizer's ``batch_decode``."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        """The tokenizer's ``decode``."""
        return self.tokenizer.decode(*args, **kwargs)
