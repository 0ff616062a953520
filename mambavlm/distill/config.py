"""The distillation config: teacher, layout, seeding, data, and the stages to run in order.

A distill YAML (``configs/distill/*.yaml``)::

    teacher: outputs/tiny-llama/final      # a MambaVLM directory (LLaMA-family LLM) or an HF Llama one
    layout: head-interleaved:4             # see mambavlm.distill.layouts
    seeding: mmmamba                       # or matvlm
    data: {synthetic: {num_train: 4000, num_val: 200}}
    stages:
      - {name: stage1, max_steps: 100, lr: 1.0e-3}
      - {name: stage2, max_steps: 100, lr: 5.0e-4}
      - {name: stage3, max_steps: 100, lr: 5.0e-5}
    output_dir: outputs/distill-tiny
    save_every: 50                         # checkpoints; resume_from=latest continues, mid-stage too

Command-line overrides use dotted keys (``teacher=DIR layout=ratio:0.25 stages.2.lr=1e-4``).
Data paths, ``teacher`` and ``output_dir`` are relative to the working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mambavlm.config import StrictModel, load_config
from mambavlm.distill.layouts import HybridLayout
from mambavlm.distill.seeding import SHAPE_FIELDS
from mambavlm.distill.stages import LossWeights, StageName
from mambavlm.llm.mamba2 import Mamba2MixerConfig
from mambavlm.training.config import (
    PROFILE_STEP_HELP,
    SYNC_EACH_BATCH_HELP,
    CpuThreads,
    DataConfig,
    Tracker,
)

__all__ = ["DistillConfig", "DistillStageConfig", "load_distill_config"]

_MATVLM_DEFAULTS = {"alpha": 1.0, "beta": 1.0, "gamma": 0.0, "temperature": 1.0}


class DistillStageConfig(StrictModel):
    """One stage: what trains and its loss follow from ``name`` (mambavlm.distill.stages).

    Defaults are mmMamba's: AdamW (0.9, 0.999), weight decay 0.05, clipping at 5.0, warmup-stable-decay
    with 10 % warmup and 10 % decay. alpha / beta / gamma / temperature weigh MaTVLM's loss; on
    other stages they must keep their defaults.
    """

    name: StageName
    max_steps: int = Field(gt=0, description="optimiser steps")
    lr: float = Field(gt=0, description="peak learning rate (papers: 1e-3 / 5e-4 / 5e-5; MaTVLM 2e-4)")
    weight_decay: float = Field(0.05, ge=0, description="not applied to norms, biases, 1-D parameters")
    max_grad_norm: float | None = Field(5.0, gt=0, description="clip threshold; None = no clipping")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of steps warming up linearly")
    decay_ratio: float = Field(0.1, ge=0, le=1, description="share of steps decaying to 0 at the end")
    global_batch_size: int = Field(32, gt=0, description="samples per optimiser step, all processes")
    micro_batch_size: int = Field(8, gt=0, description="samples per forward pass on one process")
    alpha: float = Field(1.0, ge=0, description="matvlm: weight of the layerwise L2 loss")
    beta: float = Field(1.0, ge=0, description="matvlm: weight of T^2 * KL")
    gamma: float = Field(0.0, ge=0, description="matvlm: weight of the cross-entropy on the labels")
    temperature: float = Field(1.0, gt=0, description="matvlm: KL temperature T")
    variant: Literal["paper", "public_code"] = Field(
        "paper",
        description="stage3 / matvlm as the paper's equations define them, or as the authors' code runs them "
        "(stage3: mmMamba's config's trainable set; matvlm: the layer loss at decoder-layer outputs, the "
        "code's norm / batchmean reductions)",
    )

    @model_validator(mode="after")
    def _check(self) -> DistillStageConfig:
        if self.warmup_ratio + self.decay_ratio > 1:
            raise ValueError(
                f"warmup_ratio + decay_ratio = {self.warmup_ratio + self.decay_ratio} exceeds 1"
            )
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not a multiple of "
                f"micro_batch_size={self.micro_batch_size}"
            )
        misplaced = [k for k, v in _MATVLM_DEFAULTS.items() if getattr(self, k) != v] if self.name != "matvlm" else []
        if misplaced:
            raise ValueError(f"{', '.join(misplaced)} weigh the matvlm loss; stage {self.name!r} does not use them")
        if self.variant == "public_code" and self.name in ("stage1", "stage2"):
            raise ValueError(f"stage {self.name!r} has no public_code variant: the paper and the code agree on it")
        if self.name == "matvlm" and self.alpha == self.beta == self.gamma == 0:
            raise ValueError("alpha, beta and gamma are all 0: the matvlm stage would have no loss")
        return self

    @property
    def loss_weights(self) -> LossWeights:
        return LossWeights(alpha=self.alpha, beta=self.beta, gamma=self.gamma, temperature=self.temperature)


class DistillConfig(StrictModel):
    """A whole distillation run: teacher -> hybrid student, then the stages in order."""

    teacher: str = Field(description="a MambaVLM directory whose LLM is LLaMA-family, or an HF Llama directory")
    layout: HybridLayout = Field(description="which layers become Mamba-2, e.g. 'head-interleaved:4', 'ratio:0.25'")
    seeding: Literal["mmmamba", "matvlm"] = Field("mmmamba", description="how the Mamba-2 mixers are initialised")
    mixer_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Mamba2MixerConfig fields overriding the seeding mode's, e.g. mmMamba's public code: "
        "{dt_scales_input: true, conv_activation: silu, d_conv: 2}",
    )
    template: Literal["plain", "vicuna_v1"] = Field(
        "plain", description="conversation template for an HF Llama teacher (a MambaVLM brings its own)"
    )
    data: DataConfig
    stages: list[DistillStageConfig] = Field(min_length=1)
    output_dir: str
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = Field(False, description="recompute the student LLM's activations in backward")
    sync_each_batch: bool = Field(False, description=SYNC_EACH_BATCH_HELP)
    profile_step: int | None = Field(None, gt=0, description=PROFILE_STEP_HELP)
    log_every: int = Field(10, gt=0, description="optimiser steps between log lines")
    save_every: int | None = Field(
        None, gt=0, description="optimiser steps (over all stages) between checkpoints; one ends every stage"
    )
    keep_last: int = Field(2, gt=0, description="checkpoints kept; older ones are deleted")
    resume_from: str | None = Field(
        None, description="a checkpoint directory, or 'latest' (newest in output_dir; fresh start if none)"
    )
    trackers: list[Tracker] = Field(
        default_factory=list, description="accelerate trackers; logs go under <output_dir>/logs"
    )
    cpu_threads: CpuThreads = None
    eval_batch_size: int = Field(32, gt=0, description="prompts per batch on the val split")
    eval_max_new_tokens: int = Field(16, gt=0)

    @field_validator("mixer_options")
    @classmethod
    def _known_mixer_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Raises ValueError for a field that is not a settable ``Mamba2MixerConfig`` field, naming the
        settable ones (the error is reported at ``mixer_options``, with the override that set it)."""
        settable = set(Mamba2MixerConfig.__dataclass_fields__) - SHAPE_FIELDS
        unknown = sorted(set(options) - settable)
        if unknown:
            raise ValueError(f"{unknown} cannot be set; choose among {sorted(settable)}")
        return options


def load_distill_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> DistillConfig:
    """Load a distill YAML (``base:`` chains allowed), apply ``key=value`` overrides, validate."""
    return load_config(DistillConfig, path, overrides)
