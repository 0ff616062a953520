"""The visual long sequence: encoders' grids resampled to one target grid, sequence and channel fusion
(tiny random encoders; the paper's on the meta device)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

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


GEOMETRY_ENCODERS = [  # different pixel sizes and patch sizes, the same 4 x 4 grid
    {"name": "timm:vit_small_patch14_reg4_dinov2", "image_size": 32,
     "kwargs": {"patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}},
    {"name": "timm:vit_base_patch16_siglip_224", "image_size": 48,
     "kwargs": {"patch_size": 12, "depth": 2, "embed_dim": 48, "num_heads": 3}},
]


def marked_cells(pixels: torch.Tensor, mean: tuple, std: tuple, grid: tuple[int, int]) -> set[tuple[int, int]]:
    """Patch cells (row, col) more than half covered by the red mark, from a normalised (3, S, S) tensor."""
    rgb = pixels * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    red = (rgb[0] > 0.7) & (rgb[1] < 0.3) & (rgb[2] < 0.3)
    rows, cols = grid
    cells = red.float().unflatten(0, (rows, -1)).unflatten(2, (cols, -1)).mean(dim=(1, 3))
    return {(r, c) for r in range(rows) for c in range(cols) if cells[r, c] > 0.5}


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("resize-naive", {(0, 2), (1, 2)}),  # x in [1/2, 3/4), y in [0, 1/2) of the squashed square
        ("resize-crop", {(0, 2), (0, 3), (1, 2), (1, 3)}),  # the centre crop keeps x in [1/4, 3/4)
        ("letterbox", {(1, 2)}),  # 24 rows of padding above: y in [1/4, 1/2)
    ],
)
def test_every_encoder_sees_the_mark_in_the_same_patch_cells(strategy: str, expected: set) -> None:
    """A 96 x 48 image with a red mark at x in [48, 72), y in [0, 24): in each strategy the mark lands in
    the same cells of every encoder's grid, the cells worked out by hand."""
    image = Image.new("RGB", (96, 48), (128, 128, 128))
    image.paste((255, 0, 0), (48, 0, 72, 24))
    vls = VisualLongSequence(VisionConfig(encoders=GEOMETRY_ENCODERS, image_resize_strategy=strategy))
    assert [e.grid_size for e in vls.encoders] == [(4, 4), (4, 4)]
    for encoder, pixels in zip(vls.encoders, vls.preprocess(image)):
        pre = encoder.preprocess
        assert marked_cells(pixels, pre.mean, pre.std, encoder.grid_size) == expected, pre
    fills = {e.preprocess.letterbox_fill for e in vls.encoders}
    assert len(fills) == 1  # one pad colour: the first encoder's mean


def test_the_default_geometry_is_cobras_resize_naive() -> None:
    assert VisionConfig(encoders=GEOMETRY_ENCODERS).image_resize_strategy == "resize-naive"
