"""Vision encoders created by name from timm or open_clip, returning one block's patch grid.

``create_encoder(EncoderConfig(name="timm:vit_large_patch14_reg4_dinov2", image_size=384))`` gives a
frozen ViT whose forward maps pixels (B, 3, 384, 384) to the patch grid (B, 27, 27, 1024) of the
second-to-last block: no CLS / register tokens, no final norm (as LLaVA, Prismatic and Cobra do).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import open_clip
import timm
import torch
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer as OpenClipVisionTransformer
from torch import nn

from mambavlm.config import EncoderConfig, split_encoder_name
from mambavlm.vision.preprocess import ImagePreprocess, ImageResizeStrategy

__all__ = ["VisionEncoder", "create_encoder"]

_WEIGHT_SUFFIXES = {".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".npz"}
_OPEN_CLIP_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


class VisionEncoder(nn.Module):
    """A ViT mapping pixels (B, 3, S, S) to the patch grid (B, h, w, C) of one block.

    ``backbone`` is a timm VisionTransformer-style model (also the trunk of open_clip's timm towers,
    e.g. SigLIP) or an open_clip VisionTransformer. Blocks after the chosen one, the final norm and
    the pooling head are pruned away: the module holds only what the grid depends on.
    A frozen encoder has no trainable parameters and stays in eval mode through ``.train()``.
    """

    zero3_leaf: ClassVar[bool] = True
    """The forward calls ``backbone.forward_intermediates``, not the backbone's own forward, so the
    backbone's direct parameters (position embedding, class token) are read without its hooks: DeepSpeed
    ZeRO-3 gathers the whole encoder in this module's forward."""

    def __init__(
        self,
        backbone: nn.Module,
        *,
        name: str,
        image_size: int,
        feature_layer: int,
        frozen: bool,
        preprocess: ImagePreprocess,
    ) -> None:
        super().__init__()
        if isinstance(backbone, OpenClipVisionTransformer):
            num_blocks = len(backbone.transformer.resblocks)
            embed_dim = backbone.transformer.width
            grid_size = tuple(backbone.grid_size)
            patch_size = getattr(backbone, "patch_size", None) or backbone.conv1.kernel_size
        elif all(
            hasattr(backbone, attr)
            for attr in (
                "forward_intermediates",
                "prune_intermediate_layers",
                "patch_embed",
                "blocks",
            )
        ):
            num_blocks = len(backbone.blocks)
            embed_dim = backbone.embed_dim
            grid_size = tuple(backbone.patch_embed.grid_size)
            patch_size = backbone.patch_embed.patch_size
        else:
            raise ValueError(
                f"{name}: {type(backbone).__name__} is not a ViT with patch_embed, blocks and "
                "forward_intermediates (timm VisionTransformer-style, open_clip VisionTransformer)"
            )
        if not -num_blocks <= feature_layer < num_blocks:
            raise ValueError(
                f"{name}: feature_layer {feature_layer} is out of range for {num_blocks} blocks "
                f"(use {-num_blocks}..{num_blocks - 1})"
            )
        self.block_index = feature_layer % num_blocks
        backbone.prune_intermediate_layers([self.block_index], prune_norm=True, prune_head=True)
        self.backbone = backbone
        self.name = name
        self.image_size = image_size
        self.feature_layer = feature_layer
        self.embed_dim: int = int(embed_dim)
        self.grid_size: tuple[int, int] = (int(grid_size[0]), int(grid_size[1]))
        patch = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        self.patch_size: tuple[int, int] = (int(patch[0]), int(patch[1]))
        self.preprocess = preprocess
        self.frozen = frozen
        if frozen:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> VisionEncoder:
        """Set train/eval mode; a frozen encoder stays in eval mode whatever ``mode`` is."""
        return super().train(mode and not self.frozen)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, S, S), S = image_size -> patch grid (B, h, w, C) of block feature_layer."""
        expected = (3, self.image_size, self.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"{self.name}: expected pixel_values of shape "
                f"(B, {', '.join(map(str, expected))}), got {tuple(pixel_values.shape)}"
            )
        x = pixel_values.to(next(self.backbone.parameters()).dtype)
        if isinstance(self.backbone, OpenClipVisionTransformer):
            tokens = self.backbone.forward_intermediates(
                x,
                indices=[self.block_index],
                stop_early=True,
                normalize_intermediates=False,
                intermediates_only=True,
                output_fmt="NLC",
            )["image_intermediates"][0]
        else:
            tokens = self.backbone.forward_intermediates(
                x,
                indices=[self.block_index],
                norm=False,
                stop_early=True,
                output_fmt="NLC",
                intermediates_only=True,
            )[0]
        h, w = self.grid_size
        return tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1])

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, image_size={self.image_size}, "
            f"feature_layer={self.feature_layer}, grid_size={self.grid_size}, "
            f"embed_dim={self.embed_dim}, frozen={self.frozen}"
        )


def create_encoder(cfg: EncoderConfig, resize_strategy: ImageResizeStrategy | None = None) -> VisionEncoder:
    """Build the encoder named by ``cfg.name`` ('timm:<model>' or 'open_clip:<model>').

    ``resize_strategy``: the model's image geometry (``VisionConfig.image_resize_strategy``); None
    keeps the library's own rule for this encoder alone.

    ``cfg.weights``: None = random init (nothing downloaded; works under ``torch.device("meta")``),
    'pretrained' = the library's default weights, a local file path, an open_clip pretrained tag /
    a timm pretrained tag, or for timm an 'hf-hub:org/name' model (its hub config sets the model).
    """
    library, model_name = split_encoder_name(cfg.name)  # a known model: checked when cfg was validated
    if library == "timm":
        backbone, preprocess = _create_timm(model_name, cfg, resize_strategy)
    else:
        backbone, preprocess = _create_open_clip(model_name, cfg, resize_strategy)
    return VisionEncoder(
        backbone,
        name=cfg.name,
        image_size=cfg.image_size,
        feature_layer=cfg.feature_layer,
        frozen=cfg.frozen,
        preprocess=preprocess,
    )


def _check_reserved(kwargs: dict[str, Any], reserved: dict[str, str], name: str) -> None:
    for key, field in reserved.items():
        if key in kwargs:
            raise ValueError(f"{name}: set {field}, not kwargs.{key}")


def _local_weights(weights: str) -> Path | None:
    """The local file ``weights`` names; None if not path-like; FileNotFoundError if missing."""
    path = Path(weights).expanduser()
    if path.is_file():
        return path
    path_like = "/" in weights or "\\" in weights or weights.startswith(("~", "."))
    if path_like or path.suffix in _WEIGHT_SUFFIXES:
        raise FileNotFoundError(f"encoder weights file not found: {weights}")
    return None


def _create_timm(
    model_name: str, cfg: EncoderConfig, resize_strategy: ImageResizeStrategy | None
) -> tuple[nn.Module, ImagePreprocess]:
    _check_reserved(
        cfg.kwargs,
        {
            "img_size": "image_size",
            "pretrained": "weights",
            "pretrained_cfg_overlay": "weights",
            "num_classes": "nothing (the head is removed)",
        },
        cfg.name,
    )
    kwargs = dict(cfg.kwargs, num_classes=0, img_size=cfg.image_size)
    weights = cfg.weights
    if weights is None:
        model = timm.create_model(model_name, pretrained=False, **kwargs)
    elif weights == "pretrained":
        model = timm.create_model(model_name, pretrained=True, **kwargs)
    elif weights.startswith("hf-hub:"):
        model = timm.create_model(weights, pretrained=True, **kwargs)
    elif (path := _local_weights(weights)) is not None:
        model = timm.create_model(
            model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs
        )
    else:
        architecture = model_name.split(".")[0]
        tagged = f"{architecture}.{weights}"
        if tagged not in timm.list_pretrained(f"{architecture}.*"):
            tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{architecture}.*")]
            raise ValueError(
                f"{cfg.name}: weights {weights!r} is not 'pretrained', an existing file, an "
                f"'hf-hub:' name, or a pretrained tag of {architecture} (tags: {tags})"
            )
        model = timm.create_model(tagged, pretrained=True, **kwargs)
    return model, ImagePreprocess.from_timm(model, cfg.image_size, resize_strategy)


def _create_open_clip(
    model_name: str, cfg: EncoderConfig, resize_strategy: ImageResizeStrategy | None
) -> tuple[nn.Module, ImagePreprocess]:
    _check_reserved(
        cfg.kwargs,
        {"pretrained": "weights", "force_image_size": "image_size", "device": "the default device"},
        cfg.name,
    )
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    weights = cfg.weights
    if weights is None:
        pretrained = None
    elif weights == "pretrained":
        if len(tags) != 1:
            raise ValueError(
                f"{cfg.name}: 'pretrained' needs exactly one open_clip pretrained tag, the model "
                f"has {tags or 'none'}; set weights to one tag or to a local file"
            )
        pretrained = tags[0]
    elif (path := _local_weights(weights)) is not None:
        pretrained = str(path)
    elif weights in tags:
        pretrained = weights
    else:
        raise ValueError(
            f"{cfg.name}: weights {weights!r} is not 'pretrained', an existing file, or an "
            f"open_clip pretrained tag of {model_name} (tags: {tags})"
        )
    force_preprocess = None if pretrained in tags else _shared_tag_preprocess(model_name, tags)
    with _without_random_init_warning(pretrained is None):
        model = open_clip.create_model(
            model_name,
            pretrained=pretrained,
            device=torch.get_default_device(),
            force_image_size=cfg.image_size,
            force_preprocess_cfg=force_preprocess,
            pretrained_hf=False,
            **cfg.kwargs,
        )
    visual = model.visual
    preprocess = ImagePreprocess.from_open_clip(visual.preprocess_cfg, cfg.image_size, resize_strategy)
    backbone = visual.trunk if isinstance(visual, TimmModel) else visual
    return backbone, preprocess


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextmanager
def _without_random_init_warning(asked: bool) -> Iterator[None]:
    """Without open_clip's root-logger warning "No pretrained weights loaded ... initialized randomly" where
    random weights are what was asked for (``weights: null``; ``describe`` on the meta device; a saved
    model's ``from_pretrained``, whose own weights are loaded next): it read as if something had failed."""
    if not asked:
        yield
        return
    root, drop = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _shared_tag_preprocess(model_name: str, tags: list[str]) -> dict[str, Any] | None:
    """The preprocessing all pretrained tags of ``model_name`` agree on (local / random weights).

    open_clip attaches mean/std to a pretrained tag, not to the architecture; a local copy of e.g.
    the SigLIP 'webli' weights would otherwise get the OpenAI CLIP mean/std.
    """
    found = {
        tuple(
            open_clip.get_pretrained_cfg(model_name, tag).get(k) for k in _OPEN_CLIP_PREPROCESS_KEYS
        )
        for tag in tags
    }
    if len(found) != 1:
        return None
    values = dict(zip(_OPEN_CLIP_PREPROCESS_KEYS, found.pop(), strict=True))
    return {k: v for k, v in values.items() if v is not None}
