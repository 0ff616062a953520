"""The Mamba-2 mixer: prefill then decoding equals the full forward (on CPU, and on CUDA with the
kernels), the state it allocates, and the bad inputs it names."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util

import pytest
import torch

from mambavlm.distill.seeding import seed_mamba2_from_attention
from mambavlm.llm.mamba2 import Mamba2Mixer, Mamba2MixerConfig
from tests.conftest import HIDDEN, tiny_llama_attention


@pytest.mark.parametrize("mode", ["mmmamba", "matvlm"])
def test_prefill_then_decoding_equals_the_full_forward(mode: str) -> None:
    mixer = seed_mamba2_from_attention(tiny_llama_attention(), mode, torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixer.conv1d.weight.normal_(std=0.3)  # a conv that mixes tokens, so its state matters
        mixer.in_proj_dt.weight.normal_(std=0.1)  # data-dependent decay
    assert mixer.config.use_conv and mixer.config.use_gate
    u = torch.randn(2, 15, HIDDEN, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = mixer(u)
        cache = mixer.allocate_state(2)
        pieces = [mixer(u[:, :6], cache), mixer(u[:, 6:8], cache)]  # prefill, then a 2-token continuation
        pieces += [mixer.step(u[:, t], cache)[:, None] for t in range(8, 12)]
        pieces += [mixer(u[:, t : t + 1], cache) for t in range(12, 15)]  # forward routes one token to step
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_allocated_state_shapes_and_constants_follow_the_config() -> None:
    config = Mamba2MixerConfig(hidden_size=8, num_heads=2, head_dim=3, d_state=5, d_conv=4, n_groups=2)
    mixer = Mamba2Mixer(config, dtype=torch.float64)
    state = mixer.allocate_state(3)
    assert state.conv.shape == (3, 2 * 3 + 2 * 2 * 5, 4) and state.ssm.shape == (3, 2, 3, 5)
    assert state.conv.dtype == torch.float64 and state.ssm.dtype == torch.float32
    assert state.conv.abs().sum() == 0 and state.ssm.abs().sum() == 0
    torch.testing.assert_close(state.A, -torch.exp(mixer.A_log.float()))
    torch.testing.assert_close(state.D, mixer.D.float())
    no_conv = Mamba2Mixer(dataclasses.replace(config, use_conv=False, use_D=False)).allocate_state(1)
    assert no_conv.conv.shape == (1, 26, 0) and no_conv.D.abs().sum() == 0


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="head_dim must be a positive int"):
        Mamba2MixerConfig(hidden_size=8, num_heads=2, head_dim=0, d_state=4)
    mixer = Mamba2Mixer(Mamba2MixerConfig(hidden_size=8, num_heads=2, head_dim=4, d_state=4))
    with pytest.raises(ValueError, match="hidden_states must be"):
        mixer(torch.zeros(1, 3, 7))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None, reason="needs mamba_ssm")
def test_seeded_mixer_on_cuda_matches_cpu_and_decodes_consistently() -> None:
    mixer = seed_mamba2_from_attention(tiny_llama_attention(), "matvlm", torch.Generator().manual_seed(0))
    u = torch.randn(2, 150, HIDDEN, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = mixer(u)
        mixer.cuda()
        full = mixer(u.cuda())
        cache = mixer.allocate_state(2)
        pieces = [mixer(u[:, :140].cuda(), cache)] + [mixer(u[:, t : t + 1].cuda(), cache) for t in range(140, 150)]
    scale = expected.abs().max()
    assert (full.cpu() - expected).abs().max() / scale < 1e-2
    assert (torch.cat(pieces, dim=1).cpu() - expected).abs().max() / scale < 1e-2


def test_unscaled_input_does_not_overflow_in_float16() -> None:
    """mmMamba's unscaled input scans x / dt with dt floored at 1e-6: 1e6 |x| overflows float16 (max
    65504), so that division and the scan stay in float32 whatever the weights' dtype."""
    mixer = seed_mamba2_from_attention(tiny_llama_attention(), "mmmamba", torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixer.dt_bias[:2] = -30.0  # softplus -> the 1e-6 floor on two heads
    half = copy.deepcopy(mixer).half()
    u = torch.randn(2, 9, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = mixer(u)
        got = half(u.half())
        state = half.allocate_state(2)
        stepped = torch.stack([half.step(u[:, t].half(), state) for t in range(9)], dim=1)
    assert torch.isfinite(got).all() and torch.isfinite(stepped).all()
    scale = expected.abs().max()
    assert (got.float() - expected).abs().max() / scale < 1e-2
    assert (stepped.float() - expected).abs().max() / scale < 1e-2
