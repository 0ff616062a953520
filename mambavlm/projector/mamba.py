"""The Mamba projector (MambaVLM Eq. 6-8).

For M patch grids of one common size h x w (the visual long sequence, L = M*h*w tokens):

    x, z = W1_m(G_m), W2_m(G_m)             per-map input projections to the SSM width d
    x    = SiLU(DWConv2d(x)) on each map     depthwise k x k conv, weights shared across maps
    S    = x[:, scan_orders]                 (B, K, L, d): ONE gather for all K directions
    Y_k  = SSM_k(S_k)                        selective scan (S6), all directions in one call
    Y    = sum_k Y_k[:, inverse_k]           back to patch order (one gather), summed
    out  = W3(LayerNorm(Y) * SiLU(z))        gate branch, W3 maps to the LLM width

Layers after the first (``depth > 1``) are pre-norm residual blocks of the same kind at the LLM width.
The K directions are folded into the channel axis so one selective-scan call (one kernel launch on
GPU) serves all of them; per-direction B/C use the scan's grouped form (G = K).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from mambavlm.ops.selective_scan import selective_scan
from mambavlm.scan import ScanMode, gather_scans, inverse_orders, merge_scans, scan_orders

__all__ = ["MambaProjector", "MambaProjectorLayer"]


class MambaProjectorLayer(nn.Module):
    """One cross-scan Mamba layer over ``num_maps`` grids of ``grid_size``.

    ``in_dims`` holds one input width per segment of the sequence: M entries (one W1/W2 per encoder)
    for the first layer, or a single entry when all tokens share one width.
    """

    def __init__(
        self,
        in_dims: Sequence[int],
        out_dim: int,
        grid_size: tuple[int, int],
        num_maps: int,
        scan_mode: ScanMode = "cross-stitch",
        d_inner: int = 256,
        d_state: int = 16,
        dt_rank: int | None = None,
        conv_kernel: int = 3,
        share_directions: bool = False,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
    ) -> None:
        super().__init__()
        if len(in_dims) not in (1, num_maps):
            raise ValueError(f"in_dims has {len(in_dims)} widths; expected 1 or num_maps={num_maps}")
        if conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd to keep the grid size, got {conv_kernel}")
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.num_maps = num_maps
        self.d_inner = d_inner
        self.d_state = d_state
        self.dt_rank = dt_rank or math.ceil(d_inner / 16)
        h, w = self.grid_size

        self.scan_mode = scan_mode
        target = torch.empty(0).device  # the device a surrounding `with torch.device(...)` sets
        orders, inverse = self._index_tensors()
        if target.type != "meta":  # index buffers stay real when the model is built on meta
            orders, inverse = orders.to(target), inverse.to(target)
        self.register_buffer("orders", orders, persistent=False)
        self.register_buffer("inverse", inverse, persistent=False)
        k = orders.shape[0]
        self.num_directions = k
        p = 1 if share_directions else k
        self.share_directions = share_directions

        self.in_proj = nn.ModuleList(nn.Linear(c, 2 * d_inner, bias=False) for c in in_dims)
        self.conv2d = nn.Conv2d(
            d_inner, d_inner, conv_kernel, padding=conv_kernel // 2, groups=d_inner, bias=True
        )
        self.x_proj_weight = nn.Parameter(torch.empty(p, self.dt_rank + 2 * d_state, d_inner))
        self.dt_proj_weight = nn.Parameter(torch.empty(p, d_inner, self.dt_rank))
        self.dt_proj_bias = nn.Parameter(torch.empty(p, d_inner))
        self.A_log = nn.Parameter(torch.empty(p, d_inner, d_state))
        self.D = nn.Parameter(torch.empty(p, d_inner))
        for param in (self.dt_proj_bias, self.A_log, self.D):
            param._no_weight_decay = True  # mamba_ssm's convention
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, out_dim, bias=False)
        self._dt_range = (dt_min, dt_max)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba's S6 initialisation: S4D-real A, dt ~ logUniform[dt_min, dt_max], D = 1."""
        if self.A_log.is_meta:
            return
        bound = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj_weight, -bound, bound)
        nn.init.uniform_(self.x_proj_weight, -self.d_inner**-0.5, self.d_inner**-0.5)
        dt_min, dt_max = self._dt_range
        dt = torch.exp(
            torch.rand_like(self.dt_proj_bias) * (math.log(dt_max) - math.log(dt_min))
            + math.log(dt_min)
        ).clamp(min=1e-4)
        self.dt_proj_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
        self.A_log.copy_(torch.log(a).expand_as(self.A_log))
        self.D.fill_(1.0)

    @property
    def seq_len(self) -> int:
        return self.num_maps * self.grid_size[0] * self.grid_size[1]

    def _direction_params(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Per-direction parameters expanded to K (views when shared)."""
        k = self.num_directions
        x_w = self.x_proj_weight.expand(k, -1, -1)
        dt_w = self.dt_proj_weight.expand(k, -1, -1)
        dt_b = self.dt_proj_bias.expand(k, -1).reshape(-1)
        a = -torch.exp(self.A_log.float()).expand(k, -1, -1).reshape(k * self.d_inner, -1)
        d = self.D.float().expand(k, -1).reshape(-1)
        return x_w, dt_w, dt_b, a, d

    def _index_tensors(self) -> tuple[Tensor, Tensor]:
        """The scan orders (K, L) and their inverses, computed on the CPU."""
        with torch.device("cpu"):
            orders = scan_orders(*self.grid_size, self.num_maps, self.scan_mode)
            return orders, inverse_orders(orders)

    def reset_index_buffers(self) -> None:
        """Recompute ``orders`` and ``inverse`` in place: they are not saved (they follow from the
        config), so a model materialised from meta tensors (transformers' ``from_pretrained``) holds
        uninitialised memory in them until this runs (``MambaVLM._init_weights`` calls it)."""
        orders, inverse = self._index_tensors()
        self.orders.copy_(orders)
        self.inverse.copy_(inverse)

    def forward(self, segments: Sequence[Tensor]) -> Tensor:
        """segments: one (B, L_s, C_s) tensor per ``in_dims`` entry, together (B, L, *) -> (B, L, out_dim)."""
        if len(segments) != len(self.in_proj):
            raise ValueError(f"expected {len(self.in_proj)} input segments, got {len(segments)}")
        xz = torch.cat([proj(s) for proj, s in zip(self.in_proj, segments)], dim=1)
        if xz.shape[1] != self.seq_len:
            raise ValueError(
                f"visual sequence has {xz.shape[1]} tokens; this projector expects "
                f"{self.num_maps} maps of {self.grid_size[0]}x{self.grid_size[1]} = {self.seq_len}"
            )
        x, z = xz.chunk(2, dim=-1)
        h, w = self.grid_size
        x = rearrange(x, "b (m h w) d -> (b m) d h w", m=self.num_maps, h=h, w=w)
        x = F.silu(self.conv2d(x))
        x = rearrange(x, "(b m) d h w -> b (m h w) d", m=self.num_maps)

        y = self._scan(x)
        y = self.out_norm(y) * F.silu(z)
        return self.out_proj(y)

    def _scan(self, x: Tensor) -> Tensor:
        """x (B, L, d) in patch order -> sum over directions of the scanned SSM outputs (B, L, d)."""
        k, n = self.num_directions, self.d_state
        x_w, dt_w, dt_b, a, d = self._direction_params()
        xs = gather_scans(x, self.orders)  # (B, K, L, d)
        x_dbl = torch.einsum("bkld,kcd->bklc", xs, x_w)
        dt, b_ssm, c_ssm = x_dbl.split([self.dt_rank, n, n], dim=-1)
        dt = torch.einsum("bklr,kdr->bkdl", dt, dt_w)
        u = rearrange(xs, "b k l d -> b (k d) l")
        y = selective_scan(
            u.contiguous(),
            rearrange(dt, "b k d l -> b (k d) l").contiguous(),
            a,
            rearrange(b_ssm, "b k l n -> b k n l").contiguous(),
            rearrange(c_ssm, "b k l n -> b k n l").contiguous(),
            D=d,
            delta_bias=dt_b.float(),
            delta_softplus=True,
        )
        y = rearrange(y, "b (k d) l -> b k l d", k=k)
        return merge_scans(y, self.inverse).to(x.dtype)


class MambaProjector(nn.Module):
    """Visual grids [(B, h, w, C_m)] -> visual tokens (B, M*h*w, out_dim), map-major order."""

    def __init__(
        self,
        in_dims: Sequence[int],
        out_dim: int,
        grid_size: tuple[int, int],
        num_maps: int,
        scan_mode: ScanMode = "cross-stitch",
        d_inner: int | None = None,
        d_state: int = 16,
        dt_rank: int | None = None,
        conv_kernel: int = 3,
        depth: int = 1,
        share_directions: bool = False,
    ) -> None:
        super().__init__()
        d_inner = d_inner or out_dim
        common = dict(
            grid_size=grid_size,
            num_maps=num_maps,
            scan_mode=scan_mode,
            d_inner=d_inner,
            d_state=d_state,
            dt_rank=dt_rank,
            conv_kernel=conv_kernel,
            share_directions=share_directions,
        )
        self.first = MambaProjectorLayer(in_dims, out_dim, **common)
        self.blocks = nn.ModuleList(
            MambaProjectorLayer([out_dim], out_dim, **common) for _ in range(depth - 1)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(out_dim) for _ in range(depth - 1))

    def forward(self, grids: Sequence[Tensor]) -> Tensor:
        segments = [g.flatten(1, 2) for g in grids]
        if len(self.first.in_proj) == 1 and len(segments) > 1:
            segments = [torch.cat(segments, dim=1)]
        x = self.first(segments)
        for norm, block in zip(self.norms, self.blocks):
            x = x + block([norm(x)])
        return x
