"""Every projector type from build_projector trains end to end; the MLP (LLaVA's mlp2x_gelu) and linear
projectors project each map on its own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambavlm.config import ProjectorConfig
from mambavlm.projector import LinearProjector, MLPProjector, build_projector
from tests.conftest import PROJECTOR_GRID, PROJECTOR_IN_DIMS, PROJECTOR_MAPS, projector_grids


H, W = PROJECTOR_GRID
M = PROJECTOR_MAPS
IN_DIMS = PROJECTOR_IN_DIMS


@pytest.mark.parametrize("kind", ["mamba", "mlp", "linear"])
def test_gradients_reach_every_parameter(kind: str) -> None:
    torch.manual_seed(0)
    cfg = ProjectorConfig(type=kind, d_inner=6, d_state=4, depth=2)
    proj = build_projector(cfg, IN_DIMS, 8, (H, W), M)
    out = proj(projector_grids(dtype=torch.float32))
    out.pow(2).mean().backward()
    for name, p in proj.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_mlp_projector_is_llava_mlp2x_gelu_per_map() -> None:
    torch.manual_seed(0)
    proj = MLPProjector(IN_DIMS, 8)
    grids = projector_grids(dtype=torch.float32)
    expected = torch.cat(
        [
            proj.output(F.gelu(g.flatten(1, 2) @ lin.weight.T + lin.bias))
            for lin, g in zip(proj.inputs, grids)
        ],
        dim=1,
    )
    torch.testing.assert_close(proj(grids), expected)
    lin = LinearProjector(IN_DIMS, 8)
    torch.testing.assert_close(lin(grids)[:, : H * W], lin.inputs[0](grids[0].flatten(1, 2)))
