"""The chunked selective scan against an independent per-token reference, and the mamba_ssm kernel against it."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from mambavlm.ops.dispatch import DISABLE_KERNELS_ENV, use_kernels
from mambavlm.ops.selective_scan import CHUNK_SIZE, selective_scan, selective_scan_naive, selective_scan_torch
from tests.conftest import needs_cuda, needs_mamba_ssm, relative_close


SCAN_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
BC_LAYOUTS = ("ungrouped", "groups1", "groups2")  # B, C as (Bt, N, L), (Bt, 1, N, L), (Bt, 2, N, L)


def scan_inputs(
    batch: int,
    dim: int,
    length: int,
    n_state: int,
    layout: str,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random scan inputs in Mamba's ranges: A < 0, small positive steps, B/C in the given layout."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    bc_shape = {"ungrouped": (batch, n_state, length), "groups1": (batch, 1, n_state, length)}
    bc_shape["groups2"] = (batch, 2, n_state, length)
    return {
        "u": rand(batch, dim, length),
        "delta": 0.5 * rand(batch, dim, length).abs(),
        "A": -torch.exp(0.5 * rand(dim, n_state)),
        "B": rand(*bc_shape[layout]),
        "C": rand(*bc_shape[layout]),
        "D": rand(dim),
        "z": rand(batch, dim, length),
        "delta_bias": 0.3 * rand(dim),
    }


def pick(inputs: dict[str, torch.Tensor], use_D: bool, use_z: bool, use_bias: bool) -> dict[str, torch.Tensor | None]:
    """The scan's tensor arguments with the optional ones switched off as asked."""
    return {
        **inputs,
        "D": inputs["D"] if use_D else None,
        "z": inputs["z"] if use_z else None,
        "delta_bias": inputs["delta_bias"] if use_bias else None,
    }


@pytest.mark.parametrize(
    "use_D,use_z,use_bias,softplus,last_state,layout",
    list(itertools.product([False, True], [False, True], [False, True], [False, True], [False, True], BC_LAYOUTS)),
)
def test_selective_scan_torch_matches_naive_for_every_option(use_D, use_z, use_bias, softplus, last_state, layout):
    length = CHUNK_SIZE + 13  # two chunks, the second one partial
    args = pick(scan_inputs(2, 4, length, 3, layout), use_D, use_z, use_bias)
    got = selective_scan_torch(**args, delta_softplus=softplus, return_last_state=last_state)
    want = selective_scan_naive(**args, delta_softplus=softplus, return_last_state=last_state)
    if last_state:
        assert got[1].shape == (2, 4, 3) and got[1].dtype == torch.float64
        torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-10)
        got, want = got[0], want[0]
    assert got.shape == (2, 4, length) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("length", [1, 5, CHUNK_SIZE, 3 * CHUNK_SIZE + 1])
def test_selective_scan_torch_matches_naive_at_chunk_boundaries(length):
    args = scan_inputs(1, 4, length, 2, "groups2", seed=length)
    got, got_state = selective_scan_torch(**args, delta_softplus=True, return_last_state=True)
    want, want_state = selective_scan_naive(**args, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_state, want_state, rtol=1e-10, atol=1e-10)


def test_selective_scan_torch_matches_naive_on_visual_long_sequence():
    """L = 1458 = 2 x 27 x 27, the paper's visual long sequence, with small Dm and N."""
    args = scan_inputs(1, 4, 1458, 3, "groups2", seed=1)
    got, got_state = selective_scan_torch(**args, delta_softplus=True, return_last_state=True)
    want, want_state = selective_scan_naive(**args, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got_state, want_state, rtol=1e-9, atol=1e-9)


def test_selective_scan_torch_uses_log_depth_number_of_ops():
    """Op count grows with log L, not L: a per-token loop would need thousands of ops at L = 1458."""

    class CountOps(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            CountOps.calls += 1
            return func(*args, **(kwargs or {}))

    args = scan_inputs(1, 2, 1458, 2, "groups1")
    with CountOps():
        selective_scan_torch(**args, delta_softplus=True, return_last_state=True)
    assert CountOps.calls < 300


def test_selective_scan_float32_inputs_give_float32_outputs():
    args = scan_inputs(2, 4, 40, 3, "groups2", dtype=torch.float32)
    got, got_state = selective_scan(**args, delta_softplus=True, return_last_state=True)
    want, want_state = selective_scan_naive(
        **{k: v.double() for k, v in args.items()}, delta_softplus=True, return_last_state=True
    )
    assert got.dtype == torch.float32 and got_state.dtype == torch.float32
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_state, want_state.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["ungrouped", "groups2"])
def test_selective_scan_torch_gradients_match_naive(layout):
    inputs = scan_inputs(2, 4, CHUNK_SIZE + 6, 3, layout, seed=3)
    gen = torch.Generator().manual_seed(4)
    out_weight = torch.randn(2, 4, CHUNK_SIZE + 6, generator=gen, dtype=torch.float64)
    state_weight = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64)

    def grads(scan) -> dict[str, torch.Tensor]:
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        out, state = scan(**leaves, delta_softplus=True, return_last_state=True)
        ((out * out_weight).sum() + (state * state_weight).sum()).backward()
        return {k: v.grad for k, v in leaves.items()}

    got, want = grads(selective_scan_torch), grads(selective_scan_naive)
    for name in SCAN_ARGS:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


def test_selective_scan_is_cumulative_sum_without_decay():
    """N = 1, A = 0, delta = 1, B = C = 1: h_t = h_{t-1} + u_t, so y = cumsum(u)."""
    u = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]], dtype=torch.float64)
    ones = torch.ones(1, 1, 4, dtype=torch.float64)
    y, state = selective_scan(u, ones, torch.zeros(1, 1, dtype=torch.float64), ones, ones, return_last_state=True)
    torch.testing.assert_close(y, torch.tensor([[[1.0, 3.0, 6.0, 10.0]]], dtype=torch.float64))
    torch.testing.assert_close(state, torch.tensor([[[10.0]]], dtype=torch.float64))

    long_u = torch.arange(1.0, 3 * CHUNK_SIZE + 8, dtype=torch.float64).view(1, 1, -1)
    long_ones = torch.ones_like(long_u)
    y = selective_scan_torch(long_u, long_ones, torch.zeros(1, 1, dtype=torch.float64), long_ones, long_ones)
    n = torch.arange(1.0, long_u.shape[-1] + 1, dtype=torch.float64)
    torch.testing.assert_close(y.flatten(), n * (n + 1) / 2)  # Gauss: 1 + 2 + ... + n


def test_selective_scan_hand_worked_decay_skip_and_gate():
    """exp(delta * A) = 1/2: h = [1, 1/2, 1/4, 1/8 + 2]; y = C h + D u; out = y * silu(z), silu(0) = 0."""
    u = torch.tensor([[[1.0, 0.0, 0.0, 2.0]]], dtype=torch.float64)
    ones = torch.ones(1, 1, 4, dtype=torch.float64)
    A = torch.tensor([[math.log(0.5)]], dtype=torch.float64)
    C = torch.full((1, 1, 4), 2.0, dtype=torch.float64)
    D = torch.tensor([3.0], dtype=torch.float64)
    z = torch.tensor([[[50.0, 50.0, 0.0, 50.0]]], dtype=torch.float64)  # silu(50) = 50 to 1e-20
    y, state = selective_scan_torch(u, ones, A, ones, C, D=D, z=z, return_last_state=True)
    want = torch.tensor([[[(2.0 + 3.0) * 50.0, 1.0 * 50.0, 0.0, (4.25 + 6.0) * 50.0]]], dtype=torch.float64)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(state, torch.tensor([[[2.125]]], dtype=torch.float64))


@pytest.mark.parametrize(
    "change,message",
    [
        ({"B": torch.zeros(2, 3, 3, 10)}, "3 groups, which does not divide Dm = 4"),
        ({"C": torch.zeros(2, 3, 9)}, "C must have shape"),
        ({"A": torch.zeros(4, 3, dtype=torch.complex64)}, "A must be real"),
        ({"D": torch.zeros(5)}, r"D must be \(Dm,\)"),
        ({"z": torch.zeros(2, 4, 9)}, "z must have u's shape"),
    ],
)
def test_selective_scan_rejects_bad_inputs_by_name(change, message):
    args = {**scan_inputs(2, 4, 10, 3, "ungrouped", dtype=torch.float32), **change}
    with pytest.raises(ValueError, match=message):
        selective_scan(**args)


@pytest.mark.gpu
@needs_cuda
@needs_mamba_ssm
def test_mamba_ssm_kernel_matches_torch_scan(monkeypatch):
    """Kernel vs PyTorch path in float32, (Bt, Dm, L, N) = (2, 64, 1458, 16), G = 2; rtol 1e-4 of max|ref|.

    Measured on an H100 (mamba_ssm 2.3.2): every output and gradient within 5e-7 of max|ref|.
    """
    monkeypatch.delenv(DISABLE_KERNELS_ENV, raising=False)
    inputs = scan_inputs(2, 64, 1458, 16, "groups2", dtype=torch.float32, device="cuda", seed=7)
    assert use_kernels(inputs["u"], "mamba_ssm")
    weight = torch.randn(2, 64, 1458, device="cuda")

    def run(scan) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        out, state = scan(**leaves, delta_softplus=True, return_last_state=True)
        (out * weight).sum().backward()
        return out.detach(), state.detach(), {k: v.grad for k, v in leaves.items()}

    out, state, grads = run(selective_scan)
    ref_out, ref_state, ref_grads = run(selective_scan_torch)
    relative_close(out, ref_out, 1e-4, "output")
    relative_close(state, ref_state, 1e-4, "last state")
    for name in SCAN_ARGS:
        relative_close(grads[name], ref_grads[name], 1e-4, f"grad of {name}")
