"""The training forward of a Mamba-1 LM (transformers' ``MambaForCausalLM``) laid out as mamba_ssm lays
out its own: block boundaries as one fused residual add + RMSNorm, and the LM head only where a label
is scored.

transformers' ``MambaBlock`` computes ``residual + mixer(norm(residual))`` in separate PyTorch ops
(a float32 cast, the RMSNorm's five element-wise passes, the add), forward and backward, and its
``MambaForCausalLM`` projects every position to the vocabulary and upcasts those logits to float32
before the loss. mamba_ssm's ``MixerModel`` instead carries the residual stream beside the block
output and fuses each boundary's add and norm into one Triton kernel with its own backward
(``layer_norm_fn(..., prenorm=True)``). ``mamba_lm_hidden_states`` runs transformers' own blocks'
weights and mixers that way (``mambavlm.ops.norm.add_rms_norm``); ``answer_token_loss`` applies the
LM head to the positions with a label only (in a VLM batch the 1458 visual positions never carry
one) and reduces as transformers does (``num_items_in_batch``). The loss and gradients equal
transformers' forward in float32 (tests); with the fused kernel on CUDA they differ by rounding, as
mamba_ssm's numerics differ from transformers' (the residual is normalised before it is rounded).

The mixer, on CUDA with mamba_ssm, is called as mamba_ssm's ``Mamba.forward`` calls its fused
``mamba_inner_fn``: ``in_proj`` as one 2-D GEMM ``W @ h^T`` -> (2 D_inner, B L), viewed as
(B, 2 D_inner, L) with unit stride along L, the layout the kernel reads. transformers' mixer passes
``in_proj(h).transpose(1, 2)`` instead, which ``mamba_inner_fn`` first copies to that layout (one
(B, 2 D_inner, L) copy per layer, and another for its gradient). Same weights, same kernel; the padded
positions' input is zeroed first, as transformers' mixer zeroes it.

The selective scan inside (``use_training_scan``; ``resolve_training_scan``): on CUDA, mamba_ssm's
unfused mixer computed in (B, L, D) around our Triton scan (``_triton_scan_mixer``,
``selective_scan_triton``, which needs only Triton: it ships with torch) where the micro-batch fills the
GPU (``scan_fills_gpu``) or mamba_ssm is not installed, else mamba_ssm's fused ``mamba_inner_fn``; on
the CPU transformers' forward (its sequential ``slow_forward``). On an H200, MambaVLM-2.8B at
micro-batch 8 x 1522 tokens, bf16: the Triton scan's step ran 1.27x the ``mamba_inner_fn`` step and
1.22x mamba_ssm's own LM (``benchmarks/results/training_throughput.md``): its backward sums dB / dC
over channel blocks in registers where mamba_ssm's adds each element atomically, and the projections'
channel-contiguous output goes into it without the transposed copies ``mamba_inner_fn`` makes. It runs
one thread per (sequence, channel), so fewer sequences leave the GPU emptier (0.945x at micro-batch 4),
and it keeps the conv output, delta and a float32 state per 16 steps for the backward, which
``mamba_inner_fn`` recomputes: +24 GiB at micro-batch 8 (84 against 60).
"""

from __future__ import annotations

import functools
import types
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import MambaForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.mamba.modeling_mamba import MambaBlock, MambaMixer

from mambavlm.llm.tokenizer import IGNORE_INDEX
from mambavlm.ops.causal_conv1d import causal_conv1d
from mambavlm.ops.dispatch import triton_runs_on, use_kernels
from mambavlm.ops.norm import add_rms_norm, rms_norm
from mambavlm.ops.selective_scan_triton import selective_scan_triton

__all__ = [
    "answer_token_loss",
    "install_fused_blocks",
    "mamba_lm_hidden_states",
    "right_padded",
    "scan_fills_gpu",
    "use_training_scan",
    "zero3_partitioned",
]

_CHECKPOINTS_AT_CALL = "__call__" in GradientCheckpointingLayer.__dict__
"""transformers up to 5.17 checkpoints a layer in ``__call__`` (around whatever ``forward`` runs), later
releases wrap the class's ``forward``, which an instance's own ``forward`` replaces."""


def zero3_partitioned(lm: MambaForCausalLM) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions ``lm``'s parameters (it marks each with ``ds_id``). ZeRO-3
    gathers a module's own parameters when that module's forward is called, and the fused block reads
    its norm's weight without calling the norm, so such an LM trains through transformers' forward."""
    return any(hasattr(p, "ds_id") for p in lm.parameters())


def _mixer_forward(
    self: MambaMixer, hidden_states: Tensor, *, mamba_ssm_layout: bool = False, attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """A ``MambaMixer``'s forward in two modes: transformers' own, or with ``mamba_ssm_layout=True``
    in training, the scan ``resolve_training_scan`` picks: mamba_ssm's unfused mixer around our Triton
    scan (``_triton_scan_mixer``; by default on CUDA, or under Triton's interpreter when asked for), or
    ``mamba_inner_fn`` on ``in_proj`` computed as mamba_ssm's ``Mamba.forward`` computes it (see the
    module docstring). hidden_states (B, L, D) -> (B, L, D)."""
    scan = (resolve_training_scan(self.training_scan, hidden_states, self.intermediate_size)
            if mamba_ssm_layout and self.training else None)
    if scan == "triton":
        return _triton_scan_mixer(self, hidden_states, attention_mask)
    if scan is None:
        return type(self).forward(self, hidden_states, attention_mask=attention_mask, **kwargs)
    from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn

    return mamba_inner_fn(
        _in_proj(self, hidden_states, attention_mask),
        self.conv1d.weight,
        self.conv1d.bias if self.use_conv_bias else None,
        self.x_proj.weight,
        self.dt_proj.weight,
        self.out_proj.weight,
        self.out_proj.bias.float() if self.use_bias else None,
        -torch.exp(self.A_log.float()),
        None,
        None,
        self.D.float(),
        delta_bias=self.dt_proj.bias.float(),
        delta_softplus=True,
    )


def _in_proj(self: MambaMixer, hidden_states: Tensor, attention_mask: Tensor | None) -> Tensor:
    """hidden_states (B, L, D), the padded positions zeroed as transformers' mixer zeroes them ->
    ``in_proj`` as mamba_ssm computes it: one GEMM ``W @ h^T`` viewed as (B, 2 D_inner, L) with unit
    stride along L (the layout its kernels read). An ``in_proj`` that is not a plain ``nn.Linear`` (peft's
    LoRA layer, a 4-bit one) is called as a module, as transformers' mixer calls it: its weight alone
    is not the projection."""
    if attention_mask is not None:
        hidden_states = (hidden_states * attention_mask[:, :, None]).to(hidden_states.dtype)
    if type(self.in_proj) is not nn.Linear:
        return self.in_proj(hidden_states).transpose(1, 2)
    batch, length, _ = hidden_states.shape
    xz = self.in_proj.weight @ hidden_states.reshape(batch * length, -1).mT  # (2 D_inner, B L)
    if self.in_proj.bias is not None:
        xz = xz + self.in_proj.bias.to(xz.dtype)[:, None]
    return xz.view(xz.shape[0], batch, length).transpose(0, 1)


def _triton_scan_mixer(self: MambaMixer, hidden_states: Tensor, attention_mask: Tensor | None) -> Tensor:
    """The mixer as mamba_ssm's ``Mamba.forward`` without its fused path (``in_proj``, the causal conv,
    ``x_proj``, ``dt_proj``, the selective scan with the gate, ``out_proj``), the scan being
    ``selective_scan_triton``. hidden_states (B, L, D) -> (B, L, D); the padded positions' input zeroed
    first, as in the ``mamba_inner_fn`` path.

    Every tensor stays channel-contiguous, (B, L, D_inner) in memory, as the projections give and take
    it: the scan reads each step's channels of u, delta and z together (``selective_scan_triton`` reads
    through strides) and the transposes ``mamba_inner_fn`` makes for mamba_ssm's sequence-contiguous
    kernels are not needed. x goes into the conv as a slice of in_proj's output (causal_conv1d's
    channel-last kernel reads through its strides and writes a dense channel-last output), so x and z
    share one saved (B, L, 2 D_inner) tensor."""
    if attention_mask is not None:
        hidden_states = (hidden_states * attention_mask[:, :, None]).to(hidden_states.dtype)
    x, z = self.in_proj(hidden_states).chunk(2, dim=-1)  # (B, L, D_inner) each, z a view into xz
    x = causal_conv1d(x.transpose(1, 2), self.conv1d.weight[:, 0],
                      self.conv1d.bias if self.use_conv_bias else None, "silu")  # (B, D_inner, L)
    x_dbl = F.linear(x.transpose(1, 2), self.x_proj.weight)  # (B, L, R + 2 N)
    dt, b_ssm, c_ssm = x_dbl.split([self.time_step_rank, self.ssm_state_size, self.ssm_state_size], dim=-1)
    delta = F.linear(dt, self.dt_proj.weight)  # (B, L, D_inner); its bias is the scan's delta_bias
    y = selective_scan_triton(
        x,
        delta.transpose(1, 2),
        -torch.exp(self.A_log.float()),
        b_ssm.transpose(1, 2),
        c_ssm.transpose(1, 2),
        D=self.D.float(),
        z=z.transpose(1, 2),
        delta_bias=self.dt_proj.bias.float(),
        delta_softplus=True,
    )  # (B, D_inner, L) in x's order
    return self.out_proj(y.transpose(1, 2))


TrainingScan = Literal["auto", "mamba_ssm", "triton"]


MIN_SCAN_WARPS_PER_SM = 8
"""The fewest warps per streaming multiprocessor at which ``"auto"`` prefers our Triton scan to mamba_ssm's
fused mixer. The sequential kernels run one thread per (sequence, channel), so a micro-batch of B
sequences through a mixer of D_inner channels gives B D_inner / 32 warps. On an H200 (132 SMs),
MambaVLM-2.8B (D_inner 5120) at micro-batch 8 x 1522 tokens (9.7 warps per SM): the step 1.27x the
``mamba_inner_fn`` step; at micro-batch 4 (4.8 per SM): 0.945x; the scan alone at 2 x 6088 (2.4 per
SM): 0.37x (``benchmarks/results/training_throughput.md``, ``selective_scan.md``). 8 lies between the
measured win and loss."""


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def scan_fills_gpu(hidden_states: Tensor, channels: int) -> bool:
    """Whether a batch of ``hidden_states`` (B, L, D) through a mixer of ``channels`` (D_inner) gives the
    Triton scan at least ``MIN_SCAN_WARPS_PER_SM`` warps per SM of its CUDA device."""
    warps = hidden_states.shape[0] * channels / 32
    return warps >= MIN_SCAN_WARPS_PER_SM * _multiprocessors(hidden_states.device)


def resolve_training_scan(
    scan: TrainingScan, hidden_states: Tensor, channels: int
) -> Literal["mamba_ssm", "triton"] | None:
    """The scan a training mixer of ``channels`` (D_inner) runs on ``hidden_states`` (B, L, D):
    ``"triton"`` (``_triton_scan_mixer``), ``"mamba_ssm"`` (its fused ``mamba_inner_fn``) or None
    (transformers' own forward). ``"auto"``, on CUDA: the Triton scan where Triton runs and either
    mamba_ssm is not to be used (``use_kernels``) or the batch fills the GPU (``scan_fills_gpu``), else
    mamba_ssm; on the CPU: None. ``"triton"`` where Triton cannot run, or ``"mamba_ssm"`` without
    mamba_ssm: None."""
    mamba_ssm = use_kernels(hidden_states, "mamba_ssm")
    if scan == "triton":
        return "triton" if triton_runs_on(hidden_states) else None
    if (scan == "auto" and hidden_states.is_cuda and triton_runs_on(hidden_states)
            and (not mamba_ssm or scan_fills_gpu(hidden_states, channels))):
        return "triton"
    return "mamba_ssm" if mamba_ssm else None


def use_training_scan(lm: MambaForCausalLM, scan: TrainingScan) -> None:
    """Which selective scan the mixers of ``lm`` train with in mamba_ssm's layout
    (``resolve_training_scan``): ``"auto"`` (the default: the Triton scan on CUDA where the micro-batch
    fills the GPU, else mamba_ssm's), ``"mamba_ssm"`` (its
    fused ``mamba_inner_fn``, which keeps less for the backward) or ``"triton"`` (``_triton_scan_mixer``;
    ``benchmarks/training_throughput.py`` measures both). Raises ValueError for another name."""
    if scan not in ("auto", "mamba_ssm", "triton"):
        raise ValueError(f"unknown training scan {scan!r}; expected 'auto', 'mamba_ssm' or 'triton'")
    install_fused_blocks(lm)
    for module in lm.modules():
        if isinstance(module, MambaMixer):
            module.training_scan = scan


def _fused_block(
    block: MambaBlock, hidden: Tensor, residual: Tensor | None, attention_mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    normed, residual = add_rms_norm(block.norm, hidden, residual, block.residual_in_fp32, fused=True)
    return block.mixer(normed, mamba_ssm_layout=True, attention_mask=attention_mask), residual


def _block_forward(
    self: MambaBlock,
    hidden_states: Tensor,
    residual: Tensor | None = None,
    *,
    fused_add_norm: bool = False,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor | tuple[Tensor, Tensor]:
    """A ``MambaBlock``'s forward in two modes. Called as transformers' ``MambaModel`` calls it: the
    class's own forward (``residual + mixer(norm(residual))``). With ``fused_add_norm=True``:
    mamba_ssm's block, ``(mixer(normed), residual)`` for the block output and residual stream before
    it (``add_rms_norm``), the residual passed positionally (reentrant checkpointing gives it its
    gradient) and the block checkpointed as transformers would checkpoint it."""
    if not fused_add_norm:
        return type(self).forward(self, hidden_states, attention_mask=attention_mask, **kwargs)
    if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and not _CHECKPOINTS_AT_CALL:
        return checkpoint(_fused_block, self, hidden_states, residual, attention_mask, use_reentrant=False)
    return _fused_block(self, hidden_states, residual, attention_mask)


def install_fused_blocks(lm: MambaForCausalLM) -> None:
    """Give every ``MambaBlock`` and ``MambaMixer`` of ``lm`` its two-mode forward (``_block_forward``,
    ``_mixer_forward``), once; in place.

    Each stays the module that FSDP wraps and checkpointing replays (its parameters are gathered in
    its own forward, as FSDP gathers them; accelerate wraps both classes by default), while
    transformers' own forward is unchanged. The same per-instance binding Liger-Kernel applies to
    transformers' modules.
    """
    for module in lm.modules():
        if isinstance(module, MambaBlock) and "forward" not in module.__dict__:
            module.forward = types.MethodType(_block_forward, module)
        elif isinstance(module, MambaMixer) and "forward" not in module.__dict__:
            module.forward = types.MethodType(_mixer_forward, module)
            module.training_scan = "auto"


def right_padded(attention_mask: Tensor) -> bool:
    """Whether every row of ``attention_mask`` (B, L) is its real tokens then only padding (1...1 0...0),
    as the training collator pads. Then the mixers need no mask: each output at a real token depends on
    that token and the ones before it, and mamba_ssm's layout skips the two elementwise products per
    block that masking costs (forward and backward; ~15 ms of an H200 step of MambaVLM-2.8B)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def mamba_lm_hidden_states(lm: MambaForCausalLM, inputs_embeds: Tensor, attention_mask: Tensor | None) -> Tensor:
    """inputs_embeds (B, L, D) -> the final hidden states (B, L, D) after ``norm_f``, as
    ``lm.backbone`` computes them, in ``norm_f``'s dtype (float32 with ``residual_in_fp32``).

    Each block runs in mamba_ssm's layout (``install_fused_blocks``): the boundary's residual add +
    RMSNorm is ``add_rms_norm`` (mamba_ssm's fused kernel on CUDA), the mixer the block's own
    ``MambaMixer`` (in training on CUDA around our Triton scan, or mamba_ssm's fused ``mamba_inner_fn``:
    ``_mixer_forward``), given ``attention_mask`` as transformers' block gives it; with gradient
    checkpointing on, each block is recomputed in the backward pass as transformers recomputes it. Each block is called as a module, so FSDP gathers its
    parameters around it.
    """
    install_fused_blocks(lm)
    if attention_mask is not None and right_padded(attention_mask):
        attention_mask = None  # a causal mixer's output at a real token never sees the pads after it
    hidden, residual = inputs_embeds, None
    for layer in lm.backbone.layers:
        hidden, residual = layer(hidden, residual, fused_add_norm=True, attention_mask=attention_mask)
    stream = residual + hidden
    if lm.config.residual_in_fp32:
        stream = stream.to(torch.float32)
    return rms_norm(lm.backbone.norm_f, stream)


def answer_token_loss(
    lm: MambaForCausalLM, hidden: Tensor, labels: Tensor, num_items_in_batch: Tensor | int | None = None
) -> Tensor:
    """The causal-LM loss of hidden states (B, L, D) against labels (B, L) (-100: not scored), with
    the LM head applied only at the T positions whose next token is scored: (T, D) @ (D, V).

    Reduced as transformers' ``ForCausalLMLoss``: float32 logits, the sum of the token losses divided
    by ``num_items_in_batch`` (the scored tokens of the whole optimiser step), or their mean without it.
    """
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    head = lm.get_output_embeddings()
    logits = head(hidden[:, :-1][scored].to(head.weight.dtype)).float()
    if num_items_in_batch is None:
        return F.cross_entropy(logits, targets[scored])
    loss = F.cross_entropy(logits, targets[scored], reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
