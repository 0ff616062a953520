"""Seeding a Mamba-2 mixer from a transformers LlamaAttention (mmMamba / MaTVLM)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import repeat_kv

from mambavlm.distill.seeding import linear_attention_reference, seed_mamba2_from_attention
from mambavlm.llm.mamba2 import Mamba2Mixer
from tests.conftest import HEAD_DIM, HEADS, HIDDEN, KV_HEADS, tiny_llama_attention


def teacher_linear_attention_heads(attention: torch.nn.Module, u: torch.Tensor) -> torch.Tensor:
    """Causal linear attention over the teacher's own q, k, v (repeat_kv for GQA, no RoPE): (B, L, H*P)."""
    batch, length, _ = u.shape
    q = attention.q_proj(u).view(batch, length, HEADS, HEAD_DIM).transpose(1, 2)
    k = attention.k_proj(u).view(batch, length, KV_HEADS, HEAD_DIM).transpose(1, 2)
    v = attention.v_proj(u).view(batch, length, KV_HEADS, HEAD_DIM).transpose(1, 2)
    y = linear_attention_reference(q, repeat_kv(k, HEADS // KV_HEADS), repeat_kv(v, HEADS // KV_HEADS))
    return y.transpose(1, 2)


def force_unit_decay(mixer: Mamba2Mixer) -> None:
    """gamma = exp(-softplus(.) * exp(a)) = 1 for every token: a = -inf."""
    with torch.no_grad():
        mixer.A_log.fill_(-math.inf)


def test_linear_attention_reference_matches_a_token_loop() -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 5, 3, generator=g), torch.randn(2, 2, 5, 3, generator=g)
    v = torch.randn(2, 2, 5, 4, generator=g)
    expected = torch.stack(
        [sum((q[:, :, t] * k[:, :, s]).sum(-1, keepdim=True) * v[:, :, s] for s in range(t + 1)) for t in range(5)],
        dim=2,
    )
    torch.testing.assert_close(linear_attention_reference(q, k, v), expected)


@pytest.mark.parametrize("attention_bias", [False, True])
def test_seeded_mixer_with_unit_decay_is_the_teachers_linear_attention(attention_bias: bool) -> None:
    attention = tiny_llama_attention(attention_bias)
    seeded = seed_mamba2_from_attention(attention, "mmmamba", generator=torch.Generator().manual_seed(0))
    plain = Mamba2Mixer(dataclasses.replace(seeded.config, use_conv=False, use_gate=False))
    result = plain.load_state_dict(seeded.state_dict(), strict=False)
    assert result.missing_keys == []
    gate_bias = {"in_proj_z.bias"} if attention_bias else set()
    assert set(result.unexpected_keys) == {"conv1d.weight", "conv1d.bias", "in_proj_z.weight", "norm.weight"} | gate_bias
    force_unit_decay(plain)

    u = torch.randn(2, 11, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = attention.o_proj(teacher_linear_attention_heads(attention, u).flatten(2))
        actual = plain(u)
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_seeded_mmmamba_conv_is_identity_and_gate_is_rmsnorm_silu() -> None:
    attention = tiny_llama_attention()
    mixer = seed_mamba2_from_attention(attention, "mmmamba", generator=torch.Generator().manual_seed(0))
    force_unit_decay(mixer)
    u = torch.randn(2, 9, HIDDEN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        heads = teacher_linear_attention_heads(attention, u)  # (B, L, H, P)
        normed = heads / torch.sqrt(heads.pow(2).mean(-1, keepdim=True) + mixer.config.rms_eps)
        gate = (u @ mixer.in_proj_z.weight.T).view(2, 9, HEADS, HEAD_DIM)
        expected = attention.o_proj((normed * gate * torch.sigmoid(gate)).flatten(2))
        actual = mixer(u)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_mmmamba_init_values() -> None:
    attention = tiny_llama_attention()
    mixer = seed_mamba2_from_attention(attention, "mmmamba", generator=torch.Generator().manual_seed(0))
    cfg = mixer.config
    assert (cfg.num_heads, cfg.head_dim, cfg.d_state) == (HEADS, HEAD_DIM, HEAD_DIM)
    assert cfg.conv_activation is None and not cfg.dt_scales_input and mixer.D is None
    # inherited: head h of x and B reads KV head h // 2; C and out_proj are the query / output weights
    for h in range(HEADS):
        rows, kv_rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM), slice((h // 2) * HEAD_DIM, (h // 2 + 1) * HEAD_DIM)
        assert torch.equal(mixer.in_proj_x.weight[rows], attention.v_proj.weight[kv_rows])
        assert torch.equal(mixer.in_proj_B.weight[rows], attention.k_proj.weight[kv_rows])
    assert torch.equal(mixer.in_proj_C.weight, attention.q_proj.weight)
    assert torch.equal(mixer.out_proj.weight, attention.o_proj.weight)
    # mimic: W_gamma = 0, a = 1, dt in [1e-3, 1e-1] so gamma = exp(-dt e) is close to 1
    assert torch.count_nonzero(mixer.in_proj_dt.weight) == 0
    assert torch.equal(mixer.A_log, torch.ones(HEADS))
    dt = F.softplus(mixer.dt_bias)
    assert dt.min() >= 1e-3 - 1e-7 and dt.max() <= 1e-1 + 1e-7
    assert torch.exp(-dt * math.e).min() > 0.7
    identity = torch.zeros(cfg.conv_dim, 1, cfg.d_conv)
    identity[:, 0, -1] = 1.0
    assert torch.equal(mixer.conv1d.weight, identity)
    assert torch.count_nonzero(mixer.conv1d.bias) == 0
    gate_bound = 2**-2.5 * math.sqrt(6 / (HIDDEN + HEADS * HEAD_DIM))
    assert 0 < mixer.in_proj_z.weight.abs().max() <= gate_bound
    assert torch.equal(mixer.norm.weight, torch.ones(HEADS * HEAD_DIM))


def test_matvlm_init_copies_x_b_c_out_and_is_fresh_elsewhere() -> None:
    attention = tiny_llama_attention()
    mixer = seed_mamba2_from_attention(attention, "matvlm", generator=torch.Generator().manual_seed(0))
    cfg = mixer.config
    assert cfg.conv_activation == "silu" and cfg.dt_scales_input and cfg.use_gate
    def repeated(weight: torch.Tensor) -> torch.Tensor:
        return weight.view(KV_HEADS, HEAD_DIM, HIDDEN).repeat_interleave(HEADS // KV_HEADS, 0).flatten(0, 1)

    assert torch.equal(mixer.in_proj_x.weight, repeated(attention.v_proj.weight))
    assert torch.equal(mixer.in_proj_B.weight, repeated(attention.k_proj.weight))
    assert torch.equal(mixer.in_proj_C.weight, attention.q_proj.weight)
    assert torch.equal(mixer.out_proj.weight, attention.o_proj.weight)
    # fresh Mamba-2 (mamba_ssm defaults)
    A = torch.exp(mixer.A_log)
    assert A.min() >= 1.0 - 1e-6 and A.max() <= 16.0 + 1e-5
    dt = F.softplus(mixer.dt_bias)
    assert dt.min() >= 1e-3 - 1e-7 and dt.max() <= 1e-1 + 1e-7
    assert torch.equal(mixer.D, torch.ones(HEADS))
    conv_bound = 1 / math.sqrt(cfg.d_conv)
    assert mixer.conv1d.weight.abs().max() <= conv_bound and mixer.conv1d.weight[:, 0, :-1].abs().sum() > 0
    dt_bound = 1 / math.sqrt(HIDDEN)
    assert 0 < mixer.in_proj_dt.weight.abs().max() <= dt_bound


def test_seeding_is_reproducible_with_a_generator() -> None:
    attention = tiny_llama_attention()
    first = seed_mamba2_from_attention(attention, "matvlm", generator=torch.Generator().manual_seed(5))
    again = seed_mamba2_from_attention(attention, "matvlm", generator=torch.Generator().manual_seed(5))
    other = seed_mamba2_from_attention(attention, "matvlm", generator=torch.Generator().manual_seed(6))
    for name, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
    assert not torch.equal(first.dt_bias, other.dt_bias)


@pytest.mark.parametrize("mode", ["mmmamba", "matvlm"])
def test_gradients_reach_every_parameter(mode: str) -> None:
    attention = tiny_llama_attention(attention_bias=True)
    mixer = seed_mamba2_from_attention(attention, mode, torch.Generator().manual_seed(0))
    u = torch.randn(2, 10, HIDDEN, generator=torch.Generator().manual_seed(3))
    mixer(u).pow(2).sum().backward()
    for name, parameter in mixer.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_bad_inputs_are_named() -> None:
    attention = tiny_llama_attention()
    with pytest.raises(ValueError, match="unknown seeding mode 'mamba'"):
        seed_mamba2_from_attention(attention, "mamba")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="o_proj"):
        seed_mamba2_from_attention(torch.nn.Module(), "mmmamba")
    attention.config.num_key_value_heads = 3
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        seed_mamba2_from_attention(attention, "mmmamba")
