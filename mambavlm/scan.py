"""Scan orders of the Mamba projector over a visual long sequence of M patch maps.

A visual long sequence concatenates M maps of h x w patch tokens along the sequence axis, each map
row-major, so token (map m, row r, column c) has index ``m*h*w + r*w + c`` (L = M*h*w tokens).
A scan order is a row of indices into that sequence: entry i is the token visited at step i.

Spatial directions follow VMamba's cross-scan on one h x w map: 0 row-major (r outer, c inner),
1 column-major (c outer, r inner), 2 reverse of 0, 3 reverse of 1. They combine with the maps as:

- ``"cross-cat"``: all of map 0 in direction k, then all of map 1 in direction k, ...
- ``"cross-stitch"``: at each step of direction k's spatial order, that position in map 0, map 1,
  ..., map M-1 (a1 b1 a2 b2 ...), as in MambaVLM Fig. 3.
- ``"1d"``: one direction, the sequence order itself.

Example, h=2, w=3, M=2 (map 0 holds indices 0..5 as rows ``0 1 2`` / ``3 4 5``, map 1 holds 6..11),
direction 1 (column-major, spatial order 0 3 1 4 2 5)::

    cross-cat     0 3 1 4 2 5 6 9 7 10 8 11
    cross-stitch  0 6 3 9 1 7 4 10 2 8 5 11

Every row is a permutation of 0..L-1, so a scan is one gather and its undoing is one gather with the
inverse permutation (:func:`gather_scans`, :func:`merge_scans`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import torch
from torch import Tensor

ScanMode = Literal["cross-stitch", "cross-cat", "1d"]

CROSS_SCAN_DIRECTIONS: tuple[str, ...] = (
    "row-major",
    "column-major",
    "row-major reversed",
    "column-major reversed",
)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_mode(mode: object) -> None:
    if mode not in get_args(ScanMode):
        raise ValueError(f"mode must be one of {get_args(ScanMode)}, got {mode!r}")


def cross_scan_positions(h: int, w: int) -> Tensor:
    """VMamba's four spatial orders of one h x w map, positions numbered row-major: (4, h*w)."""
    grid = torch.arange(h * w).view(h, w)
    row_major = grid.flatten()
    column_major = grid.t().flatten()
    return torch.stack([row_major, column_major, row_major.flip(0), column_major.flip(0)])


def scan_orders(h: int, w: int, num_maps: int = 1, mode: ScanMode = "cross-stitch") -> Tensor:
    """Token index visited at each step of each direction: long (K, num_maps*h*w).

    K = 4 for ``"cross-stitch"`` and ``"cross-cat"``, K = 1 for ``"1d"`` (the identity).
    """
    _check_positive_int("h", h)
    _check_positive_int("w", w)
    _check_positive_int("num_maps", num_maps)
    _check_mode(mode)
    length = num_maps * h * w
    if mode == "1d":
        return torch.arange(length).unsqueeze(0)
    positions = cross_scan_positions(h, w)
    map_offsets = torch.arange(num_maps) * (h * w)
    if mode == "cross-cat":
        orders = positions[:, None, :] + map_offsets[None, :, None]
    else:
        orders = positions[:, :, None] + map_offsets[None, None, :]
    return orders.reshape(positions.shape[0], length)


def _check_orders(orders: Tensor) -> None:
    if orders.dim() != 2:
        raise ValueError(f"orders must have shape (K, L), got {tuple(orders.shape)}")
    if orders.dtype not in (torch.long, torch.int32):
        raise ValueError(f"orders must be an integer index tensor, got dtype {orders.dtype}")


def inverse_orders(orders: Tensor) -> Tensor:
    """Inverse permutations: (K, L) -> (K, L) with ``inv[k, orders[k, i]] = i``."""
    _check_orders(orders)
    identity = torch.arange(orders.shape[1], device=orders.device)
    if not torch.equal(orders.sort(dim=1).values, identity.expand_as(orders).to(orders.dtype)):
        raise ValueError("every row of orders must be a permutation of 0..L-1")
    inverse = torch.empty_like(orders, dtype=torch.long)
    return inverse.scatter_(1, orders.long(), identity.expand(orders.shape).contiguous())


def gather_scans(x: Tensor, orders: Tensor) -> Tensor:
    """Tokens in each scan order with one index op: x (B, L, D), orders (K, L) -> (B, K, L, D)."""
    _check_orders(orders)
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B, L, D), got {tuple(x.shape)}")
    if x.shape[1] != orders.shape[1]:
        raise ValueError(f"x has {x.shape[1]} tokens but orders cover {orders.shape[1]}")
    batch, length, dim = x.shape
    return x.index_select(1, orders.reshape(-1)).view(batch, orders.shape[0], length, dim)


def merge_scans(y: Tensor, inverse: Tensor) -> Tensor:
    """Each direction back in token order, summed over directions: y (B, K, L, D) -> (B, L, D).

    ``inverse`` is :func:`inverse_orders` of the orders that produced ``y``: (K, L).
    """
    _check_orders(inverse)
    if y.dim() != 4:
        raise ValueError(f"y must have shape (B, K, L, D), got {tuple(y.shape)}")
    if tuple(y.shape[1:3]) != tuple(inverse.shape):
        raise ValueError(
            f"y has (K, L) = {tuple(y.shape[1:3])} but inverse has {tuple(inverse.shape)}"
        )
    return torch.take_along_dim(y, inverse.long()[None, :, :, None], dim=2).sum(dim=1)


def plot_scan_orders(h: int, w: int, num_maps: int, mode: ScanMode, path: str | Path) -> Path:
    """Draw each direction's path over the maps (side by side) and save it as a PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    orders = scan_orders(h, w, num_maps, mode)
    num_directions, length = orders.shape
    names = CROSS_SCAN_DIRECTIONS if mode != "1d" else ("sequence order",)
    map_pitch = w + 1
    tokens = orders.numpy()
    map_index, position = tokens // (h * w), tokens % (h * w)
    centre_x = map_index * map_pitch + position % w + 0.5
    centre_y = position // w + 0.5
    steps = torch.arange(length).numpy()
    norm = Normalize(vmin=0, vmax=max(length - 1, 1))
    cmap = "viridis"
    columns = min(num_directions, 2)
    rows = -(-num_directions // columns)
    cell_inches = min(0.7, 12.0 / (num_maps * map_pitch), 8.0 / h)
    fontsize = 9.0 * cell_inches / 0.7
    panel_width = cell_inches * num_maps * map_pitch + 0.6
    panel_height = cell_inches * h + 0.9
    figsize = (panel_width * columns + 1.2, panel_height * rows)
    figure = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for ax in axes[num_directions:]:
        ax.set_axis_off()
    for k, ax in enumerate(axes[:num_directions]):
        for m in range(num_maps):
            for r in range(h):
                for c in range(w):
                    cell = Rectangle((m * map_pitch + c, r), 1, 1, fill=False, lw=0.6, color="0.6")
                    ax.add_patch(cell)
        x, y = centre_x[k], centre_y[k]
        ax.quiver(
            x[:-1], y[:-1], x[1:] - x[:-1], y[1:] - y[:-1], steps[:-1],
            cmap=cmap, norm=norm, angles="xy", scale_units="xy", scale=1,
            units="inches", width=0.025 * cell_inches, headwidth=4, headlength=5,
            headaxislength=4.5, zorder=2,
        )
        ax.scatter(x[:1], y[:1], s=30, c=steps[:1], cmap=cmap, norm=norm, marker="o", zorder=3)
        for step in range(length):
            ax.text(
                x[step] - 0.45, y[step] - 0.45, str(step), ha="left", va="top",
                fontsize=fontsize, zorder=4,
            )
        ax.set_xlim(-0.1, num_maps * map_pitch - 0.9)
        ax.set_ylim(h + 0.1, -0.1)
        ax.set_aspect("equal")
        ax.set_xticks([m * map_pitch + w / 2 for m in range(num_maps)])
        ax.set_xticklabels([f"map {m}" for m in range(num_maps)])
        ax.set_yticks([])
        ax.set_title(f"{mode}, direction {k}: {names[k]}", fontsize=9)
    colour_scale = ScalarMappable(norm=norm, cmap=cmap)
    figure.colorbar(colour_scale, ax=list(axes[:num_directions]), label="step", shrink=0.8)
    path = Path(path)
    figure.savefig(path, format="png", dpi=120)
    return path
