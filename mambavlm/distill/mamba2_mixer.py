"""A Mamba-2 sequence mixer whose projections line up one to one with an attention layer's.

Per token u_t (hidden,), heads h = 1..H of P channels and a state of N per head:

    x_t = u_t W_x (H, P)      B_t = u_t W_B (H, N)      C_t = u_t W_C (H, N)      [<- W_V, W_K, W_Q]
    (x_t, B_t, C_t) <- causal depthwise conv over the concatenation (optional, d_conv taps)
    dt_t = softplus(u_t W_gamma + dt_bias) (H,)       gamma_t = exp(-dt_t exp(a))  per head
    S_t = gamma_t S_{t-1} + s_t x_t B_t^T  (P, N)     y_t = S_t C_t + D x_t
    out_t = (RMSNorm(y_t) * SiLU(u_t W_G)) W_O        [gate optional; W_O <- the attention's W_O]

with input scale s_t = dt_t (Mamba-2, ``dt_scales_input``) or 1 (mmMamba's Eq. 2). Unlike mamba_ssm's
``Mamba2`` (one fused in_proj), every projection is its own ``nn.Linear`` so that seeding copies
attention weights straight in (``mambavlm.distill.seeding``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from mambavlm.ops.causal_conv1d import causal_conv1d, causal_conv1d_state, causal_conv1d_update
from mambavlm.ops.dispatch import use_kernels
from mambavlm.ops.ssd import ssd_scan, ssd_step

__all__ = ["Mamba2Constants", "Mamba2LayerCache", "Mamba2Mixer", "Mamba2MixerConfig", "inverse_softplus"]


@dataclass(frozen=True)
class Mamba2MixerConfig:
    """Shape and options of a ``Mamba2Mixer``; the defaults are a fresh Mamba-2 layer's.

    hidden_size: model width. num_heads (H), head_dim (P): the SSM heads; d_state (N): state per head.
    d_conv: taps of the causal conv over (x, B, C), used when ``use_conv``; conv_activation follows it.
    use_gate: output y = RMSNorm(y) * SiLU(u W_G) per head (else y goes straight to out_proj).
    use_D: skip term D x. dt_scales_input: S_t = gamma_t S_{t-1} + dt_t x_t B_t^T (Mamba-2) when
    True, + x_t B_t^T (mmMamba Eq. 2, attention without softmax) when False.
    xbc_bias / out_bias: biases on the x, B, C projections / on out_proj (attention layers with biases).
    chunk_size: SSD chunk length. rms_eps: the gate's RMSNorm epsilon.
    """

    hidden_size: int
    num_heads: int
    head_dim: int
    d_state: int
    d_conv: int = 4
    use_conv: bool = True
    conv_activation: Literal["silu"] | None = "silu"
    use_gate: bool = True
    use_D: bool = True
    dt_scales_input: bool = True
    xbc_bias: bool = False
    out_bias: bool = False
    chunk_size: int = 64
    rms_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_heads", "head_dim", "d_state", "d_conv", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Mamba2MixerConfig.{name} must be a positive int, got {value!r}")
        if self.conv_activation not in (None, "silu"):
            raise ValueError(f"Mamba2MixerConfig.conv_activation must be None or 'silu', got {self.conv_activation!r}")
        if not self.rms_eps > 0:
            raise ValueError(f"Mamba2MixerConfig.rms_eps must be positive, got {self.rms_eps!r}")

    @property
    def inner_size(self) -> int:
        """Width of x and of the mixer output before out_proj: H * P."""
        return self.num_heads * self.head_dim

    @property
    def conv_channels(self) -> int:
        """Channels of the conv over concat(x, B, C): H * P + 2 * H * N."""
        return self.inner_size + 2 * self.num_heads * self.d_state


@dataclass
class Mamba2Constants:
    """What a Mamba2Mixer derives from its weights for every token, computed once per generation.

    A = -exp(A_log) (H,), dt_bias (H,), D (H,) or None, and the gate norm's weight repeated per head
    (H * P,) or None, all float32.
    """

    A: Tensor
    dt_bias: Tensor
    D: Tensor | None
    norm_weight: Tensor | None

    def copy_(self, other: Mamba2Constants) -> None:
        """Overwrite these tensors in place with ``other``'s (a CUDA graph keeps reading these)."""
        for name in ("A", "dt_bias", "D", "norm_weight"):
            mine = getattr(self, name)
            if mine is not None:
                mine.copy_(getattr(other, name))


@dataclass
class Mamba2LayerCache:
    """Decoding state of one ``Mamba2Mixer``, updated in place by its forward/step.

    conv_state (B, conv_channels, d_conv): the conv's last d_conv inputs, oldest first (width 0 when the
    mixer has no conv). ssm_state (B, H, P, N): the SSM state S after the last token seen.
    """

    conv_state: Tensor
    ssm_state: Tensor

    @classmethod
    def zeros(
        cls,
        batch: int,
        config: Mamba2MixerConfig,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Mamba2LayerCache:
        """The state before the first token: all zeros."""
        width = config.d_conv if config.use_conv else 0
        return cls(
            conv_state=torch.zeros(batch, config.conv_channels, width, device=device, dtype=dtype),
            ssm_state=torch.zeros(
                batch, config.num_heads, config.head_dim, config.d_state, device=device, dtype=dtype
            ),
        )


_UNSCALED_MIN_DT = 1e-6


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None) -> Tensor:
    """float32 draws from U[low, high), on the generator's device (CPU without one)."""
    device = generator.device if generator is not None else None
    return torch.rand(shape, generator=generator, device=device) * (high - low) + low


def inverse_softplus(x: Tensor) -> Tensor:
    """y with softplus(y) = x, for x > 0."""
    return x + torch.log(-torch.expm1(-x))


class Mamba2Mixer(nn.Module):
    """Mamba-2 token mixer with separate x/B/C/gate/dt projections: (B, L, hidden) -> (B, L, hidden).

    Parameters: x_proj, B_proj, C_proj, gate_proj (hidden -> H*P / H*N), dt_proj (hidden -> H, W_gamma),
    dt_bias (H,), A_log (H,) (``a``: decay rate exp(a)), D (H,), conv1d (depthwise over concat(x, B, C)),
    norm_weight (P,) of the gate's RMSNorm, out_proj (H*P -> hidden). Freshly built it carries
    mamba_ssm's ``Mamba2`` initialisation; ``generator`` makes those draws reproducible.
    """

    def __init__(
        self,
        config: Mamba2MixerConfig,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        factory = {"device": device, "dtype": dtype}
        hidden, heads, inner = config.hidden_size, config.num_heads, config.inner_size
        self.x_proj = nn.Linear(hidden, inner, bias=config.xbc_bias, **factory)
        self.B_proj = nn.Linear(hidden, heads * config.d_state, bias=config.xbc_bias, **factory)
        self.C_proj = nn.Linear(hidden, heads * config.d_state, bias=config.xbc_bias, **factory)
        self.dt_proj = nn.Linear(hidden, heads, bias=False, **factory)
        self.dt_bias = nn.Parameter(torch.empty(heads, **factory))
        self.A_log = nn.Parameter(torch.empty(heads, **factory))
        self.D = nn.Parameter(torch.empty(heads, **factory)) if config.use_D else None
        # Holds the depthwise weights (C, 1, W) and bias; applied through ops.causal_conv1d.
        self.conv1d = (
            nn.Conv1d(config.conv_channels, config.conv_channels, config.d_conv, groups=config.conv_channels, **factory)
            if config.use_conv
            else None
        )
        self.gate_proj = nn.Linear(hidden, inner, bias=False, **factory) if config.use_gate else None
        self.norm_weight = nn.Parameter(torch.empty(config.head_dim, **factory)) if config.use_gate else None
        self.out_proj = nn.Linear(inner, hidden, bias=config.out_bias, **factory)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """mamba_ssm ``Mamba2`` init: linear and conv weights U(+-1/sqrt(fan_in)) (PyTorch's default),
        dt = softplus(dt_bias) log-uniform in [1e-3, 1e-1] (floor 1e-4), A = exp(A_log) ~ U[1, 16], D = 1.
        """
        linears = [self.x_proj, self.B_proj, self.C_proj, self.dt_proj, self.gate_proj, self.out_proj]
        for module in [m for m in linears if m is not None] + ([self.conv1d] if self.conv1d is not None else []):
            fan_in = module.weight[0].numel()
            bound = 1.0 / math.sqrt(fan_in)
            module.weight.copy_(_uniform(tuple(module.weight.shape), -bound, bound, generator))
            if module.bias is not None:
                module.bias.copy_(_uniform(tuple(module.bias.shape), -bound, bound, generator))
        heads = self.config.num_heads
        dt = torch.exp(_uniform((heads,), math.log(1e-3), math.log(1e-1), generator)).clamp(min=1e-4)
        self.dt_bias.copy_(inverse_softplus(dt))
        self.A_log.copy_(torch.log(_uniform((heads,), 1.0, 16.0, generator)))
        if self.D is not None:
            self.D.fill_(1.0)
        if self.norm_weight is not None:
            self.norm_weight.fill_(1.0)

    def _project_xbc(self, u: Tensor) -> Tensor:
        """u (..., hidden) -> concat(x, B, C) (..., conv_channels)."""
        return torch.cat([self.x_proj(u), self.B_proj(u), self.C_proj(u)], dim=-1)

    def _split_xbc(self, xbc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(..., conv_channels) -> x (..., H, P), B (..., H, N), C (..., H, N)."""
        cfg = self.config
        x, B, C = xbc.split([cfg.inner_size, cfg.num_heads * cfg.d_state, cfg.num_heads * cfg.d_state], dim=-1)
        return (
            x.unflatten(-1, (cfg.num_heads, cfg.head_dim)),
            B.unflatten(-1, (cfg.num_heads, cfg.d_state)),
            C.unflatten(-1, (cfg.num_heads, cfg.d_state)),
        )

    def constants(self) -> Mamba2Constants:
        """The per-token constants of the current weights (see ``Mamba2Constants``)."""
        cfg = self.config
        norm_weight = None
        if self.norm_weight is not None:
            norm_weight = self.norm_weight.float().repeat(cfg.num_heads)
        return Mamba2Constants(
            A=-torch.exp(self.A_log.float()),
            dt_bias=self.dt_bias.float(),
            D=None if self.D is None else self.D.float(),
            norm_weight=norm_weight,
        )

    def _scan_inputs(self, u: Tensor, x: Tensor, consts: Mamba2Constants) -> tuple[Tensor, Tensor]:
        """(x to scan, dt) for ssd_scan/ssd_step with A = consts.A; their update is exp(dt A) S + dt x B^T.

        dt = softplus(u W_gamma + dt_bias) and A = -exp(a) give the decay exp(dt A) = gamma. Without
        ``dt_scales_input`` (mmMamba: S_t = gamma_t S_{t-1} + x_t B_t^T) x / dt is scanned, so that the
        scan's dt * (x / dt) puts x in unscaled while the decay stays gamma; there dt is floored at
        1e-6 (gamma within 1e-6 * exp(a) of 1) to keep x / dt finite. u (..., hidden), x (..., H, P).
        """
        dt = F.softplus(self.dt_proj(u).float() + consts.dt_bias)
        if self.config.dt_scales_input:
            return x, dt
        dt = dt.clamp_min(_UNSCALED_MIN_DT)
        return (x / dt[..., None]).to(x.dtype), dt

    def _output(self, y: Tensor, x: Tensor, u: Tensor, consts: Mamba2Constants) -> Tensor:
        """D skip, gated RMSNorm and out_proj: y, x (..., H, P), u (..., hidden) -> (..., hidden).

        The gate is RMSNorm(y) per head * SiLU(u W_G), in float32; on CUDA with mamba_ssm installed
        it is mamba_ssm's fused gated-RMSNorm kernel (the same formula, one kernel).
        """
        if consts.D is not None:
            y = (y + x * consts.D[:, None]).to(y.dtype)
        y = rearrange(y, "... h p -> ... (h p)")
        if self.gate_proj is not None:
            gate = self.gate_proj(u)
            if use_kernels(y, "mamba_ssm"):
                from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn

                y = rmsnorm_fn(
                    y, consts.norm_weight, None, z=gate, eps=self.config.rms_eps,
                    group_size=self.config.head_dim, norm_before_gate=True,
                )
            else:
                heads = (self.config.num_heads, self.config.head_dim)
                normed = F.rms_norm(y.float().unflatten(-1, heads), (self.config.head_dim,), eps=self.config.rms_eps)
                y = normed.flatten(-2) * consts.norm_weight * F.silu(gate.float())
        return self.out_proj(y.to(self.out_proj.weight.dtype))

    def _check_input(self, hidden_states: Tensor) -> None:
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"hidden_states must be (batch, length, {self.config.hidden_size}), got {tuple(hidden_states.shape)}"
            )

    def forward(self, hidden_states: Tensor, cache: Mamba2LayerCache | None = None) -> Tensor:
        """hidden_states (B, L, hidden) -> (B, L, hidden).

        With a cache the sequence continues from its state (zeros = a fresh prefill) and the cache is
        left holding the state after the last token; one token with a cache goes to ``step``.
        """
        self._check_input(hidden_states)
        length = hidden_states.shape[1]
        if cache is not None and length == 1:
            return self.step(hidden_states, cache)
        consts = self.constants()
        xbc = self._project_xbc(hidden_states)
        if self.conv1d is not None:
            xbc_t = xbc.transpose(1, 2)
            if cache is not None:
                # Prepending the cached last d_conv - 1 inputs continues the conv across calls.
                xbc_t = torch.cat([cache.conv_state[..., 1:].to(xbc_t.dtype), xbc_t], dim=-1)
                cache.conv_state.copy_(causal_conv1d_state(xbc_t, self.config.d_conv))
            weight = self.conv1d.weight.squeeze(1)
            xbc = causal_conv1d(xbc_t, weight, self.conv1d.bias, self.config.conv_activation)[..., -length:]
            xbc = xbc.transpose(1, 2)
        x, B, C = self._split_xbc(xbc)
        x_scan, dt = self._scan_inputs(hidden_states, x, consts)
        A = consts.A
        if cache is None:
            y = ssd_scan(x_scan, dt, A, B, C, chunk_size=self.config.chunk_size)
        else:
            y, final_state = ssd_scan(
                x_scan,
                dt,
                A,
                B,
                C,
                initial_state=cache.ssm_state,
                return_final_state=True,
                chunk_size=self.config.chunk_size,
            )
            cache.ssm_state.copy_(final_state)
        return self._output(y, x, hidden_states, consts)

    def step(
        self, hidden_states: Tensor, cache: Mamba2LayerCache, consts: Mamba2Constants | None = None
    ) -> Tensor:
        """Decode one token: hidden_states (B, 1, hidden) -> (B, 1, hidden); the cache advances in place.

        ``consts``: ``self.constants()`` computed once for many steps (a static decoder keeps them);
        computed here when None.
        """
        self._check_input(hidden_states)
        if hidden_states.shape[1] != 1:
            raise ValueError(f"step takes one token, got hidden_states of length {hidden_states.shape[1]}")
        u = hidden_states[:, 0]
        xbc = self._project_xbc(u)
        if self.conv1d is not None:
            weight = self.conv1d.weight.squeeze(1)
            xbc = causal_conv1d_update(xbc, cache.conv_state, weight, self.conv1d.bias, self.config.conv_activation)
        x, B, C = self._split_xbc(xbc)
        consts = self.constants() if consts is None else consts
        x_scan, dt = self._scan_inputs(u, x, consts)
        y = ssd_step(cache.ssm_state, x_scan, dt, consts.A, B, C)
        return self._output(y, x, u, consts).unsqueeze(1)
