"""The block boundary (residual add + RMSNorm): the PyTorch path equals transformers' own blocks
computed end to end, and (on CUDA) mamba_ssm's fused kernel equals the PyTorch path."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from transformers import MambaConfig
from transformers.models.mamba.modeling_mamba import MambaBlock

from mambavlm.ops.dispatch import DISABLE_KERNELS_ENV
from mambavlm.ops.norm import add_rms_norm
from tests.conftest import needs_cuda, needs_mamba_ssm


class ScaledTanh(nn.Module):
    """A stand-in mixer with MambaMixer's call signature: a fixed nonlinear map of its input, of gain
    about one (so bf16 rounding differences are neither hidden nor amplified along the blocks)."""

    def __init__(self, dim: int, seed: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed)) / dim**0.5)

    def forward(self, hidden_states: Tensor, **_: object) -> Tensor:
        return 3.0 * torch.tanh(self.proj(hidden_states))


def mamba_blocks(dtype: torch.dtype, residual_in_fp32: bool, device: str = "cpu") -> list[MambaBlock]:
    config = MambaConfig(hidden_size=64, residual_in_fp32=residual_in_fp32, layer_norm_epsilon=1e-5)
    blocks = []
    for index in range(3):
        block = MambaBlock(config, layer_idx=index)
        block.mixer = ScaledTanh(64, seed=index)
        with torch.no_grad():
            block.norm.weight.copy_(torch.rand(64, generator=torch.Generator().manual_seed(10 + index)) + 0.5)
        blocks.append(block.to(device, dtype))
    return blocks


def through_boundaries(blocks: list[MambaBlock], x: Tensor, residual_in_fp32: bool, fused: bool = False) -> Tensor:
    """The same blocks as add_rms_norm at each boundary + the mixers, ending with the last add."""
    hidden, residual = x, None
    for block in blocks:
        normed, residual = add_rms_norm(block.norm, hidden, residual, residual_in_fp32, fused)
        hidden = block.mixer(normed)
    return residual + hidden


@pytest.mark.parametrize("residual_in_fp32", [True, False], ids=["fp32-residual", "model-dtype-residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_boundaries_equal_transformers_mamba_blocks(dtype: torch.dtype, residual_in_fp32: bool) -> None:
    """Three transformers MambaBlocks (norm -> mixer -> + residual, residual cast as configured) and
    the same blocks rebuilt from add_rms_norm: the same numbers, bit for bit, and the same dtype."""
    blocks = mamba_blocks(dtype, residual_in_fp32)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        want = x
        for block in blocks:
            want = block(want)
        got = through_boundaries(blocks, x, residual_in_fp32)
    assert got.dtype == want.dtype == (torch.float32 if residual_in_fp32 else dtype)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.gpu
@needs_cuda
@needs_mamba_ssm
@pytest.mark.parametrize("residual_in_fp32", [True, False], ids=["fp32-residual", "model-dtype-residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_kernel_equals_pytorch_path(dtype: torch.dtype, residual_in_fp32: bool, monkeypatch) -> None:
    """mamba_ssm's fused add + RMSNorm against the PyTorch path on CUDA, one boundary and three
    blocks: float32 within float32 rounding; bf16 within bf16 rounding (the kernel normalises the
    float32 residual before rounding, transformers after)."""
    torch.manual_seed(0)
    x = torch.randn(3, 7, 64, device="cuda").to(dtype)
    residual = torch.randn(3, 7, 64, device="cuda").to(torch.float32 if residual_in_fp32 else dtype)
    blocks = mamba_blocks(dtype, residual_in_fp32, "cuda")
    with torch.no_grad():
        fused = add_rms_norm(blocks[0].norm, x, residual, residual_in_fp32, fused=True)
        fused_out = through_boundaries(blocks, x, residual_in_fp32, fused=True)
        monkeypatch.setenv(DISABLE_KERNELS_ENV, "1")
        plain = add_rms_norm(blocks[0].norm, x, residual, residual_in_fp32, fused=True)
        plain_out = through_boundaries(blocks, x, residual_in_fp32, fused=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip(fused, plain, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(fused[1], plain[1], rtol=0, atol=0)  # the sum itself is the same add
    torch.testing.assert_close(fused_out, plain_out, rtol=tol, atol=tol * float(plain_out.abs().max()))
