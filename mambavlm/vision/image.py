"""One image decoder for training, evaluation and ``generate``: any file or PIL image -> the RGB a viewer shows.

``to_rgb`` applies the EXIF orientation (a phone photo stored sideways is turned upright) and converts
every PIL mode to 8-bit RGB as an image viewer displays it: transparency (RGBA, LA, palettes with a
transparent index, premultiplied modes) is composited over white; grey, bilevel, palette, CMYK,
YCbCr, LAB and HSV go through PIL's conversions; 16- and 32-bit integer images are scaled from their
bit depth to 8 bits, float images from [0, 1] (or [0, 255] when their values exceed 1); an animated
image gives its first frame. ``open_image`` reads a file fully and returns ``to_rgb`` of it.

PIL's ``Image.convert("RGB")`` alone drops alpha (transparent pixels keep whatever colour they store,
often black), ignores EXIF orientation and clips 16-bit values: the reasons this module exists.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = ["BACKGROUND", "image_path_problem", "open_image", "to_rgb"]

BACKGROUND: tuple[int, int, int] = (255, 255, 255)
"""What transparent pixels are composited over: white, as browsers and image viewers show them."""

_HIGH_BIT_DEPTH = {"I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16}


def _to_8bit_grey(image: Image.Image) -> Image.Image:
    """An integer (16/32-bit) or float single-channel image as 8-bit grey, scaled from its range."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
    else:
        bits = _HIGH_BIT_DEPTH.get(image.mode)
        if bits is None:  # mode "I": 32-bit storage, usually holding 16-bit samples (16-bit PNG, TIFF)
            bits = 16 if values.size == 0 or values.max() < 2**16 else 32
        scale = 255.0 / (2**bits - 1)
    grey = np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8)
    return Image.fromarray(grey, mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` upright and as the 8-bit RGB a viewer shows (see the module docstring).

    Raises TypeError for anything but a PIL image.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in ("I", "F") or mode in _HIGH_BIT_DEPTH:
        image, mode = _to_8bit_grey(image), "L"
    if mode in ("RGBa", "La"):  # premultiplied alpha
        image, mode = image.convert("RGBA"), "RGBA"
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode == "PA":
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")


def image_path_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be opened as an image file (it does not exist, or it is a directory), or
    None for a file."""
    path = Path(path)
    if path.is_dir():
        return f"image path is a directory, not a file: {path}"
    if not path.is_file():
        return f"image file not found: {path}"
    return None


def open_image(path: str | Path) -> Image.Image:
    """Decode the image file at ``path`` completely and return ``to_rgb`` of it.

    Raises FileNotFoundError for a missing file, IsADirectoryError for a directory, and PIL's errors
    (OSError, ValueError, ...) for an unreadable file.
    """
    path = Path(path)
    if problem := image_path_problem(path):
        raise (IsADirectoryError if path.is_dir() else FileNotFoundError)(problem)
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)
