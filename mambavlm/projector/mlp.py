"""LLaVA-style projectors: ``mlp`` (mlp2x_gelu) and ``linear``, one input layer per map width."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["MLPProjector", "LinearProjector"]


class _PerMapProjector(nn.Module):
    """Projects each map with its own first layer, then concatenates along the sequence."""

    def __init__(self, in_dims: Sequence[int], out_dim: int) -> None:
        super().__init__()
        self.inputs = nn.ModuleList(nn.Linear(c, out_dim) for c in in_dims)

    def _project_maps(self, grids: Sequence[Tensor]) -> Tensor:
        if len(grids) != len(self.inputs):
            raise ValueError(f"expected {len(self.inputs)} grids, got {len(grids)}")
        return torch.cat([proj(g.flatten(1, 2)) for proj, g in zip(self.inputs, grids)], dim=1)


class LinearProjector(_PerMapProjector):
    """[(B, h, w, C_m)] -> (B, M*h*w, out_dim) with one linear map per grid."""

    def forward(self, grids: Sequence[Tensor]) -> Tensor:
        return self._project_maps(grids)


class MLPProjector(_PerMapProjector):
    """LLaVA-1.5's mlp2x_gelu: Linear(C_m, D) -> GELU -> Linear(D, D); the second layer is shared."""

    def __init__(self, in_dims: Sequence[int], out_dim: int) -> None:
        super().__init__(in_dims, out_dim)
        self.act = nn.GELU()
        self.output = nn.Linear(out_dim, out_dim)

    def forward(self, grids: Sequence[Tensor]) -> Tensor:
        return self.output(self.act(self._project_maps(grids)))
