"""The Mamba-2 mixer: one module, its parameters, its state, one prefill and one step.

As mamba_ssm's ``modules/mamba2.py``, per token u_t (hidden,), H heads of P channels (d_inner = H * P),
G groups sharing B and C of N states each:

    z_t, x_t, B_t, C_t, dt_t = in_proj(u_t)           z (d_inner) gate, x (d_inner), B, C (G * N), dt (H)
    (x_t, B_t, C_t) <- act(causal depthwise conv over concat(x, B, C))         [use_conv]
    dt_t = clamp(softplus(dt_t + dt_bias), dt_limit)    A = -exp(A_log) (H,)
    S_t = exp(dt_t A) S_{t-1} + s_t x_t B_t^T  (P, N) per head         y_t = S_t C_t + D x_t
    out_t = out_proj(gated_rmsnorm(y_t, z_t))

with input scale s_t = dt_t (Mamba-2, ``dt_scales_input``) or 1 (mmMamba's Eq. 2: attention without
softmax plus a decay). The gated RMSNorm normalises in groups of d_inner / G channels, after the gate
(mamba_ssm's default, y * SiLU(z) then RMSNorm) or before it (``norm_before_gate``).

Two layouts of the input projection, the same quantities:

- ``fused_projection=True``: one ``in_proj`` whose rows are [z, x, B, C, dt], mamba_ssm's and
  transformers' ``Mamba2Mixer`` parameter names and shapes, so their checkpoints load as they are;
- ``fused_projection=False``: the five pieces as their own ``nn.Linear``s (``in_proj_z``, ``in_proj_x``,
  ``in_proj_B``, ``in_proj_C``, ``in_proj_dt``), so that seeding from attention copies W_V, W_K, W_Q
  straight into x, B, C and each distillation stage can train a subset (``mambavlm.distill``).

Every caller uses the same two computations: ``forward`` (a training forward; with a ``Mamba2State`` a
prefill that continues from and updates it) and ``step`` (one decoding token on the state in place).
transformers-style cached generation (``HybridCache``), the static CUDA-graph decoder and training all
run through them. Left padding is masked, as transformers' Mamba-2 does it: pad positions get zero
input and dt = 0 (no decay), so a padded row gives what it gives alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambavlm.ops.causal_conv1d import causal_conv1d, causal_conv1d_state, causal_conv1d_update
from mambavlm.ops.dispatch import DISABLE_KERNELS_ENV, triton_runs_on, use_kernels
from mambavlm.ops.mamba2_step import mamba2_ssm_step
from mambavlm.ops.ssd import ssd_scan, ssd_step

__all__ = ["Mamba2Mixer", "Mamba2MixerConfig", "Mamba2State", "gated_rms_norm", "inverse_softplus"]

UNSCALED_MIN_DT = 1e-6
"""Floor of dt where the input is not scaled by it (x / dt is scanned): keeps x / dt finite."""


@dataclass(frozen=True)
class Mamba2MixerConfig:
    """Shape and options of a ``Mamba2Mixer``; the defaults are mamba_ssm's ``Mamba2``.

    hidden_size: model width. num_heads (H), head_dim (P): the SSM heads, d_inner = H * P. d_state (N):
    state per head. n_groups (G): heads sharing B and C (H must be a multiple).
    d_conv: taps of the causal conv over (x, B, C) when ``use_conv``; conv_activation after it;
    conv_bias: the conv has a bias. use_gate: gated RMSNorm before out_proj (needs the split layout
    when False); norm_before_gate: RMSNorm(y) * SiLU(z) instead of RMSNorm(y * SiLU(z)); the RMS is
    taken over groups of d_inner / G channels (mamba_ssm's rule: one head when G = H);
    norm_weight_shared: one weight of P per head shared by all heads (mmMamba's code) instead of
    mamba_ssm's one per channel (d_inner).
    num_xb_heads: heads of x and B before they are repeated to the H heads (grouped-query attention
    seeded as it is: x <- W_V, B <- W_K at key/value width, head h reading KV head h // (H / K), as
    transformers' ``repeat_kv``, the public MambaInLlama / MaTVLM / mmMamba code); None: H. Needs the
    split layout and G = H.
    use_D: skip term D x. dt_scales_input: S_t = gamma S + dt x B^T (True) or + x B^T (False).
    dt_limit: (low, high) clamp of dt after the softplus. in_proj_bias / out_proj_bias: biases.
    fused_projection: one in_proj (True) or five (False), see the module docstring.
    chunk_size: SSD chunk length of the scan. rms_eps: the gated RMSNorm's epsilon.
    """

    hidden_size: int
    num_heads: int
    head_dim: int
    d_state: int
    n_groups: int = 1
    d_conv: int = 4
    use_conv: bool = True
    conv_activation: Literal["silu"] | None = "silu"
    conv_bias: bool = True
    use_gate: bool = True
    norm_before_gate: bool = False
    use_D: bool = True
    dt_scales_input: bool = True
    dt_limit: tuple[float, float] = (0.0, math.inf)
    in_proj_bias: bool = False
    out_proj_bias: bool = False
    fused_projection: bool = True
    chunk_size: int = 256
    rms_eps: float = 1e-5
    norm_weight_shared: bool = False
    num_xb_heads: int | None = None

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_heads", "head_dim", "d_state", "n_groups", "d_conv", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Mamba2MixerConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.n_groups:
            raise ValueError(
                f"Mamba2MixerConfig.num_heads ({self.num_heads}) must be a multiple of n_groups ({self.n_groups})"
            )
        if self.conv_activation not in (None, "silu"):
            raise ValueError(f"Mamba2MixerConfig.conv_activation must be None or 'silu', got {self.conv_activation!r}")
        if not self.rms_eps > 0:
            raise ValueError(f"Mamba2MixerConfig.rms_eps must be positive, got {self.rms_eps!r}")
        low, high = self.dt_limit
        if not 0 <= low < high:
            raise ValueError(f"Mamba2MixerConfig.dt_limit must be (low, high) with 0 <= low < high, got {self.dt_limit}")
        if self.fused_projection and not self.use_gate:
            raise ValueError("Mamba2MixerConfig: the fused in_proj always holds the gate z; use_gate=False needs "
                             "fused_projection=False")
        if self.num_xb_heads is not None:
            heads, xb = self.num_heads, self.num_xb_heads
            if self.fused_projection or self.n_groups != heads or xb <= 0 or heads % xb:
                raise ValueError(
                    f"Mamba2MixerConfig.num_xb_heads={xb} needs fused_projection=False, n_groups = num_heads "
                    f"({self.n_groups} vs {heads}) and num_heads a multiple of it"
                )
        object.__setattr__(self, "dt_limit", (float(low), float(high)))

    @property
    def d_inner(self) -> int:
        """Width of x, of the gate z and of the mixer output before out_proj: H * P."""
        return self.num_heads * self.head_dim

    @property
    def xb_heads(self) -> int:
        """Heads of x and B as projected (K): ``num_xb_heads``, or H."""
        return self.num_xb_heads or self.num_heads

    @property
    def b_groups(self) -> int:
        """Groups of B as projected (K'): K when x and B are at key/value width, else G."""
        return self.xb_heads if self.num_xb_heads is not None else self.n_groups

    @property
    def conv_dim(self) -> int:
        """Channels of concat(x, B, C) as projected, the conv's input: K * P + K' * N + G * N
        (mamba_ssm: d_inner + 2 * G * N)."""
        return self.xb_heads * self.head_dim + (self.b_groups + self.n_groups) * self.d_state


@dataclass
class Mamba2State:
    """Decoding state of one ``Mamba2Mixer`` for a batch: updated in place by prefill and step.

    conv (B, conv_dim, d_conv): the conv's last d_conv inputs, oldest first, in the activations' dtype
    (width 0 without a conv). ssm (B, H, P, N): the SSM state after the last token seen, float32.
    A = -exp(A_log), dt_bias, D (H,): float32 copies of the weights a step reads, written at allocation
    and by every prefill (D is zeros without a skip), so that a step does not recompute them per token.
    The tensors keep their storage (a CUDA graph reads their addresses), like mamba_ssm's
    ``allocate_inference_cache``.
    """

    conv: Tensor
    ssm: Tensor
    A: Tensor
    dt_bias: Tensor
    D: Tensor

    @property
    def batch_size(self) -> int:
        return self.ssm.shape[0]

    def zero_(self) -> None:
        """Zero conv and ssm in place (the constants are kept; ``Mamba2Mixer.reset_state`` refreshes them)."""
        self.conv.zero_()
        self.ssm.zero_()

    def map_(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Replace conv and ssm by ``fn`` of them (beam reordering, batch selection or repetition)."""
        self.conv = fn(self.conv)
        self.ssm = fn(self.ssm)


def fused_step_runs(xbc: Tensor) -> bool:
    """Whether ``Mamba2Mixer.step`` runs its state update as one Triton kernel on ``xbc`` (the conv
    output): Triton runs on it (CUDA, or the interpreter), kernels are not disabled
    (``MAMBAVLM_DISABLE_KERNELS``), and no gradient is asked for (the kernel has no backward)."""
    if torch.is_grad_enabled() and xbc.requires_grad:
        return False
    return triton_runs_on(xbc) and os.environ.get(DISABLE_KERNELS_ENV) != "1"


def inverse_softplus(x: Tensor) -> Tensor:
    """y with softplus(y) = x, for x > 0."""
    return x + torch.log(-torch.expm1(-x))


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator | None) -> Tensor:
    """float32 draws from U[low, high), on the generator's device (CPU without one)."""
    device = generator.device if generator is not None else None
    return torch.rand(shape, generator=generator, device=device) * (high - low) + low


def gated_rms_norm(
    y: Tensor, z: Tensor | None, weight: Tensor, eps: float, group_size: int, norm_before_gate: bool
) -> Tensor:
    """mamba_ssm's ``RMSNormGated``: y, z (..., D), weight (D,) -> (..., D) in y's dtype.

    norm_before_gate: RMSNorm(y) * weight * SiLU(z); else RMSNorm(y * SiLU(z)) * weight; the RMS is
    taken over groups of ``group_size`` channels, in float32. On CUDA with mamba_ssm installed, its
    fused Triton kernel (the same formula).
    """
    if use_kernels(y, "mamba_ssm"):
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn

        return rmsnorm_fn(y, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate)
    out = y.float()
    gate = None if z is None else F.silu(z.float())
    if gate is not None and not norm_before_gate:
        out = out * gate
    out = F.rms_norm(out.unflatten(-1, (-1, group_size)), (group_size,), eps=eps).flatten(-2) * weight.float()
    if gate is not None and norm_before_gate:
        out = out * gate
    return out.to(y.dtype)


class _GatedNorm(nn.Module):
    """Holds the gated RMSNorm's weight as ``norm.weight``, mamba_ssm's parameter name: (d_inner,), or
    (P,) shared by the heads."""

    def __init__(self, width: int, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width, device=device, dtype=dtype))


class Mamba2Mixer(nn.Module):
    """Mamba-2 token mixer: (B, L, hidden) -> (B, L, hidden).

    Parameters (mamba_ssm's names): the input projection (``in_proj``, or ``in_proj_z`` / ``_x`` / ``_B`` /
    ``_C`` / ``_dt``), ``conv1d`` (depthwise over concat(x, B, C); its weight (conv_dim, 1, d_conv)),
    ``dt_bias``, ``A_log``, ``D`` (H,), ``norm.weight`` (d_inner,), ``out_proj``. Freshly built it carries
    mamba_ssm's ``Mamba2`` initialisation; ``generator`` makes the draws reproducible.
    """

    zero3_leaf: ClassVar[bool] = True
    """The forward hands ``conv1d.weight`` and ``norm.weight`` to the conv and gated-norm functions
    without calling those submodules: DeepSpeed ZeRO-3 gathers the whole mixer in its forward."""

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
        cfg = config
        bias = cfg.in_proj_bias
        if cfg.fused_projection:
            self.in_proj = nn.Linear(cfg.hidden_size, cfg.d_inner + cfg.conv_dim + cfg.num_heads, bias=bias, **factory)
        else:
            group_width = cfg.n_groups * cfg.d_state
            self.in_proj_z = nn.Linear(cfg.hidden_size, cfg.d_inner, bias=bias, **factory) if cfg.use_gate else None
            self.in_proj_x = nn.Linear(cfg.hidden_size, cfg.xb_heads * cfg.head_dim, bias=bias, **factory)
            self.in_proj_B = nn.Linear(
                cfg.hidden_size, cfg.xb_heads * cfg.d_state if cfg.num_xb_heads else group_width, bias=bias, **factory
            )
            self.in_proj_C = nn.Linear(cfg.hidden_size, group_width, bias=bias, **factory)
            self.in_proj_dt = nn.Linear(cfg.hidden_size, cfg.num_heads, bias=bias, **factory)
        self.conv1d = (
            nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.d_conv, groups=cfg.conv_dim, bias=cfg.conv_bias, **factory)
            if cfg.use_conv
            else None
        )
        self.dt_bias = nn.Parameter(torch.empty(cfg.num_heads, **factory))
        self.A_log = nn.Parameter(torch.empty(cfg.num_heads, **factory))
        self.D = nn.Parameter(torch.empty(cfg.num_heads, **factory)) if cfg.use_D else None
        norm_width = cfg.head_dim if cfg.norm_weight_shared else cfg.d_inner
        self.norm = _GatedNorm(norm_width, device, dtype) if cfg.use_gate else None
        self.out_proj = nn.Linear(cfg.d_inner, cfg.hidden_size, bias=cfg.out_proj_bias, **factory)
        for param in (self.dt_bias, self.A_log, self.D):
            if param is not None:
                param._no_weight_decay = True  # mamba_ssm's convention
        if self.dt_bias.device.type != "meta":
            self.reset_parameters(generator)

    # ------------------------------------------------------------------------------- parameters

    def projections(self) -> list[nn.Linear]:
        """The input projection(s): ``[in_proj]``, or the split pieces that exist."""
        if self.config.fused_projection:
            return [self.in_proj]
        pieces = [self.in_proj_z, self.in_proj_x, self.in_proj_B, self.in_proj_C, self.in_proj_dt]
        return [p for p in pieces if p is not None]

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """mamba_ssm ``Mamba2`` init: linear and conv weights U(+-1/sqrt(fan_in)) (PyTorch's default),
        dt = softplus(dt_bias) log-uniform in [1e-3, 1e-1] (floor 1e-4), A = exp(A_log) ~ U[1, 16], D = 1,
        norm weight 1.
        """
        modules = self.projections() + [self.out_proj] + ([self.conv1d] if self.conv1d is not None else [])
        for module in modules:
            bound = 1.0 / math.sqrt(module.weight[0].numel())
            module.weight.copy_(_uniform(tuple(module.weight.shape), -bound, bound, generator))
            if module.bias is not None:
                module.bias.copy_(_uniform(tuple(module.bias.shape), -bound, bound, generator))
        heads = self.config.num_heads
        dt = torch.exp(_uniform((heads,), math.log(1e-3), math.log(1e-1), generator)).clamp(min=1e-4)
        self.dt_bias.copy_(inverse_softplus(dt))
        self.A_log.copy_(torch.log(_uniform((heads,), 1.0, 16.0, generator)))
        if self.D is not None:
            self.D.fill_(1.0)
        if self.norm is not None:
            self.norm.weight.fill_(1.0)

    # ------------------------------------------------------------------------------------ state

    def allocate_state(
        self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Mamba2State:
        """The state before the first token for ``batch`` sequences (conv in ``dtype``, default the
        weights'; ssm float32), with the constants of the current weights."""
        cfg = self.config
        weight = self.out_proj.weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        width = cfg.d_conv if cfg.use_conv else 0
        heads = cfg.num_heads
        state = Mamba2State(
            conv=torch.zeros(batch, cfg.conv_dim, width, device=device, dtype=dtype),
            ssm=torch.zeros(batch, heads, cfg.head_dim, cfg.d_state, device=device, dtype=torch.float32),
            A=torch.zeros(heads, device=device),
            dt_bias=torch.zeros(heads, device=device),
            D=torch.zeros(heads, device=device),
        )
        self.write_constants(state)
        return state

    def reset_state(self, state: Mamba2State) -> None:
        """Back to the state before the first token, in place, with the constants of the current weights."""
        state.zero_()
        self.write_constants(state)

    @torch.no_grad()
    def write_constants(self, state: Mamba2State) -> None:
        """Copy A = -exp(A_log), dt_bias and D of the current weights into ``state`` (in place)."""
        state.A.copy_(-torch.exp(self.A_log.float()))
        state.dt_bias.copy_(self.dt_bias.float())
        if self.D is not None:
            state.D.copy_(self.D.float())
        else:
            state.D.zero_()

    # ------------------------------------------------------------------------------ computation

    def _project(self, u: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
        """u (..., hidden) -> gate z (..., d_inner) or None, xBC (..., conv_dim), dt before bias (..., H)."""
        cfg = self.config
        if cfg.fused_projection:
            z, xbc, dt = self.in_proj(u).split([cfg.d_inner, cfg.conv_dim, cfg.num_heads], dim=-1)
            return z, xbc, dt
        z = self.in_proj_z(u) if self.in_proj_z is not None else None
        xbc = torch.cat([self.in_proj_x(u), self.in_proj_B(u), self.in_proj_C(u)], dim=-1)
        return z, xbc, self.in_proj_dt(u)

    def _split_xbc(self, xbc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(..., conv_dim) -> x (..., H, P), B (..., G, N), C (..., G, N); x and B at key/value width
        are repeated to the H heads (``repeat_kv`` order: head h reads head h // (H / K))."""
        cfg = self.config
        group_width = cfg.n_groups * cfg.d_state
        if cfg.num_xb_heads is None:
            x, B, C = xbc.split([cfg.d_inner, group_width, group_width], dim=-1)
        else:
            x, B, C = xbc.split([cfg.xb_heads * cfg.head_dim, cfg.xb_heads * cfg.d_state, group_width], dim=-1)
        x = x.unflatten(-1, (cfg.xb_heads, cfg.head_dim))
        B = B.unflatten(-1, (-1, cfg.d_state))
        if cfg.num_xb_heads is not None and cfg.xb_heads != cfg.num_heads:
            repeats = cfg.num_heads // cfg.xb_heads
            x, B = x.repeat_interleave(repeats, dim=-2), B.repeat_interleave(repeats, dim=-2)
        return x, B, C.unflatten(-1, (cfg.n_groups, cfg.d_state))

    def _scan_inputs(self, x: Tensor, dt: Tensor, dt_bias: Tensor) -> tuple[Tensor, Tensor]:
        """(x to scan, dt) from x (..., H, P) and dt before bias (..., H); dt in float32.

        The scan's update is exp(dt A) S + dt x B^T. Without ``dt_scales_input`` (mmMamba's
        S_t = gamma_t S_{t-1} + x_t B_t^T) x / dt is scanned instead, so that dt * (x / dt) puts x in
        unscaled while the decay stays gamma; dt is then floored at ``UNSCALED_MIN_DT`` and x / dt is
        kept in float32 (it reaches 1e6 |x|, beyond float16's range: the scan then runs in float32).
        """
        low, high = self.config.dt_limit
        dt = F.softplus(dt.float() + dt_bias).clamp(min=low, max=high)
        if self.config.dt_scales_input:
            return x, dt
        dt = dt.clamp_min(UNSCALED_MIN_DT)
        return x.float() / dt[..., None], dt

    def _output(self, y: Tensor, z: Tensor | None, dtype: torch.dtype) -> Tensor:
        """Scan output y (..., H, P) (D skip included), gate z -> out_proj(gated_rmsnorm(y, z))."""
        cfg = self.config
        y = y.flatten(-2)
        if self.norm is not None:
            group_size = cfg.d_inner // cfg.n_groups
            weight = self.norm.weight.repeat(cfg.num_heads) if cfg.norm_weight_shared else self.norm.weight
            y = gated_rms_norm(y, z, weight, cfg.rms_eps, group_size, cfg.norm_before_gate)
        return self.out_proj(y.to(self.out_proj.weight.dtype)).to(dtype)

    def _check_input(self, hidden_states: Tensor, padding_mask: Tensor | None) -> None:
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"hidden_states must be (batch, length, {self.config.hidden_size}), got {tuple(hidden_states.shape)}"
            )
        if padding_mask is not None and padding_mask.shape != hidden_states.shape[:2]:
            raise ValueError(
                f"padding_mask must be {tuple(hidden_states.shape[:2])} (1 = real token), got {tuple(padding_mask.shape)}"
            )

    def forward(
        self, hidden_states: Tensor, state: Mamba2State | None = None, padding_mask: Tensor | None = None
    ) -> Tensor:
        """hidden_states (B, L, hidden) -> (B, L, hidden).

        state: continue from it (a fresh one: a prefill) and leave it holding the state after the last
        token, its constants refreshed from the weights; one token with a state goes to ``step``.
        padding_mask (B, L): 1 for real tokens, 0 for (left) padding, which is skipped.
        Raises ValueError for a wrong hidden width or mask shape.
        """
        self._check_input(hidden_states, padding_mask)
        length = hidden_states.shape[1]
        if state is not None and length == 1 and padding_mask is None:
            return self.step(hidden_states[:, 0], state).unsqueeze(1)
        cfg = self.config
        dtype = hidden_states.dtype
        real = None if padding_mask is None else padding_mask.bool()
        A = -torch.exp(self.A_log.float())
        dt_bias = self.dt_bias.float()
        z, xbc, dt = self._project(hidden_states)
        if real is not None:
            xbc = xbc * real[..., None].to(xbc.dtype)  # a pad enters the conv as the zeros before the start
        if self.conv1d is not None:
            xbc_t = xbc.transpose(1, 2)
            if state is not None:
                # Prepending the cached last d_conv - 1 inputs continues the conv across calls.
                xbc_t = torch.cat([state.conv[..., 1:].to(xbc_t.dtype), xbc_t], dim=-1)
                state.conv.copy_(causal_conv1d_state(xbc_t, cfg.d_conv))
            weight = self.conv1d.weight.squeeze(1)
            xbc = causal_conv1d(xbc_t.contiguous(), weight, self.conv1d.bias, cfg.conv_activation)
            xbc = xbc[..., -length:].transpose(1, 2)
            if real is not None:
                xbc = xbc * real[..., None].to(xbc.dtype)
        x, B, C = self._split_xbc(xbc)
        x_scan, dt = self._scan_inputs(x, dt, dt_bias)
        if not cfg.dt_scales_input:
            B, C = B.float(), C.float()  # the scan in x / dt's float32
        if real is not None:
            dt = dt * real[..., None]  # dt = 0: no input and no decay, the state passes a pad unchanged
        # The scan adds D x itself when it scans x; x / dt (unscaled input) gets D x added here.
        D = self.D if cfg.dt_scales_input else None
        if state is None:
            y = ssd_scan(x_scan, dt, A, B, C, D=D, chunk_size=cfg.chunk_size)
        else:
            y, final_state = ssd_scan(
                x_scan, dt, A, B, C, D=D, initial_state=state.ssm, return_final_state=True, chunk_size=cfg.chunk_size
            )
            state.ssm.copy_(final_state)
            self.write_constants(state)
        if self.D is not None and not cfg.dt_scales_input:
            y = (y.float() + x.float() * self.D.float()[:, None]).to(y.dtype)
        return self._output(y, z, dtype)

    def step(self, hidden_states: Tensor, state: Mamba2State) -> Tensor:
        """Decode one token: hidden_states (B, hidden) -> (B, hidden); ``state`` advances in place.

        Reads the constants stored in ``state`` (see ``Mamba2State``), not the weights. Where Triton runs
        (CUDA, or its interpreter) and no gradient is asked for, everything between the conv and the
        gated norm is one kernel (``mambavlm.ops.mamba2_step``); ``MAMBAVLM_DISABLE_KERNELS=1`` keeps
        the PyTorch path.
        """
        if hidden_states.dim() != 2 or hidden_states.shape[-1] != self.config.hidden_size:
            raise ValueError(f"step takes hidden_states (batch, {self.config.hidden_size}), got {tuple(hidden_states.shape)}")
        cfg = self.config
        z, xbc, dt = self._project(hidden_states)
        if self.conv1d is not None:
            xbc = causal_conv1d_update(xbc, state.conv, self.conv1d.weight.squeeze(1), self.conv1d.bias, cfg.conv_activation)
        if fused_step_runs(xbc):
            y = mamba2_ssm_step(xbc, dt, state.ssm, state.A, state.dt_bias, state.D, xb_heads=cfg.xb_heads,
                                b_groups=cfg.b_groups, n_groups=cfg.n_groups, dt_limit=cfg.dt_limit,
                                dt_scales_input=cfg.dt_scales_input, min_dt=UNSCALED_MIN_DT)
            return self._output(y, z, hidden_states.dtype)
        x, B, C = self._split_xbc(xbc)
        x_scan, dt = self._scan_inputs(x, dt, state.dt_bias)
        if cfg.dt_scales_input:
            y = ssd_step(state.ssm, x_scan, dt, state.A, B, C, D=state.D)
        else:  # the step in x / dt's float32, D x added here
            y = ssd_step(state.ssm, x_scan, dt, state.A, B.float(), C.float())
            if cfg.use_D:
                y = (y.float() + x.float() * state.D[:, None]).to(y.dtype)
        return self._output(y, z, hidden_states.dtype)
