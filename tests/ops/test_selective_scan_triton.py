"""The Triton selective scan (``mambavlm.ops.selective_scan_triton``): outputs and the gradients of every
argument against the PyTorch scan, run by Triton's interpreter on the CPU (a subprocess:
``TRITON_INTERPRET`` is read when Triton loads), and against mamba_ssm's ``selective_scan_fn`` on CUDA."""

from __future__ import annotations

import textwrap
from collections.abc import Callable

import pytest
import torch

from mambavlm.ops.mamba_step import triton_available
from tests.conftest import run_under_triton_interpreter

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton")


def scan_case(batch: int, dim: int, n: int, length: int, *, z: bool, skip: bool, bias: bool, softplus: bool,
              grouped: bool, groups: int = 1, channels_last: bool = False, device: str = "cpu",
              dtype: torch.dtype = torch.float32) -> list:
    """Random inputs of mamba_ssm's shapes: u, delta, A, B, C, D, z, delta_bias (B, C with ``groups``
    groups when ``grouped``; u, delta, z channel-contiguous, (B, L, D) buffers seen as (B, D, L), when
    ``channels_last``, as a mixer computing in (B, L, D) passes them)."""
    g = torch.Generator().manual_seed(batch * 1000 + dim + length)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    b_shape = (batch, groups, n, length) if grouped else (batch, n, length)
    args = [randn(batch, dim, length), randn(batch, dim, length) * 0.5, -torch.rand(dim, n, generator=g) - 0.1,
            randn(*b_shape), randn(*b_shape), randn(dim) if skip else None,
            randn(batch, dim, length) if z else None, randn(dim) * 0.3 if bias else None]
    args = [a if a is None else a.to(device, dtype if i not in (2, 5, 7) else torch.float32)
            for i, a in enumerate(args)]
    if channels_last:
        for i in (0, 1, 6):
            if args[i] is not None:
                args[i] = args[i].transpose(1, 2).contiguous().transpose(1, 2)
                assert args[i].stride(1) == 1
    return args


def outputs_and_gradients(fn: Callable[..., torch.Tensor], args: list, softplus: bool,
                          **launch: int | str) -> tuple[torch.Tensor, list]:
    """fn's output for ``args`` and the gradients of each argument for a fixed random output gradient."""
    leaves = [a.clone().requires_grad_(True) if a is not None else None for a in args]
    out = fn(*leaves, delta_softplus=softplus, **launch)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out))
    return out.detach(), [leaf.grad if leaf is not None else None for leaf in leaves]


CHECKS = textwrap.dedent(
    """
    import sys

    import torch
    from mambavlm.ops.selective_scan import selective_scan_torch
    from mambavlm.ops.selective_scan_triton import selective_scan_triton
    from tests.ops.test_selective_scan_triton import outputs_and_gradients, scan_case

    names = "u delta A B C D z delta_bias".split()
    cases = [  # lengths over several chunks and a partial last one (38: 3 chunks of the default 16 steps, 5 of
        # 8); channels not a multiple of the block
        ((2, 20, 4, 38), dict(z=True, skip=True, bias=True, softplus=True, grouped=False), {}),
        ((1, 16, 8, 32), dict(z=False, skip=False, bias=False, softplus=False, grouped=True), {}),
        ((2, 5, 4, 33), dict(z=True, skip=False, bias=True, softplus=True, grouped=True), {}),
        ((1, 20, 4, 38), dict(z=True, skip=True, bias=True, softplus=True, grouped=False),
         dict(block_d=8, block_t=8, num_warps=2)),
        ((1, 40, 2, 9), dict(z=False, skip=True, bias=False, softplus=True, grouped=False),
         dict(block_d=32, block_t=4, num_warps=4)),
        # the projector's four scan directions: one group of B / C per direction
        ((1, 64, 4, 21), dict(z=True, skip=True, bias=True, softplus=True, grouped=True, groups=4), {}),
        ((1, 32, 8, 17), dict(z=False, skip=True, bias=True, softplus=True, grouped=True, groups=2),
         dict(block_d=8, block_t=8, num_warps=2)),
        # channel-contiguous u, delta, z (read through their strides; the gradients in the same order); two
        # chunks, the last partial
        ((2, 20, 4, 21), dict(z=True, skip=True, bias=True, softplus=True, grouped=False, channels_last=True), {}),
        ((1, 40, 2, 9), dict(z=False, skip=False, bias=True, softplus=True, grouped=True, channels_last=True),
         dict(block_d=32, block_t=4, num_warps=4)),
    ]
    for shape, flags, launch in cases:
        args = scan_case(*shape, **flags)
        want, want_grads = outputs_and_gradients(selective_scan_torch, args, flags["softplus"])
        got, got_grads = outputs_and_gradients(selective_scan_triton, args, flags["softplus"], method=sys.argv[1],
                                               **launch)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        if sys.argv[1] == "sequential" and flags.get("channels_last"):  # stored as it was read
            assert got.stride(1) == 1 and got_grads[0].stride(1) == 1, (got.stride(), got_grads[0].stride())
        for name, g_want, g_got in zip(names, want_grads, got_grads):
            assert (g_want is None) == (g_got is None), name
            if g_want is not None:
                assert g_got.shape == g_want.shape, name
                torch.testing.assert_close(g_got, g_want, rtol=1e-3, atol=1e-3, msg=lambda m, n=name: f"{n}: {m}")
    print("selective scan: equal")
    """
)


@pytest.mark.parametrize("method", ["chunked", "sequential"])
def test_the_triton_scan_equals_the_pytorch_scan_and_its_gradients_under_the_interpreter(method: str) -> None:
    run_under_triton_interpreter(CHECKS, method, expect="selective scan: equal", timeout=600)


@pytest.mark.parametrize(("method", "channels_last", "groups", "expected"), [
    ("sequential", False, 1, (32, 8, 1)),
    ("sequential", True, 1, (64, 16, 1)),
    ("sequential", True, 4, (32, 16, 1)),  # 32 channels per group: the default 64 shrinks to divide them
    ("chunked", True, 1, (8, 16, 4)),  # the chunked kernels copy to the sequence order
])
def test_the_default_launch_follows_the_method_and_the_memory_order(
    method: str, channels_last: bool, groups: int, expected: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    import mambavlm.ops.selective_scan_triton as module

    launches = []
    monkeypatch.setattr(module._SelectiveScan, "apply", lambda *a: launches.append(a[-1]))
    u, delta, A, B, C, *_ = scan_case(1, 128, 4, 8, z=False, skip=False, bias=False, softplus=False,
                                      grouped=groups > 1, groups=groups, channels_last=channels_last)
    module.selective_scan_triton(u, delta, A, B, C, method=method)
    assert launches == [(*expected, method)]


def test_inputs_the_triton_scan_cannot_take_are_named() -> None:
    from mambavlm.ops.selective_scan_triton import selective_scan_triton

    u, delta, A, B, C, *_ = scan_case(1, 4, 4, 8, z=False, skip=False, bias=False, softplus=False, grouped=False)
    with pytest.raises(ValueError, match="N a power of 2, got 3"):
        selective_scan_triton(u, delta, A[:, :3], B[:, :3], C[:, :3])
    two = (B[:, None].expand(1, 2, 4, 8), C[:, None].expand(1, 2, 4, 8))  # 2 channels per group
    with pytest.raises(ValueError, match=r"block_d \(4\) to divide the channels per group \(4 / 2 groups\)"):
        selective_scan_triton(u, delta, A, *two, block_d=4)
    with pytest.raises(ValueError, match=r"B must have shape \(1, 4, 8\), got \(1, 4, 7\)"):
        selective_scan_triton(u, delta, A, B[..., :7], C)
    with pytest.raises(ValueError, match="method must be 'chunked' or 'sequential', got 'parallel'"):
        selective_scan_triton(u, delta, A, B, C, method="parallel")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [1, 4], ids=["one-group", "four-directions"])
@pytest.mark.parametrize(("method", "channels_last"), [("chunked", False), ("sequential", False), ("sequential", True)],
                         ids=["chunked", "sequential", "sequential-channels-last"])
def test_the_triton_scan_on_cuda_equals_mamba_ssms_kernel(dtype: torch.dtype, groups: int, method: str,
                                                          channels_last: bool) -> None:
    """256 channels, N = 16, 1000 steps, B / C shared (the LLM's mixer) or one group per scan direction
    (the projector's), u / delta / z sequence- or channel-contiguous: outputs and gradients against
    ``selective_scan_fn`` (float32: rounding apart; bf16: both round their outputs to bf16)."""
    selective_scan_fn = pytest.importorskip("mamba_ssm.ops.selective_scan_interface").selective_scan_fn
    from mambavlm.ops.selective_scan_triton import selective_scan_triton

    args = scan_case(2, 256, 16, 1000, z=True, skip=True, bias=True, softplus=True, grouped=groups > 1,
                     groups=groups, channels_last=channels_last, device="cuda", dtype=dtype)
    want, want_grads = outputs_and_gradients(selective_scan_fn, args, True)
    got, got_grads = outputs_and_gradients(selective_scan_triton, args, True, method=method)
    tol = {"rtol": 2e-4, "atol": 2e-4} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    torch.testing.assert_close(got.float(), want.float(), **tol)
    for name, g_want, g_got in zip("u delta A B C D z delta_bias".split(), want_grads, got_grads, strict=True):
        scale = g_want.float().abs().max().clamp(min=1.0)  # summed gradients (A, B, C, D) grow with the sums
        torch.testing.assert_close(g_got.float() / scale, g_want.float() / scale, **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_every_scan_kernel_compiles_for_hopper_without_a_gpu() -> None:
    """The interpreter checks the kernels' arithmetic, not that Triton's compiler takes them: each kernel
    pair compiles ahead of time for sm_90 (the H200) with bf16 sequences, as the GPU would build it."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import mambavlm.ops.selective_scan_triton as scan

    constants = {"N": 16, "BLOCK_D": 8, "BLOCK_T": 16, "HAS_D": True, "HAS_Z": True, "HAS_BIAS": True, "SOFTPLUS": True}
    half = {"u_ptr", "delta_ptr", "z_ptr", "out_ptr", "dout_ptr", "du_ptr", "ddelta_ptr", "dz_ptr", "b_ptr", "c_ptr"}
    for kernel in (scan._sequential_fwd_kernel, scan._sequential_bwd_kernel, scan._selective_scan_fwd_kernel,
                   scan._selective_scan_bwd_kernel):
        names = kernel.arg_names
        types = {name: "constexpr" if name in constants else ("*bf16" if name in half else "*fp32")
                 if name.endswith("_ptr") else "i32" for name in names}
        source = ASTSource(fn=kernel, signature=types, constexprs={(names.index(k),): v for k, v in constants.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        assert ".target sm_90" in compiled.asm["ptx"], kernel.fn.__name__
