"""Seeding a Mamba-2 mixer from a transformers LlamaAttention (mmMamba / MaTVLM)."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import repeat_kv
from transformers.models.mamba2.modeling_mamba2 import MambaRMSNormGated

from mambavlm.distill.seeding import linear_attention_reference, seed_mamba2_from_attention
from mambavlm.llm.mamba2 import Mamba2Mixer
from tests.conftest import HEAD_DIM, HEADS, HIDDEN, KV_HEADS, tiny_llama_attention

GROUPED_NORM = "group_size" in inspect.signature(MambaRMSNormGated.__init__).parameters


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
    assert cfg.norm_before_gate and cfg.norm_weight_shared  # mmMamba's code: RMSNorm(y) per head, one weight
    # inherited at key/value width (head h of x and B reads KV head h // 2 as activations); C, out_proj
    assert cfg.num_xb_heads == KV_HEADS
    assert torch.equal(mixer.in_proj_x.weight, attention.v_proj.weight)
    assert torch.equal(mixer.in_proj_B.weight, attention.k_proj.weight)
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
    assert torch.equal(mixer.norm.weight, torch.ones(HEAD_DIM))


def test_matvlm_init_copies_x_b_c_out_and_is_fresh_elsewhere() -> None:
    attention = tiny_llama_attention()
    mixer = seed_mamba2_from_attention(attention, "matvlm", generator=torch.Generator().manual_seed(0))
    cfg = mixer.config
    assert cfg.conv_activation == "silu" and cfg.dt_scales_input and cfg.use_gate
    assert not cfg.norm_before_gate and not cfg.norm_weight_shared  # mamba_ssm's Mamba2: gate, then RMSNorm
    assert torch.equal(mixer.norm.weight, torch.ones(HEADS * HEAD_DIM))
    assert torch.equal(mixer.in_proj_x.weight, attention.v_proj.weight)
    assert torch.equal(mixer.in_proj_B.weight, attention.k_proj.weight)
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


def full_width_state_dict(mixer: Mamba2Mixer) -> dict[str, torch.Tensor]:
    """A seeded (split, key/value-width) mixer's weights in mamba_ssm's / transformers' fused layout: x and
    B rows (and their conv channels) repeated to every head, as the mixer repeats their activations."""
    cfg = mixer.config
    repeats = cfg.num_heads // cfg.xb_heads

    def widen(t: torch.Tensor, width: int) -> torch.Tensor:
        return t.unflatten(0, (cfg.xb_heads, width)).repeat_interleave(repeats, dim=0).flatten(0, 1)

    x_rows, b_rows = cfg.xb_heads * cfg.head_dim, cfg.xb_heads * cfg.d_state
    conv_w, conv_b = mixer.conv1d.weight, mixer.conv1d.bias
    parts = conv_w.split([x_rows, b_rows, cfg.num_heads * cfg.d_state])
    bias_parts = conv_b.split([x_rows, b_rows, cfg.num_heads * cfg.d_state])
    return {
        "in_proj.weight": torch.cat([
            mixer.in_proj_z.weight, widen(mixer.in_proj_x.weight, cfg.head_dim),
            widen(mixer.in_proj_B.weight, cfg.d_state), mixer.in_proj_C.weight, mixer.in_proj_dt.weight,
        ]),
        "conv1d.weight": torch.cat([widen(parts[0], cfg.head_dim), widen(parts[1], cfg.d_state), parts[2]]),
        "conv1d.bias": torch.cat([widen(bias_parts[0], cfg.head_dim), widen(bias_parts[1], cfg.d_state), bias_parts[2]]),
        "dt_bias": mixer.dt_bias, "A_log": mixer.A_log, "D": mixer.D,
        "norm.weight": mixer.norm.weight, "out_proj.weight": mixer.out_proj.weight,
    }


@torch.no_grad()
def perturbed_matvlm_mixer() -> Mamba2Mixer:
    """MaTVLM seeding of the GQA attention, every part moved off its init (decay, conv, dt, gate, norm on)."""
    mixer = seed_mamba2_from_attention(tiny_llama_attention(), "matvlm", torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(3)
    for name in ("conv1d.bias", "norm.weight", "D"):
        param = mixer.get_parameter(name)
        param.add_(0.3 * torch.randn(param.shape, generator=g))
    mixer.in_proj_dt.weight.mul_(5.0)
    return mixer


@pytest.mark.skipif(not GROUPED_NORM, reason="transformers <= 5.17 normalises the gated norm over the whole width")
def test_matvlm_mixer_is_transformers_mamba2_mixer_with_mapped_weights() -> None:
    """MaTVLM's fresh Mamba-2 layer is mamba_ssm's Mamba2: transformers' reference Mamba2Mixer (the gate
    before the RMSNorm, in groups of d_inner / n_groups) with the same weights gives the same output."""
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HFMamba2Mixer

    mixer = perturbed_matvlm_mixer()
    cfg = mixer.config
    hf_config = Mamba2Config(
        hidden_size=HIDDEN, num_heads=HEADS, head_dim=HEAD_DIM, state_size=HEAD_DIM, n_groups=HEADS,
        expand=HEADS * HEAD_DIM // HIDDEN, conv_kernel=cfg.d_conv, use_conv_bias=True, use_bias=False,
        chunk_size=8, layer_norm_epsilon=cfg.rms_eps, num_hidden_layers=1,
    )
    reference = HFMamba2Mixer(hf_config, layer_idx=0).eval()
    reference.load_state_dict(full_width_state_dict(mixer), strict=True)
    u = torch.randn(2, 13, HIDDEN, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected, got = reference(u), mixer(u)
    assert expected.abs().mean() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("mode", "new_per_layer"), [
    # in_proj_z (H*P x hidden) + in_proj_dt (H x hidden) + dt_bias, A_log (+ D) + conv over x, B at KV width and
    # C (2*8 + 2*8 + 4*8 = 64 channels, 4 taps + bias) + the gate norm (shared P / per channel H*P)
    ("mmmamba", 32 * 32 + 4 * 32 + 4 + 4 + 64 * 5 + 8),
    ("matvlm", 32 * 32 + 4 * 32 + 4 + 4 + 4 + 64 * 5 + 32),
])
def test_a_linear_student_adds_only_the_new_parameters(mode: str, new_per_layer: int) -> None:
    """Every attention weight moves into the mixer once (x <- W_V, B <- W_K at key/value width, C <- W_Q,
    out_proj <- W_O): the student has the teacher's parameters plus the ones attention lacks, no copies."""
    from mambavlm.distill.convert import convert_llama
    from tests.conftest import tiny_llama

    teacher = tiny_llama()  # 4 layers, hidden 32, 4 heads of 8, 2 key/value heads
    student = convert_llama(teacher, "linear", mode)
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(student) == count(teacher) + 4 * new_per_layer


def test_mixer_options_override_the_mode_and_bad_ones_are_named() -> None:
    """mmMamba's public code: 2 conv taps with SiLU, the input scaled by dt."""
    code = {"d_conv": 2, "conv_activation": "silu", "dt_scales_input": True}
    mixer = seed_mamba2_from_attention(tiny_llama_attention(), "mmmamba", torch.Generator().manual_seed(0), code)
    cfg = mixer.config
    assert (cfg.d_conv, cfg.conv_activation, cfg.dt_scales_input, cfg.norm_weight_shared) == (2, "silu", True, True)
    identity = torch.zeros(cfg.conv_dim, 1, 2)
    identity[:, 0, 1] = 1.0
    assert torch.equal(mixer.conv1d.weight, identity)  # the current-token tap, as the code sets it
    with pytest.raises(ValueError, match=r"mixer options \['dconv'\] cannot be set"):
        seed_mamba2_from_attention(tiny_llama_attention(), "mmmamba", mixer_options={"dconv": 2})
    with pytest.raises(ValueError, match=r"mixer options \['num_heads'\] cannot be set"):
        seed_mamba2_from_attention(tiny_llama_attention(), "matvlm", mixer_options={"num_heads": 8})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None, reason="needs mamba_ssm")
def test_matvlm_mixer_is_mamba_ssms_mamba2_on_the_gpu() -> None:
    """The same mapping into mamba_ssm's own Mamba2 (ngroups = heads, headdim = d_state = P), float32."""
    from mamba_ssm.modules.mamba2 import Mamba2

    mixer = perturbed_matvlm_mixer().cuda()
    cfg = mixer.config
    reference = Mamba2(
        d_model=HIDDEN, d_state=HEAD_DIM, d_conv=cfg.d_conv, expand=HEADS * HEAD_DIM // HIDDEN, headdim=HEAD_DIM,
        ngroups=HEADS, chunk_size=16, device="cuda", dtype=torch.float32,
    )
    reference.load_state_dict(full_width_state_dict(mixer), strict=True)
    u = torch.randn(2, 40, HIDDEN, device="cuda", generator=torch.Generator(device="cuda").manual_seed(4))
    with torch.no_grad():
        expected, got = reference(u), mixer(u)
    assert (got - expected).abs().max() / expected.abs().max() < 1e-3
