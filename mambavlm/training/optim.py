"""What trains and how: the freezing policy, AdamW parameter groups and the cosine-with-warmup schedule."""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_cosine_schedule_with_warmup

__all__ = [
    "FREEZE_PRESETS",
    "FreezePreset",
    "apply_freeze_policy",
    "build_optimizer",
    "build_scheduler",
    "no_decay_names",
    "parameter_groups",
]

FREEZE_PRESETS: dict[str, tuple[str, ...]] = {
    "align": ("projector",),
    "finetune": ("projector", "llm"),
}
"""Preset -> the model parts that train (vision encoders follow their own ``frozen`` flag)."""


def apply_freeze_policy(model: nn.Module, freeze: Literal["align", "finetune"]) -> None:
    """Set ``requires_grad`` of ``model.projector`` and ``model.llm`` for the preset.

    The vision encoders are left as built: frozen unless the model config sets ``frozen: false``
    for an encoder (a frozen encoder also stays in eval mode).
    """
    if freeze not in FREEZE_PRESETS:
        raise ValueError(f"unknown freeze preset {freeze!r}; choose one of {sorted(FREEZE_PRESETS)}")
    trainable = FREEZE_PRESETS[freeze]
    for part in ("projector", "llm"):
        getattr(model, part).requires_grad_(part in trainable)


@dataclass(frozen=True)
class FreezePreset:
    """The fine-tuning trainable-parameter policy: ``apply_freeze_policy`` with a preset; returns the
    names of the parameters that train."""

    preset: Literal["align", "finetune"]

    def __call__(self, model: nn.Module) -> set[str]:
        apply_freeze_policy(model, self.preset)
        return {name for name, p in model.named_parameters() if p.requires_grad}


SSM_NO_DECAY = frozenset({"A_log", "D", "dt_bias", "dt_proj_bias"})
"""Parameter names mamba_ssm marks ``_no_weight_decay`` (A_log, D, Mamba-2's dt_bias; the projector's
dt bias is ``dt_proj_bias``), whatever their number of dimensions: transformers' Mamba-1 ``A_log`` is
(D_inner, N), the projector's are 3-D."""


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters exempt from weight decay, as mamba_ssm and transformers exempt them: any
    parameter flagged ``_no_weight_decay``, the SSM parameters of ``SSM_NO_DECAY``, biases, norm layers'
    parameters and every other tensor with fewer than 2 dimensions."""
    names = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        is_norm = "Norm" in type(module).__name__
        for name, param in module.named_parameters(recurse=False):
            if (
                is_norm
                or param.ndim < 2
                or name == "bias"
                or name in SSM_NO_DECAY
                or getattr(param, "_no_weight_decay", False)
            ):
                names.add(prefix + name)
    return names


def parameter_groups(
    model: nn.Module, weight_decay: float, no_decay: Collection[int] | None = None
) -> list[dict[str, Any]]:
    """Two AdamW groups over the trainable parameters: with ``weight_decay``, and with 0 for
    :func:`no_decay_names` (or for the parameters whose ``id`` is in ``no_decay``: what a trainer
    computed before FSDP turned every parameter into a 1-D shard view).

    Frozen parameters are in neither group. Raises ValueError when nothing trains.
    """
    exempt = no_decay_names(model) if no_decay is None else None
    decay_group: dict[str, Any] = {"params": [], "weight_decay": weight_decay}
    plain_group: dict[str, Any] = {"params": [], "weight_decay": 0.0}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        free = name in exempt if exempt is not None else id(param) in no_decay
        (plain_group if free else decay_group)["params"].append(param)
    if not decay_group["params"] and not plain_group["params"]:
        raise ValueError("the model has no trainable parameters: check the freeze preset")
    return [g for g in (decay_group, plain_group) if g["params"]]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    no_decay: Collection[int] | None = None,
    fused: bool = False,
) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups`; ``fused``: PyTorch's fused implementation (the trainer's choice
    for a CUDA run: one kernel over each group's tensors, which on Mamba-2.8B's float32 master weights
    reads and writes ~80 GB per step where the default foreach implementation's dozen passes move ~250
    GB; the same update to rounding). The parameters may still be on the CPU, to be moved before the
    first step. CPU runs keep the default implementation, whose rounding the offline default's
    figures were measured with."""
    return torch.optim.AdamW(parameter_groups(model, weight_decay, no_decay), lr=lr, betas=betas, fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float) -> LambdaLR:
    """Linear warmup over ``ceil(warmup_ratio * total_steps)`` steps, then cosine decay to 0."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    warmup_steps = math.ceil(warmup_ratio * total_steps)
    return get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
