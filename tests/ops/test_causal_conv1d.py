"""Causal depthwise conv1d (full, state, one-token update) against a tap-by-tap loop; the causal_conv1d
kernels against the PyTorch path."""

from __future__ import annotations

import pytest
import torch

from mambavlm.ops.causal_conv1d import causal_conv1d, causal_conv1d_state, causal_conv1d_update
from mambavlm.ops.dispatch import DISABLE_KERNELS_ENV, use_kernels
from tests.conftest import needs_causal_conv1d, needs_cuda, relative_close


def conv_by_taps(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None):
    """Causal depthwise conv written out tap by tap: tap k multiplies the input W - 1 - k steps back."""
    length, width = x.shape[-1], weight.shape[1]
    out = torch.zeros_like(x)
    for k in range(width):
        lag = width - 1 - k
        if lag < length:
            out[..., lag:] += weight[:, k, None] * x[..., : length - lag]
    if bias is not None:
        out = out + bias[:, None]
    return torch.nn.functional.silu(out) if activation == "silu" else out


@pytest.mark.parametrize("width", [1, 3, 4, 6])
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv1d_matches_tap_loop(width, use_bias, activation):
    gen = torch.Generator().manual_seed(width)
    x = torch.randn(2, 5, 11, generator=gen, dtype=torch.float64)
    weight = torch.randn(5, width, generator=gen, dtype=torch.float64)
    bias = torch.randn(5, generator=gen, dtype=torch.float64) if use_bias else None
    torch.testing.assert_close(causal_conv1d(x, weight, bias, activation), conv_by_taps(x, weight, bias, activation))
    short = x[..., :2]  # shorter than the kernel
    torch.testing.assert_close(
        causal_conv1d(short, weight, bias, activation), conv_by_taps(short, weight, bias, activation)
    )


@pytest.mark.parametrize("prefix", [0, 2, 7])
def test_causal_conv1d_update_continues_a_prefill(prefix):
    gen = torch.Generator().manual_seed(prefix)
    width, length = 4, 12
    x = torch.randn(2, 3, length, generator=gen, dtype=torch.float64)
    weight = torch.randn(3, width, generator=gen, dtype=torch.float64)
    bias = torch.randn(3, generator=gen, dtype=torch.float64)
    full = causal_conv1d(x, weight, bias, "silu")
    state = causal_conv1d_state(x[..., :prefix], width)
    steps = [causal_conv1d_update(x[..., t], state, weight, bias, "silu") for t in range(prefix, length)]
    torch.testing.assert_close(torch.stack(steps, dim=-1), full[..., prefix:])
    torch.testing.assert_close(state, x[..., -width:])  # updated in place to the last W inputs


def test_causal_conv1d_state_pads_short_prefill_with_zeros():
    x = torch.tensor([[[1.0, 2.0]]])
    torch.testing.assert_close(causal_conv1d_state(x, 4), torch.tensor([[[0.0, 0.0, 1.0, 2.0]]]))
    torch.testing.assert_close(causal_conv1d_state(torch.arange(6.0).view(1, 1, 6), 3), torch.tensor([[[3.0, 4, 5]]]))


def test_causal_conv1d_rejects_bad_inputs_by_name():
    x = torch.zeros(1, 3, 5)
    with pytest.raises(ValueError, match="weight must be"):
        causal_conv1d(x, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="activation must be"):
        causal_conv1d(x, torch.zeros(3, 2), activation="gelu")
    with pytest.raises(ValueError, match="conv_state must be"):
        causal_conv1d_update(x[..., 0], torch.zeros(1, 3, 3), torch.zeros(3, 2))


@pytest.mark.gpu
@needs_cuda
@needs_causal_conv1d
def test_causal_conv1d_kernels_match_torch(monkeypatch):
    """Kernel vs F.conv1d path in float32 at (2, 64, 1458), W = 4; rtol 1e-5 fwd/update, 1e-4 grads."""
    monkeypatch.delenv(DISABLE_KERNELS_ENV, raising=False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 1458, generator=gen).cuda()
    weight = torch.randn(64, 4, generator=gen).cuda()
    bias = torch.randn(64, generator=gen).cuda()
    out_weight = torch.randn(2, 64, 1458, generator=gen).cuda()
    assert use_kernels(x, "causal_conv1d")

    def run(conv) -> tuple[torch.Tensor, list[torch.Tensor]]:
        leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
        out = conv(*leaves)
        (out * out_weight).sum().backward()
        return out.detach(), [t.grad for t in leaves]

    def torch_conv(x, weight, bias):
        monkeypatch.setenv(DISABLE_KERNELS_ENV, "1")
        try:
            return causal_conv1d(x, weight, bias, "silu")
        finally:
            monkeypatch.delenv(DISABLE_KERNELS_ENV)

    out, grads = run(lambda *a: causal_conv1d(*a, "silu"))
    ref_out, ref_grads = run(torch_conv)
    relative_close(out, ref_out, 1e-5, "output")
    for name, got, want in zip(("x", "weight", "bias"), grads, ref_grads):
        relative_close(got, want, 1e-4, f"grad of {name}")

    state = causal_conv1d_state(x[..., :1000], 4)
    ref_state = state.clone()
    for t in range(1000, 1010):
        y = causal_conv1d_update(x[..., t], state, weight, bias, "silu")
        monkeypatch.setenv(DISABLE_KERNELS_ENV, "1")
        ref_y = causal_conv1d_update(x[..., t], ref_state, weight, bias, "silu")
        monkeypatch.delenv(DISABLE_KERNELS_ENV)
        relative_close(y, ref_y, 1e-5, f"update at {t}")
        torch.testing.assert_close(state, ref_state, rtol=0, atol=0)
    relative_close(y, ref_out[..., 1009], 1e-5, "update vs full conv")


def test_conv_kernel_layout_copies_only_what_the_kernel_rejects() -> None:
    from mambavlm.ops.causal_conv1d import _kernel_layout

    contiguous = torch.randn(2, 6, 5)
    assert _kernel_layout(contiguous) is contiguous
    aligned = torch.randn(2, 5, 16).transpose(1, 2)  # channel-last, strides 80 and 16
    assert _kernel_layout(aligned) is aligned
    odd = torch.randn(2, 5, 196)[..., :6].transpose(1, 2)  # channel-last slice, sequence stride 196
    fixed = _kernel_layout(odd)
    assert fixed.stride(2) == 1 and torch.equal(fixed, odd)
