"""Vision encoders (timm and open_clip): the grid they return against their blocks run by hand, local
weights, frozen encoders, and clear errors (tiny random models; the paper's on the meta device)."""

from __future__ import annotations

import json
import logging

import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from mambavlm.config import EncoderConfig
from mambavlm.vision.encoder import create_encoder
from tests.conftest import DINO, DINO_KWARGS, SIGLIP, SIGLIP_KWARGS


TINY_OPEN_CLIP = "mambavlm-test-tiny-ViT-14"


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Large random weights, so that every block (and LayerScale) visibly changes the tokens."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def _save_timm(tmp_path, name: str, size: int, kwargs: dict) -> tuple[nn.Module, str]:
    ref = timm.create_model(name, pretrained=False, num_classes=0, img_size=size, **kwargs)
    _randomize(ref.eval())
    path = str(tmp_path / f"{name}.safetensors")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    return ref, path


def _timm_blocks_by_hand(ref: nn.Module, pixels: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """patch_embed -> pos embed (+CLS, registers) -> num_blocks blocks -> drop prefix -> grid."""
    x = ref.norm_pre(ref.patch_drop(ref._pos_embed(ref.patch_embed(pixels))))
    for block in ref.blocks[:num_blocks]:
        x = block(x)
    x = x[:, ref.num_prefix_tokens :]
    h, w = ref.patch_embed.grid_size
    return x.reshape(x.shape[0], h, w, x.shape[-1])


@pytest.fixture(scope="module")
def tiny_open_clip_name(tmp_path_factory) -> str:
    """A tiny native open_clip ViT registered through open_clip's own config registry."""
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 28,
            "layers": 3,
            "width": 32,
            "head_width": 16,
            "patch_size": 14,
        },
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    path = tmp_path_factory.mktemp("open_clip_cfg") / f"{TINY_OPEN_CLIP}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return TINY_OPEN_CLIP


def test_paper_encoders_on_meta_device():
    with torch.device("meta"):
        dino = create_encoder(
            EncoderConfig(name="timm:vit_large_patch14_reg4_dinov2", image_size=384)
        )
        siglip = create_encoder(
            EncoderConfig(name="open_clip:ViT-SO400M-14-SigLIP-384", image_size=384)
        )
        grids = [e(torch.empty(1, 3, 384, 384)) for e in (dino, siglip)]
    assert (dino.grid_size, dino.embed_dim) == ((27, 27), 1024)
    assert (siglip.grid_size, siglip.embed_dim) == ((27, 27), 1152)
    assert [tuple(g.shape) for g in grids] == [(1, 27, 27, 1024), (1, 27, 27, 1152)]
    assert dino.preprocess.mean == tuple(timm.data.IMAGENET_DEFAULT_MEAN)
    webli = open_clip.get_pretrained_cfg("ViT-SO400M-14-SigLIP-384", "webli")
    assert siglip.preprocess.mean == tuple(webli["mean"]) and siglip.preprocess.std == tuple(
        webli["std"]
    )
    assert siglip.preprocess.resize_strategy == "resize-naive"  # open_clip's own rule for SigLIP: squash


def test_timm_grid_matches_blocks_run_by_hand_and_local_weights_load(tmp_path):
    ref, path = _save_timm(tmp_path, DINO, 28, DINO_KWARGS)
    enc = create_encoder(
        EncoderConfig(name=f"timm:{DINO}", image_size=28, weights=path, kwargs=DINO_KWARGS)
    )
    assert ref.num_prefix_tokens == 5
    loaded = enc.backbone.state_dict()
    assert loaded.keys() <= ref.state_dict().keys() and "blocks.1.mlp.fc2.weight" in loaded
    for key, value in loaded.items():
        assert torch.equal(value, ref.state_dict()[key]), key
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        grid = enc(pixels)
        expected = _timm_blocks_by_hand(ref, pixels, num_blocks=2)
        last = _timm_blocks_by_hand(ref, pixels, num_blocks=3)
    assert grid.shape == (2, 2, 2, 32) and enc.grid_size == (2, 2) and enc.embed_dim == 32
    torch.testing.assert_close(grid, expected)
    assert not torch.allclose(grid, last, atol=1e-3)


@pytest.mark.parametrize("feature_layer", [-1, 2])
def test_timm_last_block_without_final_norm(tmp_path, feature_layer):
    ref, path = _save_timm(tmp_path, DINO, 28, DINO_KWARGS)
    enc = create_encoder(
        EncoderConfig(
            name=f"timm:{DINO}",
            image_size=28,
            weights=path,
            kwargs=DINO_KWARGS,
            feature_layer=feature_layer,
        )
    )
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        by_hand = _timm_blocks_by_hand(ref, pixels, num_blocks=3)
        torch.testing.assert_close(enc(pixels), by_hand)
        assert not torch.allclose(by_hand, ref.norm(by_hand), atol=1e-3)


def test_siglip_like_timm_grid_has_no_prefix_tokens(tmp_path):
    ref, path = _save_timm(tmp_path, SIGLIP, 42, SIGLIP_KWARGS)
    enc = create_encoder(
        EncoderConfig(name=f"timm:{SIGLIP}", image_size=42, weights=path, kwargs=SIGLIP_KWARGS)
    )
    pixels = torch.randn(2, 3, 42, 42)
    assert ref.num_prefix_tokens == 0
    with torch.no_grad():
        torch.testing.assert_close(enc(pixels), _timm_blocks_by_hand(ref, pixels, num_blocks=1))
    assert enc.backbone.attn_pool is None  # pooling head pruned


def test_open_clip_grid_matches_blocks_run_by_hand_and_local_weights_load(
    tmp_path, tiny_open_clip_name
):
    ref = _randomize(open_clip.create_model(tiny_open_clip_name, pretrained=None).eval())
    path = tmp_path / "tiny_open_clip.pt"
    torch.save(ref.state_dict(), path)
    enc = create_encoder(
        EncoderConfig(name=f"open_clip:{tiny_open_clip_name}", image_size=28, weights=str(path))
    )
    visual = ref.visual
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        x = visual.conv1(pixels).flatten(2).transpose(1, 2)  # (B, 4, 32), row-major patches
        x = (
            torch.cat([visual.class_embedding.expand(2, 1, 32), x], dim=1)
            + visual.positional_embedding
        )
        x = visual.ln_pre(x)
        for block in visual.transformer.resblocks[:2]:
            x = block(x)
        expected = x[:, 1:].reshape(2, 2, 2, 32)
        grid = enc(pixels)
    assert enc.grid_size == (2, 2) and enc.embed_dim == 32
    torch.testing.assert_close(grid, expected)
    assert enc.preprocess.mean == tuple(open_clip.OPENAI_DATASET_MEAN)


def test_frozen_encoder_has_no_grads_and_stays_in_eval():
    cfg = EncoderConfig(name=f"timm:{DINO}", image_size=28, kwargs=dict(DINO_KWARGS, drop_rate=0.5))
    enc = create_encoder(cfg)
    parent = nn.Sequential(enc, nn.Linear(32, 4))
    parent.train()
    assert parent[1].training and not enc.training
    assert not any(m.training for m in enc.modules())
    assert not any(p.requires_grad for p in enc.parameters())
    pixels = torch.randn(1, 3, 28, 28)
    torch.testing.assert_close(enc(pixels), enc(pixels))  # dropout off
    assert enc(pixels).grad_fn is None

    trainable = create_encoder(cfg.model_copy(update={"frozen": False}))
    trainable.train()
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())


def test_unknown_model_names_list_close_matches(tiny_open_clip_name):
    with pytest.raises(ValueError, match="vit_large_patch14_reg4_dinov2"):
        create_encoder(EncoderConfig(name="timm:vit_large_patch14_reg4_dinov3"))
    with pytest.raises(ValueError, match="ViT-SO400M-14-SigLIP-384"):
        create_encoder(EncoderConfig(name="open_clip:ViT-SO400M-14-SigLIP-385"))
    with pytest.raises(ValueError, match="'timm'"):
        create_encoder(EncoderConfig(name="tim:vit_small_patch14_dinov2"))
    with pytest.raises(ValueError, match="library prefix"):
        create_encoder(EncoderConfig(name="vit_small_patch14_dinov2"))


def test_bad_weights_and_bad_kwargs_are_named(tmp_path, tiny_open_clip_name):
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        create_encoder(EncoderConfig(name=f"timm:{DINO}", weights=missing, kwargs=DINO_KWARGS))
    with pytest.raises(ValueError, match="lvd142m"):
        create_encoder(EncoderConfig(name=f"timm:{DINO}", weights="lvd999m", kwargs=DINO_KWARGS))
    with pytest.raises(ValueError, match="no-such-tag"):
        create_encoder(
            EncoderConfig(name=f"open_clip:{tiny_open_clip_name}", weights="no-such-tag")
        )
    with pytest.raises(ValueError, match="image_size"):
        create_encoder(EncoderConfig(name=f"timm:{DINO}", kwargs=dict(DINO_KWARGS, img_size=56)))
    with pytest.raises(ValueError, match="feature_layer -4"):
        create_encoder(
            EncoderConfig(name=f"timm:{DINO}", image_size=28, kwargs=DINO_KWARGS, feature_layer=-4)
        )
    enc = create_encoder(EncoderConfig(name=f"timm:{DINO}", image_size=28, kwargs=DINO_KWARGS))
    with pytest.raises(ValueError, match=r"\(B, 3, 28, 28\)"):
        enc(torch.randn(1, 3, 42, 42))


def test_random_open_clip_weights_asked_for_are_built_without_open_clips_warning(tiny_open_clip_name, caplog) -> None:
    """weights: null (and describe, and a saved model's from_pretrained) build random weights on purpose:
    open_clip's "No pretrained weights loaded ... initialized randomly" read as a failure to fresh users.
    Only that message is dropped, and only while the encoder is built."""
    caplog.set_level(logging.WARNING)
    create_encoder(EncoderConfig(name=f"open_clip:{tiny_open_clip_name}", image_size=28))
    assert "No pretrained weights loaded" not in caplog.text
    open_clip.create_model(tiny_open_clip_name, pretrained=None)  # open_clip itself still says it
    assert f"No pretrained weights loaded for model '{tiny_open_clip_name}'" in caplog.text
    logging.warning("another warning")
    assert "another warning" in caplog.text
