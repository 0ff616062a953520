"""The visual long sequence: encoders' grids resampled to one target grid, sequence and channel fusion
(tiny random encoders; the paper's on the meta device)."""

from __future__ import annotations

import pytest
import torch

from mambavlm.config import EncoderConfig, VisionConfig
from mambavlm.vision.long_sequence import VisualLongSequence
from tests.conftest import DINO, DINO_KWARGS, SIGLIP, SIGLIP_KWARGS, three_stripes


@pytest.mark.parametrize(
    "fusion, tokens, dims", [("sequence", 1458, [1024, 1152]), ("channel", 729, [2176])]
)
def test_paper_visual_long_sequence_on_meta_device(fusion, tokens, dims):
    cfg = VisionConfig(
        encoders=[
            EncoderConfig(name="timm:vit_large_patch14_reg4_dinov2", image_size=384),
            EncoderConfig(name="open_clip:ViT-SO400M-14-SigLIP-384", image_size=384),
        ],
        fusion=fusion,
    )
    with torch.device("meta"):
        vls = VisualLongSequence(cfg)
    assert (vls.num_visual_tokens, vls.out_dims, vls.grid_size) == (tokens, dims, (27, 27))


def _two_encoder_config(**kwargs) -> VisionConfig:
    return VisionConfig(
        encoders=[
            EncoderConfig(name=f"timm:{DINO}", image_size=28, kwargs=DINO_KWARGS),  # 2 x 2, C = 32
            EncoderConfig(
                name=f"timm:{SIGLIP}", image_size=42, kwargs=SIGLIP_KWARGS
            ),  # 3 x 3, C = 48
        ],
        **kwargs,
    )


def _bilinear_matrix(src: int, dst: int) -> torch.Tensor:
    """Hand-worked 1-D bilinear weights (half-pixel centres, edges clamped) for src -> dst."""
    table = {
        (2, 3): [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]],
        (3, 2): [[0.75, 0.25, 0.0], [0.0, 0.25, 0.75]],
    }
    return torch.tensor(table[(src, dst)])


@pytest.mark.parametrize(
    "target, grid", [("largest", (3, 3)), ("smallest", (2, 2)), ("first", (2, 2))]
)
def test_visual_long_sequence_resamples_to_the_target_grid(target, grid):
    torch.manual_seed(0)
    vls = VisualLongSequence(_two_encoder_config(target_grid=target))
    pixels = [torch.randn(2, 3, 28, 28), torch.randn(2, 3, 42, 42)]
    with torch.no_grad():
        own = [enc(p) for enc, p in zip(vls.encoders, pixels, strict=True)]
        grids = vls(pixels)
    assert vls.grid_size == grid and vls.num_maps == 2 and vls.out_dims == [32, 48]
    assert vls.num_visual_tokens == 2 * grid[0] * grid[1]
    assert [tuple(g.shape) for g in grids] == [(2, *grid, 32), (2, *grid, 48)]
    for own_grid, out in zip(own, grids, strict=True):
        size = own_grid.shape[1]
        if size == grid[0]:
            assert torch.equal(out, own_grid)
        else:
            m = _bilinear_matrix(size, grid[0])
            torch.testing.assert_close(out, torch.einsum("ir,js,brsc->bijc", m, m, own_grid))


def test_visual_long_sequence_explicit_grid_and_channel_fusion():
    torch.manual_seed(0)
    vls = VisualLongSequence(_two_encoder_config(target_grid=[4, 4]))
    pixels = [torch.randn(1, 3, 28, 28), torch.randn(1, 3, 42, 42)]
    assert [tuple(g.shape) for g in vls(pixels)] == [(1, 4, 4, 32), (1, 4, 4, 48)]

    channel = VisualLongSequence(_two_encoder_config(fusion="channel"))
    sequence = VisualLongSequence(_two_encoder_config())
    sequence.load_state_dict(channel.state_dict())
    with torch.no_grad():
        (fused,) = channel(pixels)
        parts = sequence(pixels)
    assert channel.out_dims == [80] and channel.num_maps == 1 and channel.num_visual_tokens == 9
    assert fused.shape == (1, 3, 3, 80)
    assert torch.equal(fused[..., :32], parts[0]) and torch.equal(fused[..., 32:], parts[1])


def test_visual_long_sequence_preprocess_and_input_checks():
    vls = VisualLongSequence(_two_encoder_config())
    pixels = vls.preprocess(three_stripes(50, 40))
    assert [tuple(p.shape) for p in pixels] == [(3, 28, 28), (3, 42, 42)]
    batch = [p.unsqueeze(0) for p in pixels]
    assert len(vls(batch)) == 2
    with pytest.raises(ValueError, match="2 pixel tensors"):
        vls(batch[:1])
    with pytest.raises(ValueError, match="2 pixel tensors"):
        vls(batch[0])
    with pytest.raises(ValueError, match="target_grid"):
        VisualLongSequence(_two_encoder_config(target_grid=[3]))
