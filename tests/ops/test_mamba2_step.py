"""The Mamba-2 step kernel (``mambavlm.ops.mamba2_step``) inside ``Mamba2Mixer.step``: decoding through
it equals the full forward's chunked scan and the PyTorch step, for every layout the mixer config
allows, run by Triton's interpreter on the CPU (a subprocess: ``TRITON_INTERPRET`` is read when Triton
loads), and on CUDA against mamba_ssm's ``Mamba2.step`` (tests/llm/test_mamba2_lm.py)."""

from __future__ import annotations

import textwrap

import pytest
import torch

from mambavlm.ops.dispatch import triton_available
from tests.conftest import run_under_triton_interpreter

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton")

CHECKS = textwrap.dedent(
    """
    import copy, os
    import torch
    import mambavlm.llm.mamba2 as m2
    from mambavlm.distill.seeding import seed_mamba2_from_attention
    from mambavlm.llm.mamba2 import Mamba2Mixer, Mamba2MixerConfig
    from mambavlm.ops.dispatch import DISABLE_KERNELS_ENV
    from tests.conftest import HIDDEN, tiny_llama_attention

    torch.set_grad_enabled(False)
    calls = []
    kernel = m2.mamba2_ssm_step
    m2.mamba2_ssm_step = lambda *a, **k: calls.append(1) or kernel(*a, **k)
    base = dict(hidden_size=HIDDEN, num_heads=4, head_dim=16, d_state=8, chunk_size=8)
    mixers = {
        # mamba_ssm's Mamba2: one fused in_proj, G groups of B and C
        "mamba_ssm layout, 2 groups": Mamba2Mixer(Mamba2MixerConfig(**base, n_groups=2)),
        # 24-channel heads (two programs per head, one half empty), 6 states (not a power of two), no conv,
        # no D, a dt clamp that bites
        "odd sizes, no conv, no D, dt clamp": Mamba2Mixer(Mamba2MixerConfig(
            **{**base, "head_dim": 24, "d_state": 6}, use_conv=False, use_D=False, dt_limit=(0.05, 0.3))),
        # seeded from grouped-query attention: x and B at key/value width (2 of 4 heads), unscaled input
        # (mmMamba) and scaled (MaTVLM)
        "seeded mmMamba": seed_mamba2_from_attention(tiny_llama_attention(), "mmmamba", torch.Generator().manual_seed(0)),
        "seeded MaTVLM": seed_mamba2_from_attention(tiny_llama_attention(), "matvlm", torch.Generator().manual_seed(0)),
    }
    for name, mixer in mixers.items():
        cfg = mixer.config
        torch.manual_seed(1)
        for p in mixer.parameters():  # weights that make every term matter: decay, conv, skip, gate
            p.add_(torch.randn_like(p) * 0.1)
        if name == "seeded mmMamba":
            mixer.dt_bias[:1] = -30.0  # softplus -> the unscaled input's 1e-6 floor on one head
        u = torch.randn(3, 12, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
        full = mixer(u)
        states = {}
        outs = {}
        for fused in (True, False):
            os.environ[DISABLE_KERNELS_ENV] = "0" if fused else "1"
            calls.clear()
            state = mixer.allocate_state(3)
            pieces = [mixer(u[:, :7], state)] + [mixer.step(u[:, t], state)[:, None] for t in range(7, 12)]
            assert len(calls) == (5 if fused else 0), (name, fused, len(calls))
            outs[fused], states[fused] = torch.cat(pieces, dim=1), state
        torch.testing.assert_close(outs[True], full, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(outs[True], outs[False], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(states[True].ssm, states[False].ssm, rtol=1e-5, atol=1e-5)
    layouts = {name: (m.config.num_xb_heads, m.config.dt_scales_input) for name, m in mixers.items()}
    assert layouts["seeded mmMamba"] == (2, False) and layouts["seeded MaTVLM"] == (2, True), layouts
    print("mamba2 step: equal")
    """
)


def test_mamba2_step_kernel_equals_the_scan_and_the_pytorch_step_under_the_interpreter() -> None:
    run_under_triton_interpreter(CHECKS, expect="mamba2 step: equal")


def test_mamba2_step_kernel_names_the_tensor_that_does_not_fit() -> None:
    from mambavlm.ops.mamba2_step import mamba2_ssm_step

    state = torch.zeros(1, 4, 16, 8)
    heads = torch.zeros(4)
    args = {"xb_heads": 4, "b_groups": 2, "n_groups": 2, "dt_limit": (0.0, float("inf")), "dt_scales_input": True,
            "min_dt": 1e-6}
    with pytest.raises(ValueError, match=r"xbc must be \(1, 96\)"):
        mamba2_ssm_step(torch.zeros(1, 95), torch.zeros(1, 4), state, heads, heads, heads, **args)
    with pytest.raises(ValueError, match=r"dt must be \(1, 4\)"):
        mamba2_ssm_step(torch.zeros(1, 96), torch.zeros(1, 3), state, heads, heads, heads, **args)
    with pytest.raises(ValueError, match="state must be a contiguous float32"):
        mamba2_ssm_step(torch.zeros(1, 96), torch.zeros(1, 4), state.double(), heads, heads, heads, **args)
    with pytest.raises(ValueError, match="D must be a contiguous float32"):
        mamba2_ssm_step(torch.zeros(1, 96), torch.zeros(1, 4), state, heads, heads, torch.zeros(3), **args)
    with pytest.raises(ValueError, match=r"b_groups \(3\) must divide the 4 heads"):
        mamba2_ssm_step(torch.zeros(1, 4 * 16 + 5 * 8), torch.zeros(1, 4), state, heads, heads, heads,
                        **{**args, "b_groups": 3})
