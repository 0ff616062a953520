"""Fine-tune a MambaVLM: ``run_finetune(config)``, what ``train/finetune.py`` runs.

Builds the model and data of a ``TrainConfig``, trains with the one engine (``mambavlm.training.engine``:
one phase, the next-token objective, a freeze preset or, with a ``lora:`` section, LoRA adapters),
saves the final model with ``save_pretrained`` (the adapters with ``save_adapter``), scores the val
split by greedy exact match and writes ``metrics.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed

from mambavlm.atomic import atomic_file
from mambavlm.config import ConfigError, dump_yaml
from mambavlm.data.collate import VLMCollator
from mambavlm.data.llava import LlavaDataset, check_records_file, load_records
from mambavlm.data.synthetic import make_shapes_vqa
from mambavlm.llm.factory import (
    check_mamba_training_kernels,
    enable_activation_checkpointing,
)
from mambavlm.model import MambaVLM, build_model, is_mambavlm_directory
from mambavlm.training.checkpoint import (
    check_resumed_architecture,
    releasing_output_dir_on_error,
    resolve_resume,
)
from mambavlm.training.config import DataConfig, TrainConfig
from mambavlm.training.engine import (
    METRICS_FILE,
    Phase,
    Trainer,
    TrainerState,
    finished_run_metrics,
    format_loss,
    structure_copy,
    throughput_summary,
)
from mambavlm.training.evaluation import BlankImage, VQAItem, generate_answers, read_vqa_items
from mambavlm.training.lora import (
    MODEL_CONFIG_FILE,
    LoraTrainable,
    apply_lora,
    save_adapter,
)
from mambavlm.training.objectives import NextTokenObjective
from mambavlm.training.optim import FreezePreset

__all__ = ["FINAL_MODEL_DIR", "METRICS_FILE", "prepare_data", "resolve_adapter_dir", "run_finetune", "skip_metrics"]

logger = get_logger(__name__)

FINAL_MODEL_DIR = "final"
SYNTHETIC_DIR = "data"
SYNTHETIC_SPEC_FILE = "synthetic.json"
VAL_ANSWERS_FILE = "val_answers.jsonl"
TRAIN_CONFIG_FILE = "train_config.yaml"
FINAL_ADAPTER_DIR = "final_adapter"
"""Where a LoRA run writes its adapters (``python train/merge_lora.py`` makes a full model of them)."""
MERGED_MODEL_DIR = "merged"
"""Where the README's ``python train/merge_lora.py RUN/final_adapter --out RUN/merged`` puts a LoRA run's merged
model: the run's model for ``eval/``, ``chat`` and ``describe``, as ``final/`` is a full fine-tuning's."""


def resolve_adapter_dir(path: str | Path) -> Path:
    """A LoRA run's adapter directory: ``path`` itself (what ``save_adapter`` wrote) or the
    ``final_adapter/`` of the run whose output_dir it is.

    Raises:
        FileNotFoundError: ``path`` does not exist, holds a full model (nothing to merge), or neither.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such directory")
    for candidate in (path, path / FINAL_ADAPTER_DIR):
        if (candidate / MODEL_CONFIG_FILE).is_file():
            return candidate
    if is_mambavlm_directory(path) or is_mambavlm_directory(path / FINAL_MODEL_DIR):
        raise FileNotFoundError(f"{path} holds a full model, not LoRA adapters: there is nothing to merge")
    raise FileNotFoundError(f"{path} holds no LoRA adapters: expected a LoRA run's output_dir or its "
                            f"{FINAL_ADAPTER_DIR}/ ({MODEL_CONFIG_FILE} and peft's adapter files)")


@releasing_output_dir_on_error
def run_finetune(config: TrainConfig) -> dict[str, Any]:
    """Train, save ``final/`` and the last checkpoint (none with ``train.checkpoints=false``), score the val
    split; returns the metrics.

    The metrics (``OUTPUT_DIR/metrics.json``) are returned on the main process, ``{}`` elsewhere. Raises
    TrainingStopped (the step's checkpoint written, ``output_dir`` released) when a SIGTERM stops the run.
    Any other error releases ``output_dir`` too, removing it (and the parents created with it) when the run
    created it and wrote nothing into it (``releasing_output_dir_on_error``). ``train.resume_from=latest``
    on a run that has finished with this config returns its metrics as they are, writing nothing
    (``finished_run_metrics``).
    """
    started = time.perf_counter()
    cfg = config
    output_dir = Path(cfg.output_dir)
    model_dir = output_dir / (FINAL_MODEL_DIR if cfg.lora is None else FINAL_ADAPTER_DIR)
    finished = finished_run_metrics(output_dir, cfg.train.resume_from, "train.resume_from",
                                    cfg.model_dump(mode="json"), model_dir)
    if finished is not None:
        return finished
    trainer = Trainer(
        output_dir,
        seed=cfg.seed,
        mixed_precision=cfg.train.mixed_precision,
        trackers=cfg.trackers,
        tracker_config=_flat_scalars(cfg.model_dump(mode="json")),
        log_every=cfg.train.log_every,
        save_every=cfg.train.save_every if cfg.train.checkpoints else None,
        save_checkpoints=cfg.train.checkpoints,
        sync_each_batch=cfg.train.sync_each_batch,
        profile_step=cfg.train.profile_step,
        keep_last=cfg.train.keep_last,
        resume_from=cfg.train.resume_from,
        num_workers=cfg.data.num_workers,
        cpu_threads=cfg.cpu_threads,
    )
    resume = resolve_resume(cfg.train.resume_from, output_dir, "train.resume_from")
    check_resumed_architecture(resume, TRAIN_CONFIG_FILE, cfg.model_dump(mode="json"), ("model", "lora"),
                               "train.resume_from")
    acc = trainer.accelerator
    set_seed(cfg.seed)
    with trainer.building_models():  # before the data: a model config error stops the run at once
        model = build_model(cfg.model)
    check_mamba_training_kernels(model.llm, acc.device)
    if cfg.lora is not None:  # before the data too: a bad target is a config error
        apply_lora(model, cfg.lora)
    train_json, val_json, image_root = prepare_data(cfg.data, output_dir, acc)
    if cfg.train.gradient_checkpointing:
        enable_activation_checkpointing(model.llm)
    dataset = training_dataset(model, train_json, image_root, cfg.data.max_length, cfg.blind)
    val = val_items(val_json, image_root)  # before training: a val file that cannot be read stops the run now
    if acc.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / TRAIN_CONFIG_FILE).write_text(dump_yaml(cfg.model_dump(mode="json")))
    train = cfg.train
    phase = Phase(
        name="finetune",
        objective=NextTokenObjective(model),
        trainable=FreezePreset(train.freeze) if cfg.lora is None else LoraTrainable(cfg.lora),
        lr=train.lr,
        global_batch_size=train.global_batch_size,
        micro_batch_size=train.micro_batch_size,
        max_steps=train.max_steps,
        epochs=train.epochs,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        schedule="cosine",
        warmup_ratio=train.warmup_ratio,
    )
    # what the gathered weights fill when FSDP / ZeRO-3 shard the model in place: no second build (a
    # paper-shaped model takes a minute to initialise on the CPU, only to be overwritten)
    skeleton = structure_copy(model)
    state = trainer.run_or_end([phase], dataset, VLMCollator(model.tokenizer.pad_token_id))
    final_model = trainer.gathered_module(lambda: skeleton)
    metrics: dict[str, Any] = {}
    if acc.is_main_process:
        if cfg.lora is None:
            final_model.save_pretrained(output_dir / FINAL_MODEL_DIR)
        else:
            save_adapter(final_model, cfg.lora, output_dir / FINAL_ADAPTER_DIR)
        metrics = {
            "step_losses": state.phase_losses[0],
            **evaluate_val(final_model, cfg, val, output_dir),
            **skip_metrics(state),
            "throughput": throughput_summary(state, [phase.name])[0],
            "steps": state.step,
            "num_processes": acc.num_processes,
            "gradient_accumulation_steps": acc.gradient_accumulation_steps,
            "wall_seconds": time.perf_counter() - started,
            "config": cfg.model_dump(mode="json"),
        }
        with atomic_file(output_dir / METRICS_FILE) as f:
            json.dump(metrics, f, indent=1)
        final_loss = state.phase_losses[0][-1] if state.phase_losses[0] else None
        logger.info(
            f"done in {metrics['wall_seconds']:.1f} s: final loss {format_loss(final_loss)}, "
            f"val accuracy {metrics['val_accuracy']}, {state.num_skipped} skipped records; "
            f"{'model' if cfg.lora is None else 'adapters'} in "
            f"{output_dir / (FINAL_MODEL_DIR if cfg.lora is None else FINAL_ADAPTER_DIR)}"
        )
    acc.wait_for_everyone()
    trainer.end()
    return metrics


def skip_metrics(state: TrainerState) -> dict[str, Any]:
    """The skip and truncation counts of a run, for metrics.json."""
    return {
        "num_skipped": state.num_skipped,
        "skipped_by_kind": dict(sorted(state.skipped_by_kind.items())),
        "num_truncated": state.num_truncated,
    }


def training_dataset(
    model: MambaVLM, train_json: Path, image_root: Path | None, max_length: int | None, blind: bool = False
) -> LlavaDataset:
    """LLaVA-format records tokenised for ``model`` (its template, BOS, visual tokens, encoders' transforms)."""
    transforms = [encoder.preprocess for encoder in model.vision.encoders]
    if blind:
        transforms = [BlankImage(t) for t in transforms]
    try:
        records = load_records(train_json)
    except ValueError as err:  # not JSON, or not a list: the user's file to fix, one line naming the key
        raise ConfigError(f"data.train: {err}") from None
    return LlavaDataset(
        records,
        image_root if image_root is not None else train_json.parent,
        model.tokenizer,
        model.template,
        transforms,
        model.num_visual_tokens,
        max_length or model.config.max_sequence_length,
        model.add_bos,
    )


def val_items(val_json: Path | None, image_root: Path | None) -> tuple[list[VQAItem], list[tuple[str, str]]] | None:
    """The val split's questions and the records skipped as unanswerable (``read_vqa_items``), read before
    training; None without a val split.

    Raises:
        ConfigError: naming ``data.val``, for a file that is not a JSON list of records.
    """
    if val_json is None:
        return None
    try:
        return read_vqa_items(val_json, image_root)
    except ValueError as err:
        raise ConfigError(f"data.val: {err}") from None


def evaluate_val(
    model: MambaVLM,
    config: TrainConfig,
    val: tuple[list[VQAItem], list[tuple[str, str]]] | None,
    output_dir: Path,
) -> dict[str, Any]:
    """Greedy exact match on the val split's items (``val_items``; main process); answers go to
    val_answers.jsonl. The records skipped when they were read and those that cannot be answered (an
    unreadable image, a prompt too long) are both in ``val_skipped``."""
    if val is None:
        return {"val_accuracy": None, "val_num_items": 0, "val_num_skipped": 0, "val_skipped": []}
    items, unreadable = val
    model.eval()
    rows, skipped = generate_answers(
        model, items, config.train.eval_batch_size, config.train.eval_max_new_tokens, blind=config.blind
    )
    skipped = unreadable + skipped
    with atomic_file(output_dir / VAL_ANSWERS_FILE) as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    accuracy = sum(r["correct"] for r in rows) / len(rows) if rows else None
    return {
        "val_accuracy": accuracy,
        "val_num_items": len(rows),
        "val_num_skipped": len(skipped),
        "val_skipped": [{"id": record_id, "reason": reason} for record_id, reason in skipped],
    }


def _flat_scalars(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"a.b.c": scalar} (lists as strings), the form trackers accept."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat_scalars(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def prepare_data(
    data: DataConfig, output_dir: Path, accelerator: Accelerator
) -> tuple[Path, Path | None, Path | None]:
    """(train JSON, val JSON or None, image root or None) of ``data``.

    Named files are checked to exist; otherwise the synthetic Shapes-VQA task is written under
    ``output_dir/data`` by the main process (once per spec) while the others wait.
    """
    if data.train is not None:
        paths = {"data.train": data.train, "data.val": data.val}
        for key, value in paths.items():
            if value is not None and not Path(value).is_file():
                raise FileNotFoundError(f"{key}: file not found: {value}")
            if value is not None:
                try:  # its first bytes: JSON Lines, a JSON object or not JSON at all fail here, before any work
                    check_records_file(value)
                except ValueError as err:
                    raise ConfigError(f"{key}: {err}") from None
        if data.image_root is not None and not Path(data.image_root).is_dir():
            raise FileNotFoundError(f"data.image_root: directory not found: {data.image_root}")
        root = Path(data.image_root) if data.image_root is not None else None
        return Path(data.train), Path(data.val) if data.val is not None else None, root
    synthetic = data.synthetic
    out_dir = output_dir / SYNTHETIC_DIR
    spec = synthetic.model_dump()
    spec_file = out_dir / SYNTHETIC_SPEC_FILE
    if accelerator.is_main_process:
        if not spec_file.is_file() or json.loads(spec_file.read_text()) != spec:
            logger.info(f"writing the synthetic Shapes-VQA task to {out_dir}")
            make_shapes_vqa(out_dir, synthetic.num_train, synthetic.num_val, synthetic.image_size, synthetic.seed)
            with atomic_file(spec_file) as f:
                json.dump(spec, f)
    accelerator.wait_for_everyone()
    return out_dir / "train.json", (out_dir / "val.json" if synthetic.num_val else None), out_dir
