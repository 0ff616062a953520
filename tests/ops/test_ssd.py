"""Mamba-2 SSD ops: chunked scan and decode step against the per-token recurrence and a hand-worked case."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from mambavlm.ops.dispatch import use_kernels
from mambavlm.ops.ssd import segment_sum, ssd_scan, ssd_scan_naive, ssd_scan_torch, ssd_step


def make_inputs(
    batch: int,
    length: int,
    heads: int,
    head_dim: int,
    groups: int,
    d_state: int,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random SSD inputs with decays spread over (0, 1] and a random initial state."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    return {
        "x": randn(batch, length, heads, head_dim),
        "dt": 0.01 + rand(batch, length, heads),
        "A": -2.0 * rand(heads),
        "B": randn(batch, length, groups, d_state),
        "C": randn(batch, length, groups, d_state),
        "D": randn(heads),
        "initial_state": randn(batch, heads, head_dim, d_state),
    }


def test_naive_recurrence_matches_hand_worked_case() -> None:
    # One head, P = N = 1. S_0 = exp(1 * -ln2) * 0 + 1 * 1 * 1 = 1, y_0 = C_0 S_0 = 1.
    # S_1 = exp(0.5 * -ln2) * 1 + 0.5 * 2 * 1 = 1/sqrt(2) + 1, y_1 = 3 * S_1 (+ D x_1 = 0.5 * 2).
    x = torch.tensor([1.0, 2.0], dtype=torch.float64).view(1, 2, 1, 1)
    dt = torch.tensor([1.0, 0.5], dtype=torch.float64).view(1, 2, 1)
    A = torch.tensor([-math.log(2.0)], dtype=torch.float64)
    B = torch.ones(1, 2, 1, 1, dtype=torch.float64)
    C = torch.tensor([1.0, 3.0], dtype=torch.float64).view(1, 2, 1, 1)
    D = torch.tensor([0.5], dtype=torch.float64)
    s1 = 1 / math.sqrt(2) + 1
    expected_y = torch.tensor([1.0 + 0.5, 3 * s1 + 1.0], dtype=torch.float64).view(1, 2, 1, 1)
    for scan in (ssd_scan_naive, ssd_scan_torch):
        y, final = scan(x, dt, A, B, C, D, return_final_state=True)
        torch.testing.assert_close(y, expected_y, rtol=0, atol=1e-12)
        torch.testing.assert_close(final, torch.tensor([[[[s1]]]], dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("length", "heads", "groups", "chunk_size", "with_D", "with_state"),
    [
        (37, 4, 2, 8, True, True),  # grouped B/C, L not a multiple of the chunk, D and initial state
        (16, 3, 3, 4, False, False),  # one group per head, L a multiple of the chunk
        (5, 2, 1, 64, True, True),  # the whole sequence shorter than one chunk
    ],
)
def test_chunked_scan_matches_recurrence_forward_and_gradients(
    length: int, heads: int, groups: int, chunk_size: int, with_D: bool, with_state: bool
) -> None:
    inputs = make_inputs(batch=2, length=length, heads=heads, head_dim=3, groups=groups, d_state=5)
    if not with_D:
        inputs["D"] = None
    if not with_state:
        inputs["initial_state"] = None
    leaves = {k: v.requires_grad_() for k, v in inputs.items() if v is not None}

    y, final = ssd_scan_torch(**inputs, return_final_state=True, chunk_size=chunk_size)
    y_ref, final_ref = ssd_scan_naive(**inputs, return_final_state=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)

    g = torch.Generator().manual_seed(1)
    weight_y = torch.randn(y.shape, generator=g, dtype=y.dtype)
    weight_final = torch.randn(final.shape, generator=g, dtype=final.dtype)
    grads = torch.autograd.grad((y * weight_y).sum() + (final * weight_final).sum(), list(leaves.values()))
    grads_ref = torch.autograd.grad(
        (y_ref * weight_y).sum() + (final_ref * weight_final).sum(), list(leaves.values())
    )
    for name, grad, grad_ref in zip(leaves, grads, grads_ref):
        assert grad_ref.abs().max() > 0, name
        torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-9, msg=lambda m, n=name: f"d/d{n}: {m}")


def test_scan_in_float32_matches_the_float64_recurrence() -> None:
    inputs = make_inputs(batch=1, length=10, heads=2, head_dim=4, groups=1, d_state=3, dtype=torch.float32)
    y = ssd_scan(**inputs, chunk_size=4)
    assert y.dtype == torch.float32
    reference = ssd_scan_naive(**{k: v.double() for k, v in inputs.items()})
    torch.testing.assert_close(y, reference.float(), rtol=1e-5, atol=1e-5)


def test_step_after_prefix_continues_the_scan() -> None:
    inputs = make_inputs(batch=2, length=13, heads=4, head_dim=3, groups=2, d_state=5)
    y_ref, final_ref = ssd_scan_naive(**inputs, return_final_state=True)
    prefix = 6
    head = {k: (v[:, :prefix] if k in ("x", "dt", "B", "C") else v) for k, v in inputs.items()}
    y_prefix, state = ssd_scan_torch(**head, return_final_state=True, chunk_size=4)
    ys = [y_prefix]
    for t in range(prefix, 13):
        step_inputs = {k: inputs[k][:, t] for k in ("x", "dt", "B", "C")}
        ys.append(ssd_step(state, A=inputs["A"], D=inputs["D"], **step_inputs).unsqueeze(1))
    torch.testing.assert_close(torch.cat(ys, dim=1), y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, final_ref, rtol=1e-10, atol=1e-10)


def test_step_updates_a_float32_state_from_bfloat16_inputs() -> None:
    inputs = make_inputs(batch=1, length=1, heads=2, head_dim=4, groups=1, d_state=3, dtype=torch.float32)
    state = inputs["initial_state"].clone()
    step_inputs = {k: inputs[k][:, 0].bfloat16() for k in ("x", "dt", "B", "C")}
    y = ssd_step(state, A=inputs["A"], **step_inputs)
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    reference = {k: (v.bfloat16().double() if k in ("x", "dt", "B", "C") else v.double()) for k, v in inputs.items()}
    reference["D"] = None
    y_ref, state_ref = ssd_scan_naive(**reference, return_final_state=True)
    torch.testing.assert_close(state, state_ref.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.float(), y_ref[:, 0].float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(
    ("field", "bad", "message"),
    [
        ("dt", torch.ones(1, 10, 3), "dt must be"),
        ("A", torch.ones(2, 1), "A must be"),
        ("B", torch.ones(1, 10, 3, 3), "multiple of the groups"),
        ("C", torch.ones(1, 10, 1, 4), "C must have B's shape"),
        ("initial_state", torch.ones(1, 2, 4, 4), "initial_state must be"),
    ],
)
def test_scan_names_the_bad_argument(field: str, bad: torch.Tensor, message: str) -> None:
    inputs = make_inputs(batch=1, length=10, heads=2, head_dim=4, groups=1, d_state=3, dtype=torch.float32)
    inputs[field] = bad
    with pytest.raises(ValueError, match=message):
        ssd_scan(**inputs)


def kernel_inputs(groups: int, seed: int) -> dict[str, torch.Tensor]:
    """Float32 CUDA inputs at a realistic size; skips when the mamba_ssm kernel would not run."""
    inputs = make_inputs(
        batch=2, length=1024, heads=8, head_dim=64, groups=groups, d_state=64,
        dtype=torch.float32, device="cuda", seed=seed,
    )
    if not use_kernels(inputs["x"], "mamba_ssm"):
        pytest.skip("mamba_ssm kernels are disabled or fail to import")
    return inputs


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize("groups", [1, 8])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None, reason="needs mamba_ssm")
def test_kernel_scan_matches_torch_forward_and_gradients(groups: int) -> None:
    # The Triton kernel multiplies in TF32: errors relative to the largest entry, about 2e-3 on an H100
    # (float32 PyTorch: 1e-6), against a float64 reference.
    tolerance = 1e-2
    inputs = kernel_inputs(groups, seed=2)
    exact = {k: v.double().requires_grad_() for k, v in inputs.items()}
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    y, final = ssd_scan(**leaves, return_final_state=True, chunk_size=64)
    y_ref, final_ref = ssd_scan_torch(**exact, return_final_state=True, chunk_size=64)
    assert relative_error(y, y_ref) < tolerance
    assert relative_error(final, final_ref) < tolerance

    g = torch.Generator(device="cuda").manual_seed(3)
    weight_y = torch.randn(y.shape, generator=g, device="cuda")
    weight_final = torch.randn(final.shape, generator=g, device="cuda")
    grads = torch.autograd.grad((y * weight_y).sum() + (final * weight_final).sum(), list(leaves.values()))
    grads_ref = torch.autograd.grad(
        (y_ref * weight_y.double()).sum() + (final_ref * weight_final.double()).sum(), list(exact.values())
    )
    for name, grad, grad_ref in zip(leaves, grads, grads_ref):
        assert relative_error(grad, grad_ref) < tolerance, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None, reason="needs mamba_ssm")
@pytest.mark.parametrize("with_D", [True, False])
def test_kernel_step_matches_torch_step(with_D: bool) -> None:
    inputs = kernel_inputs(groups=2, seed=4)
    step_inputs = {k: inputs[k][:, 0] for k in ("x", "dt", "B", "C")}
    D = inputs["D"] if with_D else None
    state = inputs["initial_state"].clone()
    y = ssd_step(state, A=inputs["A"], D=D, **step_inputs)
    state_ref = inputs["initial_state"].double().cpu()
    y_ref = ssd_step(
        state_ref, A=inputs["A"].double().cpu(), D=None if D is None else D.double().cpu(),
        **{k: v.double().cpu() for k, v in step_inputs.items()},
    )
    torch.testing.assert_close(state.cpu().double(), state_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.cpu().double(), y_ref, rtol=1e-4, atol=1e-4)


def test_segment_sum_by_hand() -> None:
    """S[i, j] = x[j+1] + ... + x[i] below the diagonal, 0 on it, -inf above: x = (1, 2, 3)."""
    inf = float("inf")
    expected = torch.tensor([[0.0, -inf, -inf], [2.0, 0.0, -inf], [5.0, 3.0, 0.0]])
    assert torch.equal(segment_sum(torch.tensor([1.0, 2.0, 3.0])), expected)
