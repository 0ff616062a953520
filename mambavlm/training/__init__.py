"""Training: the config schema, the one engine (phases, objectives, trainable policies, checkpoints),
fine-tuning, evaluation by exact match."""

from __future__ import annotations

from mambavlm.training.checkpoint import find_checkpoints, load_checkpoint, save_checkpoint
from mambavlm.training.config import DataConfig, SyntheticDataConfig, TrainConfig, TrainingConfig, load_train_config
from mambavlm.training.engine import Objective, Phase, TrainablePolicy, Trainer, TrainerState, TrainingStopped
from mambavlm.training.evaluation import (
    BlankImage,
    exact_match,
    generate_answers,
    load_vqa_items,
    normalize_answer,
    read_vqa_items,
)
from mambavlm.training.finetune import FINAL_MODEL_DIR, METRICS_FILE, run_finetune
from mambavlm.training.objectives import NextTokenObjective
from mambavlm.training.optim import (
    FreezePreset,
    apply_freeze_policy,
    build_optimizer,
    build_scheduler,
    parameter_groups,
)

__all__ = [
    "FINAL_MODEL_DIR",
    "METRICS_FILE",
    "BlankImage",
    "DataConfig",
    "FreezePreset",
    "NextTokenObjective",
    "Objective",
    "Phase",
    "SyntheticDataConfig",
    "TrainConfig",
    "TrainablePolicy",
    "Trainer",
    "TrainerState",
    "TrainingConfig",
    "TrainingStopped",
    "apply_freeze_policy",
    "build_optimizer",
    "build_scheduler",
    "exact_match",
    "find_checkpoints",
    "generate_answers",
    "load_checkpoint",
    "load_train_config",
    "load_vqa_items",
    "normalize_answer",
    "read_vqa_items",
    "parameter_groups",
    "run_finetune",
    "save_checkpoint",
]
