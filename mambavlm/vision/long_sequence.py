"""The visual long sequence: M encoders' patch grids on one common h x w grid (MambaVLM Eq. 5).

fusion 'sequence' keeps the M grids apart; in the visual long sequence their tokens are map-major:
token (map m, row r, column c) sits at index m*h*w + r*w + c, so the sequence has M*h*w tokens.
fusion 'channel' (Cobra's baseline) concatenates the grids along channels: one grid, h*w tokens.
"""

from __future__ import annotations

import dataclasses

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mambavlm.config import ConfigError, EncoderConfig, VisionConfig
from mambavlm.vision.encoder import VisionEncoder, create_encoder

__all__ = ["VisualLongSequence", "check_patch_fits", "resample_grid"]


def check_patch_fits(cfg: VisionConfig, encoders: Sequence[nn.Module]) -> None:
    """Raise ConfigError naming ``vision.encoders.<i>.image_size``, its value and the encoder's patch size
    for each encoder whose image is smaller than one patch: its grid would be empty, and the forward fail
    inside torch. An image size that is not a multiple of the patch is fine (the remainder is dropped, as
    SigLIP 384 / 14 does)."""
    problems = [
        f"vision.encoders.{i}.image_size: {enc_cfg.image_size} px is smaller than one {ph} x {pw} px patch of "
        f"{enc_cfg.name}: set it to at least {max(ph, pw)}"
        for i, (enc_cfg, encoder) in enumerate(zip(cfg.encoders, encoders))
        for ph, pw in [encoder.patch_size]
        if enc_cfg.image_size < max(ph, pw)
    ]
    if problems:
        raise ConfigError("\n".join(problems))


def resample_grid(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resample a patch grid (N, h, w, C) to (N, size[0], size[1], C); no-op if equal."""
    if tuple(grid.shape[1:3]) == tuple(size):
        return grid
    resized = F.interpolate(
        grid.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False
    )
    return resized.permute(0, 2, 3, 1).contiguous()


def _encoder(index: int, enc: EncoderConfig, cfg: VisionConfig) -> VisionEncoder:
    """``create_encoder`` for ``vision.encoders.<index>``. timm's and open_clip's constructors refuse bad
    ``kwargs`` with a TypeError (an unknown argument) or an AssertionError (e.g. a width the heads do not
    divide): with kwargs given, either is a ConfigError naming the key and the library's words."""
    try:
        return create_encoder(enc, cfg.image_resize_strategy)
    except (TypeError, AssertionError) as err:
        if not enc.kwargs:
            raise
        raise ConfigError(f"vision.encoders.{index}.kwargs {enc.kwargs}: {enc.name} refuses them: "
                          f"{err or type(err).__name__}") from None


class VisualLongSequence(nn.Module):
    """Runs the M encoders of a VisionConfig and brings their grids to one (h, w).

    forward: one pixel tensor (N, 3, S_i, S_i) per encoder -> list of grids, [(N, h, w, C_i)] * M
    for fusion 'sequence', [(N, h, w, sum C_i)] for fusion 'channel'.

    Building raises ConfigError for an encoder whose image_size is smaller than its patch
    (``check_patch_fits``), or whose ``kwargs`` its library refuses (``_encoder``).
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(_encoder(i, enc, cfg) for i, enc in enumerate(cfg.encoders))
        check_patch_fits(cfg, self.encoders)
        fill = self.encoders[0].preprocess.letterbox_fill  # one pad colour: one picture for every encoder
        for encoder in self.encoders:
            encoder.preprocess = dataclasses.replace(encoder.preprocess, letterbox_fill=fill)
        self.fusion = cfg.fusion
        self._grid_size = _target_grid(cfg.target_grid, [e.grid_size for e in self.encoders])

    @property
    def grid_size(self) -> tuple[int, int]:
        """The common (h, w) every grid is resampled to."""
        return self._grid_size

    @property
    def num_maps(self) -> int:
        """Number of returned grids: M for 'sequence' fusion, 1 for 'channel' fusion."""
        return len(self.encoders) if self.fusion == "sequence" else 1

    @property
    def out_dims(self) -> list[int]:
        """Channel width of each returned grid."""
        dims = [e.embed_dim for e in self.encoders]
        return dims if self.fusion == "sequence" else [sum(dims)]

    @property
    def num_visual_tokens(self) -> int:
        """Length of the visual sequence: num_maps * h * w."""
        h, w = self._grid_size
        return self.num_maps * h * w

    def preprocess(self, image: Image.Image) -> list[torch.Tensor]:
        """One PIL image -> its pixel tensor (3, S_i, S_i) for each encoder, all in the model's one
        geometry (``image_resize_strategy``): patch (r, c) of every grid covers the same region."""
        return [e.preprocess(image) for e in self.encoders]

    def forward(self, pixel_values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Pixels [(N, 3, S_i, S_i)] * M -> grids [(N, h, w, C_i)] * M, or [(N, h, w, sum C_i)]."""
        if isinstance(pixel_values, torch.Tensor) or len(pixel_values) != len(self.encoders):
            got = "one tensor" if isinstance(pixel_values, torch.Tensor) else len(pixel_values)
            raise ValueError(
                f"expected a sequence of {len(self.encoders)} pixel tensors (one per encoder: "
                f"{', '.join(e.name for e in self.encoders)}), got {got}"
            )
        batch_sizes = {int(p.shape[0]) for p in pixel_values}
        if len(batch_sizes) != 1:
            raise ValueError(f"pixel tensors disagree on batch size: {sorted(batch_sizes)}")
        grids = [
            resample_grid(encoder(pixels), self._grid_size)
            for encoder, pixels in zip(self.encoders, pixel_values, strict=True)
        ]
        if self.fusion == "channel":
            return [torch.cat(grids, dim=-1)]
        return grids


def _target_grid(target: str | list[int], sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """Resolve VisionConfig.target_grid against the encoders' grid sizes."""
    if isinstance(target, list):
        if len(target) != 2 or min(target) <= 0:
            raise ValueError(f"target_grid must be [h, w] with positive h, w; got {target}")
        return (target[0], target[1])
    if target == "first":
        return sizes[0]
    if target == "largest":
        return max(sizes, key=lambda s: s[0] * s[1])
    if target == "smallest":
        return min(sizes, key=lambda s: s[0] * s[1])
    raise ValueError(
        f"target_grid must be 'largest', 'smallest', 'first' or [h, w]; got {target!r}"
    )
