"""Seed a Mamba-2 mixer from a trained attention layer (mmMamba sec. 4.1, MaTVLM sec. 3.2).

Attention without softmax is a linear RNN, S_t = S_{t-1} + v_t k_t^T, y_t = S_t q_t, so the mixer's
x, B, C projections (``in_proj_x``, ``in_proj_B``, ``in_proj_C`` of the split layout) take W_V, W_K, W_Q,
out_proj takes W_O, heads and head_dim are kept, d_state = head_dim and every head has its own C
(n_groups = heads). With grouped-query attention x and B stay at key/value width and their
activations are repeated to the query heads (``num_xb_heads``), as the public mmMamba, MaTVLM and
MambaInLlama code does: no copied weights that would drift apart once trained, no extra parameters.
The modes differ in what the rest of the layer is:

- ``"mmmamba"`` (inherit + mimic): decay gamma_t = exp(-softplus(u W_gamma + dt_bias) exp(a)) with
  W_gamma (``in_proj_dt``) = 0, a = 1, softplus(dt_bias) log-uniform in [1e-3, 1e-1] (gamma near 1);
  a causal conv initialised to the identity (current-token tap 1); gate W_G (``in_proj_z``)
  xavier-uniform with gain 2^-2.5; no D; the gated norm as mmMamba's code has it: RMSNorm per head with
  one weight shared by the heads, before the gate. Departures from mmMamba's public code, on purpose
  (the paper's Eq. 2 and the identity it starts from): the input is not scaled by dt
  (S_t = gamma_t S_{t-1} + v_t k_t^T; the code scans x = v with dt), no SiLU after the conv (the code
  has one), and 4 conv taps (the code has 2). ``mixer_options={"dt_scales_input": True,
  "conv_activation": "silu", "d_conv": 2}`` gives the code's choices.
- ``"matvlm"``: x, B, C (and out_proj, as MaTVLM's code does) from V, K, Q (and O); everything else a
  fresh mamba_ssm ``Mamba2`` layer, as MaTVLM's code builds it: dt log-uniform in [1e-3, 1e-1],
  A_log = log U[1, 16], conv with SiLU, D = 1, input scaled by dt, the gate applied before the RMSNorm
  (per head: groups of d_inner / n_groups) with one weight per channel.

Where the attention has biases (W_V, W_K, W_Q), the mixer's input projections have biases and the
gate's and dt's start at 0.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from mambavlm.llm.mamba2 import Mamba2Mixer, Mamba2MixerConfig

__all__ = ["SEEDING_MODES", "linear_attention_reference", "mixer_config_for", "seed_mamba2_from_attention"]

SeedingMode = Literal["mmmamba", "matvlm"]

SEEDING_MODES: dict[str, dict[str, Any]] = {
    "mmmamba": {
        "conv_activation": None,
        "use_D": False,
        "dt_scales_input": False,
        "norm_before_gate": True,
        "norm_weight_shared": True,
    },
    "matvlm": {"norm_before_gate": False},
}
"""Mamba2MixerConfig options each mode sets beyond the attention's shape (the rest are mamba_ssm's)."""
SHAPE_FIELDS = frozenset({"hidden_size", "num_heads", "head_dim", "d_state", "n_groups", "num_xb_heads",
                          "fused_projection", "in_proj_bias", "out_proj_bias"})
"""What the attention decides; ``mixer_options`` may set any other Mamba2MixerConfig field."""

_MMMAMBA_GATE_GAIN = 2**-2.5


def _attention_shape(attn: nn.Module) -> tuple[int, int, int, int]:
    """(hidden_size, num_heads, num_kv_heads, head_dim) of ``attn``, checked against its projections."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    missing = [name for name in names if not isinstance(getattr(attn, name, None), nn.Linear)]
    if missing:
        raise TypeError(
            f"{type(attn).__name__} has no nn.Linear {', '.join(missing)}; expected a LlamaAttention-like module"
        )
    config = getattr(attn, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int) or heads <= 0:
        raise ValueError(f"{type(attn).__name__}.config.num_attention_heads must be a positive int, got {heads!r}")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = attn.q_proj.in_features
    head_dim = getattr(config, "head_dim", None) or attn.q_proj.out_features // heads
    if heads % kv_heads != 0:
        raise ValueError(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
    expected = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
    }
    for name, (fan_in, fan_out) in expected.items():
        linear = getattr(attn, name)
        if (linear.in_features, linear.out_features) != (fan_in, fan_out):
            raise ValueError(
                f"{name} maps {linear.in_features} -> {linear.out_features}, expected {fan_in} -> {fan_out} "
                f"for {heads} heads, {kv_heads} key/value heads of dim {head_dim}"
            )
    return hidden, heads, kv_heads, head_dim


def _copy_linear(target: nn.Linear, source: nn.Linear) -> None:
    """target <- source (weight, and bias or zeros where only the target has one)."""
    target.weight.copy_(source.weight)
    if target.bias is not None:
        target.bias.copy_(source.bias) if source.bias is not None else target.bias.zero_()


def _mimic_init(mixer: Mamba2Mixer, generator: torch.Generator | None) -> None:
    """mmMamba's init of the parameters attention lacks, so the layer starts as near-linear attention.

    dt_bias keeps the fresh draw (softplus(dt_bias) log-uniform in [1e-3, 1e-1]), which is mmMamba's too.
    """
    mixer.in_proj_dt.weight.zero_()
    mixer.A_log.fill_(1.0)
    if mixer.conv1d is not None:
        mixer.conv1d.weight.zero_()
        mixer.conv1d.weight[:, 0, -1] = 1.0
        if mixer.conv1d.bias is not None:
            mixer.conv1d.bias.zero_()
    gate = torch.empty(mixer.in_proj_z.weight.shape, device=generator.device if generator is not None else None)
    nn.init.xavier_uniform_(gate, gain=_MMMAMBA_GATE_GAIN, generator=generator)
    mixer.in_proj_z.weight.copy_(gate)


def mixer_config_for(attn: nn.Module, mode: SeedingMode, mixer_options: dict[str, Any] | None = None) -> Mamba2MixerConfig:
    """The ``Mamba2MixerConfig`` a seeded mixer of ``attn`` gets in ``mode``, with ``mixer_options``
    (other Mamba2MixerConfig fields) overriding the mode's. Raises ValueError for an unknown mode or
    option, or an option the attention's shape decides."""
    if mode not in SEEDING_MODES:
        raise ValueError(f"unknown seeding mode {mode!r}; expected one of {sorted(SEEDING_MODES)}")
    options = dict(mixer_options or {})
    known = set(Mamba2MixerConfig.__dataclass_fields__) - SHAPE_FIELDS
    bad = sorted(set(options) - known)
    if bad:
        raise ValueError(f"mixer options {bad} cannot be set: choose among {sorted(known)}")
    hidden, heads, kv_heads, head_dim = _attention_shape(attn)
    return Mamba2MixerConfig(
        hidden_size=hidden,
        num_heads=heads,
        head_dim=head_dim,
        d_state=head_dim,
        n_groups=heads,
        num_xb_heads=kv_heads if kv_heads != heads else None,
        fused_projection=False,
        in_proj_bias=any(getattr(attn, name).bias is not None for name in ("q_proj", "k_proj", "v_proj")),
        out_proj_bias=attn.o_proj.bias is not None,
        **{**SEEDING_MODES[mode], **options},
    )


@torch.no_grad()
def seed_mamba2_from_attention(
    attn: nn.Module,
    mode: SeedingMode,
    generator: torch.Generator | None = None,
    mixer_options: dict[str, Any] | None = None,
) -> Mamba2Mixer:
    """A ``Mamba2Mixer`` seeded from ``attn`` (a transformers LlamaAttention or any module with
    q_proj/k_proj/v_proj/o_proj and ``config.num_attention_heads`` / ``num_key_value_heads`` /
    ``head_dim``), on the attention's device and dtype. ``generator`` drives the random draws;
    ``mixer_options`` override the mode's mixer options (see ``mixer_config_for``).

    The attention is only read; the mixer owns copies. RoPE is not carried over (there are no
    positions in a recurrence); the attention's 1/sqrt(head_dim) score scale is not either.
    """
    config = mixer_config_for(attn, mode, mixer_options)
    weight = attn.q_proj.weight
    mixer = Mamba2Mixer(config, device=weight.device, dtype=weight.dtype, generator=generator)
    for target, source in ((mixer.in_proj_x, attn.v_proj), (mixer.in_proj_B, attn.k_proj), (mixer.in_proj_C, attn.q_proj)):
        _copy_linear(target, source)
    _copy_linear(mixer.out_proj, attn.o_proj)
    if config.in_proj_bias:
        mixer.in_proj_z.bias.zero_()
        mixer.in_proj_dt.bias.zero_()
    if mode == "mmmamba":
        _mimic_init(mixer, generator)
    return mixer


def linear_attention_reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal linear attention, no softmax, no scaling: y_t = sum_{s <= t} (q_t . k_s) v_s.

    q, k (B, H, L, N), v (B, H, L, P) -> y (B, H, L, P), computed as a masked L x L product.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"expected q, k (B, H, L, N) and v (B, H, L, P), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    length = q.shape[2]
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    scores = (q @ k.transpose(-1, -2)).masked_fill(~causal, 0.0)
    return scores @ v
