"""The Mamba projector against a direction-by-direction reference, shared directions, scan modes and
depth, a single fused map, and (on CUDA) the mamba_ssm kernel path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambavlm.ops.selective_scan import selective_scan_naive
from mambavlm.projector import MambaProjector, MLPProjector
from mambavlm.scan import scan_orders
from tests.conftest import PROJECTOR_GRID, PROJECTOR_IN_DIMS, PROJECTOR_MAPS, projector_grids


H, W = PROJECTOR_GRID
M = PROJECTOR_MAPS
IN_DIMS = PROJECTOR_IN_DIMS


def reference_layer(layer, segments: list[torch.Tensor]) -> torch.Tensor:
    """Eq. 6-8 written out per direction with python index lists and the per-token recurrence."""
    xz = torch.cat([proj(s) for proj, s in zip(layer.in_proj, segments)], dim=1)
    x, z = xz.chunk(2, dim=-1)
    b, length, d = x.shape
    maps = [x[:, m * H * W : (m + 1) * H * W].reshape(b, H, W, d) for m in range(M)]
    conv = [F.silu(layer.conv2d(g.permute(0, 3, 1, 2))).permute(0, 2, 3, 1) for g in maps]
    x = torch.cat([g.reshape(b, H * W, d) for g in conv], dim=1)
    orders = scan_orders(H, W, M, "cross-stitch").tolist()
    total = torch.zeros_like(x)
    for k, order in enumerate(orders):
        p = 0 if layer.share_directions else k
        xs = x[:, order]  # (B, L, d)
        dbl = xs @ layer.x_proj_weight[p].T
        dt, bm, cm = dbl.split([layer.dt_rank, layer.d_state, layer.d_state], dim=-1)
        dt = dt @ layer.dt_proj_weight[p].T
        y = selective_scan_naive(
            xs.transpose(1, 2),
            dt.transpose(1, 2),
            -torch.exp(layer.A_log[p]),
            bm.transpose(1, 2),
            cm.transpose(1, 2),
            D=layer.D[p],
            delta_bias=layer.dt_proj_bias[p],
            delta_softplus=True,
        ).transpose(1, 2)
        for step, token in enumerate(order):
            total[:, token] += y[:, step]
    y = layer.out_norm(total) * F.silu(z)
    return layer.out_proj(y)


@pytest.mark.parametrize("share", [False, True])
def test_mamba_layer_matches_direction_by_direction_reference(share: bool) -> None:
    torch.manual_seed(0)
    proj = MambaProjector(IN_DIMS, 11, (H, W), M, d_inner=6, d_state=4, share_directions=share)
    proj = proj.double()
    with torch.no_grad():  # make the per-direction parameters differ
        proj.first.x_proj_weight.add_(0.3 * torch.randn_like(proj.first.x_proj_weight))
        proj.first.A_log.add_(0.1 * torch.randn_like(proj.first.A_log))
    grids = projector_grids()
    out = proj(grids)
    expected = reference_layer(proj.first, [g.flatten(1, 2) for g in grids])
    assert out.shape == (2, M * H * W, 11)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)


def test_shared_directions_have_one_parameter_set() -> None:
    per_dir = MambaProjector(IN_DIMS, 8, (H, W), M, d_inner=6, d_state=4)
    shared = MambaProjector(IN_DIMS, 8, (H, W), M, d_inner=6, d_state=4, share_directions=True)
    assert per_dir.first.A_log.shape[0] == 4 and shared.first.A_log.shape[0] == 1
    n_dir = sum(p.numel() for n, p in per_dir.named_parameters() if "proj_weight" in n or "A_log" in n)
    n_shared = sum(p.numel() for n, p in shared.named_parameters() if "proj_weight" in n or "A_log" in n)
    assert n_dir == 4 * n_shared


def test_scan_modes_give_different_outputs_and_depth_adds_residual_blocks() -> None:
    torch.manual_seed(0)
    stitch = MambaProjector(IN_DIMS, 8, (H, W), M, scan_mode="cross-stitch", d_inner=6)
    cat = MambaProjector(IN_DIMS, 8, (H, W), M, scan_mode="cross-cat", d_inner=6)
    cat.load_state_dict(stitch.state_dict())
    grids = projector_grids(dtype=torch.float32)
    assert not torch.allclose(stitch(grids), cat(grids))
    one_d = MambaProjector(IN_DIMS, 8, (H, W), M, scan_mode="1d", d_inner=6)
    assert one_d.first.A_log.shape[0] == 1
    deep = MambaProjector(IN_DIMS, 8, (H, W), M, d_inner=6, depth=3)
    assert len(deep.blocks) == 2 and deep(grids).shape == (2, M * H * W, 8)


def test_channel_fusion_single_map_and_wrong_sequence_length() -> None:
    proj = MambaProjector([12], 8, (H, W), 1, d_inner=6)
    assert proj([torch.randn(1, H, W, 12)]).shape == (1, H * W, 8)
    with pytest.raises(ValueError, match="expects 1 maps of 2x3"):
        proj([torch.randn(1, H + 1, W, 12)])
    with pytest.raises(ValueError, match="expected 2 grids"):
        MLPProjector(IN_DIMS, 8)([torch.randn(1, H, W, 5)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mamba_projector_kernel_path_matches_torch_path_on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Paper shape (2 maps of 27x27 = 1458 tokens): mamba_ssm kernel vs the PyTorch scan, fwd + bwd."""
    from mambavlm.ops.dispatch import kernels_available

    if not kernels_available()["mamba_ssm"]:
        pytest.skip("mamba_ssm not installed")
    torch.manual_seed(0)
    proj = MambaProjector([64, 96], 128, (27, 27), 2, d_inner=128, d_state=16).cuda()
    grids = [torch.randn(2, 27, 27, c, device="cuda", requires_grad=True) for c in (64, 96)]

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        proj.zero_grad()
        for g in grids:
            g.grad = None
        out = proj(grids)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in proj.parameters()] + [g.grad.clone() for g in grids]

    out_kernel, grads_kernel = run()
    monkeypatch.setenv("MAMBAVLM_DISABLE_KERNELS", "1")
    out_torch, grads_torch = run()
    scale = out_torch.abs().max()
    assert (out_kernel - out_torch).abs().max() <= 1e-4 * scale
    for gk, gt in zip(grads_kernel, grads_torch):
        assert (gk - gt).abs().max() <= 1e-3 * gt.abs().max().clamp(min=1e-12)
