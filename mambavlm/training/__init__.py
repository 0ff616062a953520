"""Training: the config schema, freezing and optimiser, checkpoints, the accelerate loop, evaluation."""

from __future__ import annotations

from mambavlm.training.checkpoint import find_checkpoints, load_checkpoint, save_checkpoint
from mambavlm.training.config import DataConfig, SyntheticDataConfig, TrainConfig, TrainingConfig, load_train_config
from mambavlm.training.evaluation import BlankImage, exact_match, generate_answers, load_vqa_items, normalize_answer
from mambavlm.training.loop import METRICS_FILE, Trainer
from mambavlm.training.optim import apply_freeze_policy, build_optimizer, build_scheduler, parameter_groups

__all__ = [
    "BlankImage",
    "DataConfig",
    "METRICS_FILE",
    "SyntheticDataConfig",
    "TrainConfig",
    "Trainer",
    "TrainingConfig",
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
    "parameter_groups",
    "save_checkpoint",
]
