"""Per-encoder image preprocessing: PIL image -> normalised pixel tensor (3, S, S).

Each encoder is fed the way it was trained: its own mean/std, interpolation and resize rule, read
from the library that made it (timm's data config, open_clip's preprocess config).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch import nn

from mambavlm.vision.image import to_rgb

__all__ = ["ImagePreprocess"]

ResizeMode = Literal["center", "squash", "border"]
_OPEN_CLIP_RESIZE = {"shortest": "center", "squash": "squash"}


@dataclass(frozen=True)
class ImagePreprocess:
    """Eval-time transform of one encoder; picklable, so it can run in DataLoader workers.

    resize_mode (timm's crop modes): 'center' resizes the shorter side to image_size / crop_pct and
    center-crops image_size x image_size; 'squash' resizes both sides to image_size / crop_pct
    (aspect ratio not kept), then center-crops; 'border' resizes the longer side and pads with the
    mean colour (letterbox).
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: ResizeMode = "center"
    crop_pct: float = 1.0

    def __post_init__(self) -> None:
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 channels, got mean={self.mean} std={self.std}")
        if self.resize_mode not in ("center", "squash", "border"):
            raise ValueError(
                f"resize_mode must be 'center', 'squash' or 'border', got {self.resize_mode!r}"
            )
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")

    @classmethod
    def from_timm(cls, model: nn.Module, image_size: int) -> ImagePreprocess:
        """Read mean/std/interpolation/crop from a timm model's pretrained data config."""
        data = resolve_data_config(model=model)
        return cls(
            image_size=image_size,
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            interpolation=data["interpolation"],
            resize_mode=data.get("crop_mode", "center"),
            crop_pct=float(data["crop_pct"]),
        )

    @classmethod
    def from_open_clip(cls, preprocess_cfg: dict[str, Any], image_size: int) -> ImagePreprocess:
        """Read an open_clip preprocess config (``model.visual.preprocess_cfg``)."""
        resize_mode = preprocess_cfg.get("resize_mode", "shortest")
        if resize_mode not in _OPEN_CLIP_RESIZE:
            raise ValueError(
                f"open_clip resize_mode {resize_mode!r} is not supported "
                f"(use one of {sorted(_OPEN_CLIP_RESIZE)})"
            )
        return cls(
            image_size=image_size,
            mean=tuple(float(v) for v in preprocess_cfg["mean"]),
            std=tuple(float(v) for v in preprocess_cfg["std"]),
            interpolation=preprocess_cfg.get("interpolation", "bicubic"),
            resize_mode=_OPEN_CLIP_RESIZE[resize_mode],
        )

    @cached_property
    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """timm's eval transform: resize, center crop, to tensor, normalise."""
        return create_transform(
            input_size=(3, self.image_size, self.image_size),
            is_training=False,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            crop_pct=self.crop_pct,
            crop_mode=self.resize_mode,
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL image of any mode and size -> float tensor (3, image_size, image_size).

        The image goes through ``to_rgb`` first (EXIF orientation, transparency over white, any mode),
        the one decoder training, evaluation and ``generate`` share.
        """
        return self.transform(to_rgb(image))
