"""Projectors from the visual grids to the LLM's embedding width, built by name."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from mambavlm.config import ProjectorConfig
from mambavlm.projector.mamba import MambaProjector, MambaProjectorLayer
from mambavlm.projector.mlp import LinearProjector, MLPProjector

__all__ = [
    "LinearProjector",
    "MLPProjector",
    "MambaProjector",
    "MambaProjectorLayer",
    "build_projector",
]


def build_projector(
    cfg: ProjectorConfig,
    in_dims: Sequence[int],
    out_dim: int,
    grid_size: tuple[int, int],
    num_maps: int,
) -> nn.Module:
    """Projector named by ``cfg.type``: forward([(B, h, w, C_m)] * num_maps) -> (B, M*h*w, out_dim)."""
    if cfg.type == "mamba":
        return MambaProjector(
            in_dims,
            out_dim,
            grid_size,
            num_maps,
            scan_mode=cfg.scan_mode,
            d_inner=cfg.d_inner,
            d_state=cfg.d_state,
            dt_rank=cfg.dt_rank,
            conv_kernel=cfg.conv_kernel,
            depth=cfg.depth,
            share_directions=cfg.share_directions,
        )
    if cfg.type == "mlp":
        return MLPProjector(in_dims, out_dim)
    if cfg.type == "linear":
        return LinearProjector(in_dims, out_dim)
    raise ValueError(f"unknown projector type {cfg.type!r}; choose mamba, mlp or linear")
