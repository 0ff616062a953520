"""The training config: which model, which data, how to optimise, where to write.

A train YAML names its model as a path to a model YAML (relative to the train YAML's directory) or as
an inline mapping, which may start from a model YAML with ``base: path`` and override some keys::

    model:
      base: ../model/tiny.yaml
      llm: {config: {hidden_size: 96}}

The model section is resolved to a mapping before command-line overrides apply, so
``model.projector.d_state=8`` works whichever form the YAML used; ``model=other.yaml`` on the command
line names a file relative to the working directory. Data paths and ``output_dir`` are relative to the
working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from mambavlm.config import (
    ConfigError,
    ModelConfig,
    StrictModel,
    apply_overrides,
    deep_merge,
    load_yaml,
    validate,
)
from mambavlm.llm.factory import LLM_SECTION_CHECKS

__all__ = [
    "PROFILE_STEP_HELP",
    "SYNC_EACH_BATCH_HELP",
    "Tracker",
    "DataConfig",
    "LoraSettings",
    "SyntheticDataConfig",
    "TrainConfig",
    "TrainingConfig",
    "load_train_config",
]


Tracker = Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive"]
"""The experiment trackers accelerate can log to."""


class SyntheticDataConfig(StrictModel):
    """The Shapes-VQA task (mambavlm.data.synthetic), generated into ``<output_dir>/data``."""

    num_train: int = Field(gt=0)
    num_val: int = Field(ge=0)
    image_size: int = Field(32, gt=0)
    seed: int = 0


CpuThreads = Annotated[
    int | None,
    Field(
        gt=0,
        description="torch threads per process when training on the CPU; None = the cores this process may "
        "use divided by the processes (accelerate launch otherwise gives each CPU process 1 thread unless "
        "started with --cpu)",
    ),
]
"""The ``cpu_threads`` setting of every training run (fine-tuning and distillation)."""


class DataConfig(StrictModel):
    """LLaVA-format JSON files, or the synthetic task when ``train`` is unset."""

    train: str | None = Field(None, description="LLaVA-format training JSON")
    val: str | None = Field(None, description="LLaVA-format JSON scored by exact match at the end")
    image_root: str | None = Field(
        None, description="directory the records' image paths are relative to; None = the JSON's directory"
    )
    synthetic: SyntheticDataConfig | None = Field(
        None, description="used only when `train` is unset"
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    max_length: int | None = Field(
        None, gt=0, description="longest training sequence in tokens; None = model.max_length"
    )

    @model_validator(mode="after")
    def _has_a_source(self) -> DataConfig:
        if self.train is None and self.synthetic is None:
            raise ValueError("give data.train (a LLaVA-format JSON) or data.synthetic")
        if self.train is None and self.val is not None:
            raise ValueError("data.val is set but data.train is not: the synthetic task brings its own val split")
        if self.train is None and self.image_root is not None:
            raise ValueError("data.image_root is set but data.train is not: the synthetic task's images are in "
                             "<output_dir>/data")
        return self


SYNC_EACH_BATCH_HELP = (
    "reduce the gradients after every micro-batch, not only the step's last: under FSDP each micro-batch's "
    "reduce-scatter then adds into the sharded gradients (no unsharded copy held across the accumulation, "
    "FSDP's no_sync); accelerate's GradientAccumulationPlugin.sync_each_batch"
)
PROFILE_STEP_HELP = (
    "record this optimiser step (all its micro-batches; counted over all phases) with torch.profiler on every "
    "process: OUTPUT_DIR/profile/step-N-rank-R.txt (operators by device and by CPU time) and .json (a Chrome / "
    "Perfetto trace); the step is left out of the throughput"
)


class TrainingConfig(StrictModel):
    """The ``train:`` section: freezing, batch sizes, optimiser, schedule, logging, checkpoints."""

    freeze: Literal["align", "finetune"] = Field(
        "finetune",
        description="'align' trains the projector only, 'finetune' the projector and the LLM; vision "
        "encoders train only where the model config says frozen: false",
    )
    epochs: int = Field(1, gt=0, description="passes over the training data when max_steps is None")
    max_steps: int | None = Field(None, gt=0, description="optimiser steps; None = from epochs")
    global_batch_size: int = Field(32, gt=0, description="samples per optimiser step, all processes")
    micro_batch_size: int = Field(8, gt=0, description="samples per forward pass on one process")
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0, description="not applied to norms, biases, 1-D params")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="share of steps with linear warmup")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip threshold; None = no clipping")
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = Field(False, description="recompute LLM activations in backward")
    sync_each_batch: bool = Field(False, description=SYNC_EACH_BATCH_HELP)
    profile_step: int | None = Field(None, gt=0, description=PROFILE_STEP_HELP)
    log_every: int = Field(10, gt=0, description="optimiser steps between log lines")
    save_every: int | None = Field(
        None, gt=0, description="optimiser steps between checkpoints; one is always written at the end"
    )
    checkpoints: bool = Field(
        True, description="write resumable checkpoints (weights, optimiser, data order); false: none, whatever "
        "save_every says, only the final model (final/), as for a throughput measurement (a paper-shaped "
        "checkpoint is ~33 GB)"
    )
    keep_last: int = Field(2, gt=0, description="checkpoints kept; older ones are deleted")
    resume_from: str | None = Field(
        None, description="a checkpoint directory, or 'latest' (newest in output_dir; fresh start if none)"
    )
    eval_batch_size: int = Field(32, gt=0, description="prompts per generate call on the val split")
    eval_max_new_tokens: int = Field(16, gt=0)

    @model_validator(mode="after")
    def _batch_sizes_divide(self) -> TrainingConfig:
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )
        return self


class LoraSettings(StrictModel):
    """The ``lora:`` section: train LoRA adapters on the LLM through peft instead of all its weights."""

    r: int = Field(16, gt=0, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="scaling numerator: the update is (alpha / r) B A x")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: str | list[str] | None = Field(
        None, description="peft's target_modules: None = the LLM family's default ([in_proj] for Mamba and "
        "Mamba-2, 'all-linear' for LLaMA and hybrids), 'all-linear', or module names"
    )
    projector: Literal["full", "lora", "frozen"] = Field(
        "full", description="the projector trains fully, by its own adapters, or not at all"
    )
    qlora: bool = Field(False, description="load the LLM in 4-bit NF4 (bitsandbytes, CUDA only): QLoRA")


class TrainConfig(StrictModel):
    """A whole training run."""

    model: ModelConfig
    data: DataConfig
    train: TrainingConfig = Field(default_factory=TrainingConfig)
    output_dir: str
    seed: int = 0
    blind: bool = Field(
        False, description="replace every image by a blank grey one (the ablation: does the model look?)"
    )
    trackers: list[Tracker] = Field(
        default_factory=list, description="accelerate trackers; logs go under <output_dir>/logs"
    )
    cpu_threads: CpuThreads = None
    lora: LoraSettings | None = Field(
        None, description="LoRA / QLoRA adapters on the LLM (train.freeze then does not apply)"
    )

    @model_validator(mode="after")
    def _data_fits_the_model(self) -> TrainConfig:
        if self.data.max_length is not None and self.data.max_length > self.model.max_length:
            raise ValueError(
                f"data.max_length={self.data.max_length} exceeds model.max_length={self.model.max_length}: "
                "the model would refuse the first longer batch; lower data.max_length or raise model.max_length"
            )
        return self


def _resolve_model(value: Any, base_dir: Path) -> Any:
    """A model path or a mapping with ``base: path`` -> the model mapping; anything else unchanged."""
    if isinstance(value, str):
        return load_yaml(base_dir / value)
    if isinstance(value, dict) and "base" in value:
        rest = {k: v for k, v in value.items() if k != "base"}
        if not isinstance(value["base"], str):
            raise ConfigError(f"model.base must be a file path, got {value['base']!r}")
        return deep_merge(load_yaml(base_dir / value["base"]), rest)
    return value


def load_train_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Load a train YAML, resolve its model section, apply ``key=value`` overrides, validate."""
    path = Path(path)
    data = load_yaml(path, path_keys=("model",))
    if "model" in data:
        data["model"] = _resolve_model(data["model"], path.resolve().parent)
    data = apply_overrides(data, overrides)
    if "model" in data:
        data["model"] = _resolve_model(data["model"], Path.cwd())
    return validate(TrainConfig, data, source=str(path), overrides=overrides, section_checks=LLM_SECTION_CHECKS)
