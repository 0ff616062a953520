"""Per-encoder image preprocessing: PIL image -> normalised pixel tensor (3, S, S), in one geometry per model.

Every encoder of a model sees the same picture (MambaVLM sec. 3.2: "both vision encoders take the
same patchified image"), so that patch (r, c) of every grid covers the same region, the pairing that
cross-stitch scanning and channel fusion rely on. The resize rule is the model's, one of Prismatic's
and Cobra's (``image_resize_strategy``):

- ``resize-naive`` (Cobra's DINOv2 + SigLIP default): both sides to S, the aspect ratio not kept;
- ``letterbox``: padded to a square with one fill colour (the first encoder's mean, as Prismatic
  does), then resized to S x S;
- ``resize-crop``: the shorter side to S, then the centre S x S crop (no ``crop_pct`` margin, which
  differs between encoders and would move their crops apart).

Each encoder keeps what it was trained with: its own mean, std and interpolation, read from the
library that made it (timm's data config, open_clip's preprocess config). The image first goes
through ``to_rgb`` (``mambavlm.vision.image``), the decoder training, evaluation and generate share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import torch
from PIL import Image, ImageOps
from timm.data import create_transform, resolve_data_config
from torch import nn
from torchvision.transforms import Compose

from mambavlm.vision.image import to_rgb

__all__ = ["IMAGE_RESIZE_STRATEGIES", "ImagePreprocess", "ImageResizeStrategy", "Letterbox"]

ImageResizeStrategy = Literal["resize-naive", "letterbox", "resize-crop"]
IMAGE_RESIZE_STRATEGIES: tuple[str, ...] = ("resize-naive", "letterbox", "resize-crop")
_TIMM_STRATEGY = {"center": "resize-crop", "squash": "resize-naive", "border": "letterbox"}
_OPEN_CLIP_STRATEGY = {"shortest": "resize-crop", "squash": "resize-naive", "longest": "letterbox"}


@dataclass(frozen=True)
class Letterbox:
    """Pad a PIL image to a centred square with ``fill`` (RGB 0-255); picklable."""

    fill: tuple[int, int, int]

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        side = max(width, height)
        left, top = (side - width) // 2, (side - height) // 2
        return ImageOps.expand(image, (left, top, side - width - left, side - height - top), fill=self.fill)


def mean_colour(mean: tuple[float, float, float]) -> tuple[int, int, int]:
    """A normalisation mean (0-1) as an RGB fill colour (0-255), as Prismatic's letterbox takes it."""
    return tuple(int(m * 255) for m in mean)  # type: ignore[return-value]


@dataclass(frozen=True)
class ImagePreprocess:
    """Eval-time transform of one encoder; picklable, so it can run in DataLoader workers.

    image_size: S. mean, std: the encoder's normalisation. interpolation: its resize filter.
    resize_strategy: the model's geometry (module docstring). letterbox_fill: the pad colour of
    ``letterbox`` (RGB 0-255; the same for every encoder of a model).
    Raises ValueError for a bad size, mean/std width or strategy.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_strategy: ImageResizeStrategy = "resize-naive"
    letterbox_fill: tuple[int, int, int] = (0, 0, 0)

    def __post_init__(self) -> None:
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 channels, got mean={self.mean} std={self.std}")
        if self.resize_strategy not in IMAGE_RESIZE_STRATEGIES:
            raise ValueError(
                f"resize_strategy must be one of {IMAGE_RESIZE_STRATEGIES}, got {self.resize_strategy!r}"
            )

    @classmethod
    def from_timm(
        cls, model: nn.Module, image_size: int, resize_strategy: ImageResizeStrategy | None = None
    ) -> ImagePreprocess:
        """Mean/std/interpolation of a timm model's pretrained data config; the resize rule is
        ``resize_strategy``, or timm's own crop mode translated when None."""
        data = resolve_data_config(model=model)
        mean = tuple(float(v) for v in data["mean"])
        return cls(
            image_size=image_size,
            mean=mean,
            std=tuple(float(v) for v in data["std"]),
            interpolation=data["interpolation"],
            resize_strategy=resize_strategy or _TIMM_STRATEGY[data.get("crop_mode", "center")],
            letterbox_fill=mean_colour(mean),
        )

    @classmethod
    def from_open_clip(
        cls, preprocess_cfg: dict[str, Any], image_size: int, resize_strategy: ImageResizeStrategy | None = None
    ) -> ImagePreprocess:
        """Mean/std/interpolation of an open_clip preprocess config (``model.visual.preprocess_cfg``);
        the resize rule is ``resize_strategy``, or open_clip's own translated when None."""
        native = preprocess_cfg.get("resize_mode", "shortest")
        if resize_strategy is None and native not in _OPEN_CLIP_STRATEGY:
            raise ValueError(
                f"open_clip resize_mode {native!r} is not supported (use one of {sorted(_OPEN_CLIP_STRATEGY)})"
            )
        mean = tuple(float(v) for v in preprocess_cfg["mean"])
        return cls(
            image_size=image_size,
            mean=mean,
            std=tuple(float(v) for v in preprocess_cfg["std"]),
            interpolation=preprocess_cfg.get("interpolation", "bicubic"),
            resize_strategy=resize_strategy or _OPEN_CLIP_STRATEGY[native],
            letterbox_fill=mean_colour(mean),
        )

    @cached_property
    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """Resize by the strategy, to tensor, normalise (timm's eval transform; a pad for letterbox)."""
        resize = create_transform(
            input_size=(3, self.image_size, self.image_size),
            is_training=False,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            crop_pct=1.0,
            crop_mode="center" if self.resize_strategy == "resize-crop" else "squash",
        )
        if self.resize_strategy == "letterbox":
            return Compose([Letterbox(self.letterbox_fill), resize])
        return resize

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL image of any mode and size -> float tensor (3, image_size, image_size).

        The image goes through ``to_rgb`` first (EXIF orientation, transparency over white, any mode),
        the one decoder training, evaluation and ``generate`` share.
        """
        return self.transform(to_rgb(image))
