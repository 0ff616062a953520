"""Which directory ``--model`` names: a saved MambaVLM, a Hub id, or a training run's output_dir."""

from __future__ import annotations

from pathlib import Path

from mambavlm.distill.run import CONFIG_COPY, STUDENT_DIR
from mambavlm.model import LEGACY_LLM_DIR, is_mambavlm_directory, missing_local_path
from mambavlm.training.finetune import (
    FINAL_ADAPTER_DIR,
    FINAL_MODEL_DIR,
    MERGED_MODEL_DIR,
    TRAIN_CONFIG_FILE,
)

__all__ = ["RUN_MODEL_DIRS", "model_label", "resolve_model_dir"]

RUN_MODEL_DIRS = (FINAL_MODEL_DIR, STUDENT_DIR, MERGED_MODEL_DIR)
"""Where a run's output_dir holds its model: fine-tuning's ``final/``, distillation's ``student/``, a LoRA
run's ``merged/`` (written by ``train/merge_lora.py``)."""
RUN_CONFIG_FILES = (TRAIN_CONFIG_FILE, CONFIG_COPY)
"""What a fine-tuning / distillation run writes into its output_dir when it starts."""


def model_label(model_dir: Path) -> str:
    """A model's name in the default output path: its run's directory name for a run's ``final/``,
    ``student/`` or ``merged/`` (every run names its model so), else its own."""
    return model_dir.parent.name if model_dir.name in RUN_MODEL_DIRS and model_dir.parent.name else model_dir.name


def resolve_model_dir(model: str | Path) -> Path:
    """A saved model directory (or Hub id) as given, or a run's output directory's model: fine-tuning's
    ``final/``, distillation's ``student/``, a LoRA run's ``merged/``.

    Raises:
        FileNotFoundError: a local path that does not exist; a LoRA adapter's directory; a run directory
            that holds no model (a LoRA run not merged, an unfinished run: each named).
    """
    path = Path(model).expanduser()
    if not path.exists():
        if missing_local_path(model):
            raise FileNotFoundError(f"--model {model}: no such directory")
        return path  # a Hub id
    if is_mambavlm_directory(path):
        return path
    for name in RUN_MODEL_DIRS:
        if is_mambavlm_directory(path / name):
            return path / name
    if path.name == FINAL_ADAPTER_DIR or (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--model {model} is a LoRA adapter, not a MambaVLM: merge it first with "
                                f"python train/merge_lora.py {model} --out {path.parent / MERGED_MODEL_DIR}")
    started = any((path / name).is_file() for name in RUN_CONFIG_FILES)
    if not path.is_dir() or (path / LEGACY_LLM_DIR).is_dir() or ((path / "config.json").is_file() and not started):
        return path  # not a run directory: from_pretrained says what is wrong with it
    found = [name for name in (*RUN_MODEL_DIRS, FINAL_ADAPTER_DIR) if (path / name).is_dir()]
    if FINAL_ADAPTER_DIR in found:
        detail = (f"it holds a LoRA adapter ({FINAL_ADAPTER_DIR}/): merge it first with python train/merge_lora.py "
                  f"{path / FINAL_ADAPTER_DIR} --out {path / MERGED_MODEL_DIR}")
    elif found:
        detail = f"its {found[0]}/ is not a saved MambaVLM (a text-only distillation's student?)"
    else:
        detail = (
            f"it holds neither a model of its own nor a run's {FINAL_MODEL_DIR}/ (fine-tuning) or "
            f"{STUDENT_DIR}/ (distillation)" + (" (did the run finish?)" if started else "")
        )
    raise FileNotFoundError(f"--model {model} is not a MambaVLM directory: {detail}")
