"""Distil a Transformer into a hybrid Mamba-2 model: ``run_distillation(config)``, what ``train/distill.py`` runs.

The teacher (a MambaVLM directory whose LLM is LLaMA-family, or an HF Llama directory) is loaded and
frozen in this process; the student is a converted copy (``mambavlm.distill.convert``) that keeps the
teacher's vision encoders and projector. The configured stages (mmMamba's stage1 -> stage2 -> stage3,
or MaTVLM's single ``matvlm`` stage) run in order as phases of the one training engine
(``mambavlm.training.engine``), each with its objective (``DistillationObjective``), its trainable set
(``StageTrainable``), AdamW and a warmup-stable-decay schedule; checkpoints, exact resume (mid-stage
too), bad-record skipping, trackers and logs come from the engine. At the end the student is saved to
``OUTPUT_DIR/student`` and ``OUTPUT_DIR/metrics.json`` records ``teacher_val_accuracy``,
``student_val_accuracy``, the skip counts and ``stages`` = [{name, first_loss, last_loss, ...}], where
first_loss / last_loss average the first / last tenth of the stage's steps (1 to 10 steps).

Validation accuracy is greedy exact match on the val split: generated answers for a MambaVLM (the
fine-tuning scorer), argmax of the answer tokens given the question for a text-only LM.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from mambavlm.atomic import atomic_file
from mambavlm.config import ConfigError, LLMConfig, dump_yaml
from mambavlm.data.collate import VLMCollator
from mambavlm.data.llava import LlavaDataset
from mambavlm.distill.config import DistillConfig
from mambavlm.distill.convert import convert_llama, convert_vlm
from mambavlm.distill.stages import (
    DistillationModule,
    DistillationObjective,
    StageTrainable,
    language_model,
)
from mambavlm.llm.factory import enable_activation_checkpointing
from mambavlm.llm.hybrid import mamba_mixers
from mambavlm.llm.templates import get_template
from mambavlm.llm.tokenizer import IGNORE_INDEX, build_tokenizer
from mambavlm.model import MambaVLM, is_mambavlm_directory
from mambavlm.training.checkpoint import (
    check_resumed_architecture,
    releasing_output_dir_on_error,
    resolve_resume,
)
from mambavlm.training.engine import (
    METRICS_FILE,
    Phase,
    Trainer,
    finished_run_metrics,
    structure_copy,
    throughput_summary,
)
from mambavlm.training.evaluation import generate_answers, read_vqa_items
from mambavlm.training.finetune import FINAL_MODEL_DIR, prepare_data, skip_metrics, training_dataset

__all__ = ["METRICS_FILE", "STUDENT_DIR", "load_teacher", "run_distillation"]

logger = get_logger(__name__)

STUDENT_DIR = "student"
CONFIG_COPY = "config.yaml"
STUDENT_ARCHITECTURE_KEYS = ("layout", "seeding", "mixer_options")
"""The settings that shape the student beside its teacher (which layers are Mamba-2, and the mixers'
sizes: mmMamba's and MaTVLM's seeding differ in heads and norms): a checkpoint resumes only with the
values it was saved with."""
TEACHER_KEYS = ("teacher",)
"""The settings that decide the teacher: a checkpoint resumes only with the values it was saved with too.
The config names the teacher by its directory alone (``template`` only formats an HF Llama teacher's
prompts), so ``teacher`` decides both its shapes and its weights. Its shapes are the student's: the
student is the teacher converted (its embeddings, MLPs, norms, kept attention layers, vision encoders
and projector), so another teacher's architecture does not fit the checkpoint, whose student weights
``load_state_dict`` refused only after the data had been prepared and config.yaml rewritten. Its weights
are not in the checkpoint (it holds the student alone: ``DistillationModule``) but are the targets of every
step left, so another teacher of the same shapes would change what the rest of the run distils, silently.
Compared as written, as every key is: a teacher moved, or its path spelt otherwise, is refused as well
(set the path back); a directory whose content was replaced in place is not seen here (the checkpoint
load still refuses other shapes)."""


def load_teacher(path: str | Path, template: str) -> tuple[nn.Module, Any, Any]:
    """(teacher, tokenizer, conversation template) from a MambaVLM or an HF Llama directory.

    Raises FileNotFoundError when ``path`` does not exist or holds neither model (a training run's
    output directory is named with the model directory inside it), ConfigError for a model that is
    not LLaMA-family."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"teacher {path} does not exist")
    if is_mambavlm_directory(path):
        teacher = MambaVLM.from_pretrained(path)
        if teacher.config.llm.family == "hybrid_llama":
            raise ConfigError(
                f"teacher {path} is already a distilled hybrid (Mamba-2 in layers {teacher.llm.mamba_layers}): "
                "distill from its LLaMA teacher, with the layout you want"
            )
        if teacher.config.llm.family != "llama":
            raise ConfigError(
                f"teacher {path}: its LLM is {teacher.config.llm.family!r}; distillation needs a LLaMA-family one"
            )
        return teacher, teacher.tokenizer, teacher.template
    if (path / "config.json").is_file():
        model_type = LlamaConfig.get_config_dict(str(path))[0].get("model_type")
        if model_type == "hybrid_llama":
            raise ConfigError(f"teacher {path} is already a distilled hybrid: distill from its LLaMA teacher, "
                              "with the layout you want")
        if model_type != "llama":
            raise ConfigError(f"teacher {path} holds a {model_type!r} model; distillation needs a 'llama' one")
        llm_config = LLMConfig(family="llama", source=str(path), template=template)
        teacher = LlamaForCausalLM.from_pretrained(path)
        return teacher, build_tokenizer(llm_config), get_template(template)
    saved = [path / sub for sub in (FINAL_MODEL_DIR, STUDENT_DIR) if is_mambavlm_directory(path / sub)]
    hint = f" (a training run's output directory? its model is {saved[0]})" if saved else ""
    raise FileNotFoundError(f"teacher {path}: neither a MambaVLM nor an HF model (config.json){hint}")


class TextOnly:
    """The image transform of a text-only teacher: an image record is an error naming the problem."""

    def __call__(self, image: Image.Image) -> Tensor:
        raise ValueError("the teacher is a text-only LM, but a record has an image: use a MambaVLM teacher")


def build_dataset(
    teacher: nn.Module, tokenizer: Any, template: Any, records: Path, image_root: Path, max_length: int | None
) -> LlavaDataset:
    """LLaVA-format records tokenised as the teacher was trained (its template, BOS, visual tokens)."""
    if isinstance(teacher, MambaVLM):
        return training_dataset(teacher, records, image_root, max_length)
    return LlavaDataset(
        records,
        image_root,
        tokenizer,
        template,
        [TextOnly()],
        1,
        max_length or teacher.config.max_position_embeddings,
        True,
    )


@torch.no_grad()
def answer_token_accuracy(model: nn.Module, dataset: LlavaDataset, batch_size: int, device: torch.device) -> float | None:
    """Share of samples whose every answer token is the argmax given the tokens before it."""
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=VLMCollator(dataset.tokenizer.pad_token_id))
    correct = total = 0
    for batch in loader:
        if batch["input_ids"] is None:
            continue
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        predicted, labels = logits[:, :-1].argmax(-1).cpu(), batch["labels"][:, 1:]
        answer = labels != IGNORE_INDEX
        correct += int(((predicted == labels) | ~answer).all(-1).sum())
        total += labels.shape[0]
    return correct / total if total else None


def val_accuracy(
    model: nn.Module, val_json: Path | None, image_root: Path, dataset: LlavaDataset | None, config: DistillConfig
) -> float | None:
    """Greedy exact match on the val split (None without one). A val entry that is not a record, or
    has no human turn then an assistant turn, is skipped with a warning naming it, as fine-tuning's
    evaluation skips it."""
    if val_json is None:
        return None
    model.eval()
    if isinstance(model, MambaVLM):
        items, _ = read_vqa_items(val_json, image_root)
        rows, _ = generate_answers(model, items, config.eval_batch_size, config.eval_max_new_tokens)
        return sum(r["correct"] for r in rows) / len(rows) if rows else None
    return answer_token_accuracy(model, dataset, config.eval_batch_size, model.device)


def _window(num_steps: int) -> int:
    return max(1, min(10, num_steps // 10))


def stage_summary(name: str, lr: float, losses: list[float | None]) -> dict[str, Any]:
    """{name, first_loss, last_loss, steps, lr, step_losses}: first / last loss average the first / last
    tenth of the steps (1 to 10) whose loss is known."""
    known = [x for x in losses if x is not None]
    window = _window(len(known))
    return {
        "name": name,
        "first_loss": sum(known[:window]) / window if known else None,
        "last_loss": sum(known[-window:]) / window if known else None,
        "steps": len(losses),
        "lr": lr,
        "step_losses": losses,
    }


@releasing_output_dir_on_error
def run_distillation(config: DistillConfig) -> dict[str, Any]:
    """Convert the teacher, run the stages, save the student and metrics.json; returns the metrics
    (on the main process; ``{}`` elsewhere). Raises TrainingStopped (the step's checkpoint written,
    ``output_dir`` released) when a SIGTERM stops the run, mid-stage or not. Any other error (a teacher that
    cannot load, a layout it cannot take, ...) releases ``output_dir`` too, removing it (and the parents
    created with it) when the run created it and wrote nothing into it (``releasing_output_dir_on_error``).
    ``resume_from=latest`` on a run that has finished with this config returns its metrics as they are,
    writing nothing (``finished_run_metrics``)."""
    started = time.perf_counter()
    output_dir = Path(config.output_dir)
    finished = finished_run_metrics(output_dir, config.resume_from, "resume_from", config.model_dump(mode="json"),
                                    output_dir / STUDENT_DIR)
    if finished is not None:
        return finished
    trainer = Trainer(
        output_dir,
        seed=config.seed,
        mixed_precision=config.mixed_precision,
        trackers=config.trackers,
        log_every=config.log_every,
        save_every=config.save_every,
        sync_each_batch=config.sync_each_batch,
        profile_step=config.profile_step,
        keep_last=config.keep_last,
        resume_from=config.resume_from,
        num_workers=config.data.num_workers,
        cpu_threads=config.cpu_threads,
    )
    # before anything is written (config.yaml, the data) and before the teacher loads
    check_resumed_architecture(resolve_resume(config.resume_from, output_dir), CONFIG_COPY, config.model_dump(mode="json"),
                               STUDENT_ARCHITECTURE_KEYS + TEACHER_KEYS, "resume_from")
    acc = trainer.accelerator
    set_seed(config.seed)
    with trainer.building_models():  # before the data: a teacher that cannot load stops the run at once
        teacher, tokenizer, template = load_teacher(config.teacher, config.template)
    num_layers = language_model(teacher).config.num_hidden_layers
    try:  # the layout against the teacher's depth, before the data is written
        config.layout.mamba_layers(num_layers)
    except ValueError as err:
        raise ConfigError(f"layout={config.layout}: {err} (the teacher {config.teacher})") from None
    train_json, val_json, image_root = prepare_data(config.data, output_dir, acc)
    image_root = image_root if image_root is not None else train_json.parent
    longest = teacher.config.max_sequence_length if isinstance(teacher, MambaVLM) else teacher.config.max_position_embeddings
    if config.data.max_length is not None and config.data.max_length > longest:
        raise ConfigError(
            f"data.max_length={config.data.max_length} exceeds what the teacher {config.teacher} takes ({longest} tokens)"
        )
    teacher.requires_grad_(False)
    teacher.eval().to(acc.device)
    generator = torch.Generator().manual_seed(config.seed)  # CPU draws: the same student on any device
    with trainer.building_models():
        if isinstance(teacher, MambaVLM):
            student = convert_vlm(teacher, config.layout, config.seeding, generator, config.mixer_options)
        else:
            student = convert_llama(teacher, config.layout, config.seeding, generator, config.mixer_options)
    if config.gradient_checkpointing:
        enable_activation_checkpointing(language_model(student))
    mamba_layers = sorted(mamba_mixers(language_model(student)))
    logger.info(f"student: Mamba-2 in layers {mamba_layers} of {num_layers} ({config.layout}, {config.seeding} seeding)")

    max_length = config.data.max_length
    train_set = build_dataset(teacher, tokenizer, template, train_json, image_root, max_length)
    val_set = build_dataset(teacher, tokenizer, template, val_json, image_root, max_length) if val_json else None
    if acc.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / CONFIG_COPY).write_text(dump_yaml(config.model_dump(mode="json")))
    teacher_accuracy = val_accuracy(teacher, val_json, image_root, val_set, config) if acc.is_main_process else None

    module = DistillationModule(student, teacher)
    skeleton = DistillationModule(structure_copy(student), teacher)  # what the gathered student fills (FSDP
    # wraps `module` in place)
    phases = [
        Phase(
            name=stage.name,
            objective=DistillationObjective(module, stage.name, stage.loss_weights, stage.variant),
            trainable=StageTrainable(stage.name, stage.variant),
            lr=stage.lr,
            global_batch_size=stage.global_batch_size,
            micro_batch_size=stage.micro_batch_size,
            max_steps=stage.max_steps,
            weight_decay=stage.weight_decay,
            max_grad_norm=stage.max_grad_norm,
            schedule="wsd",
            warmup_ratio=stage.warmup_ratio,
            decay_ratio=stage.decay_ratio,
        )
        for stage in config.stages
    ]
    state = trainer.run_or_end(phases, train_set, VLMCollator(tokenizer.pad_token_id))
    trained = trainer.gathered_module(lambda: skeleton)
    metrics: dict[str, Any] = {}
    if acc.is_main_process:
        student = trained.student.eval()
        student.save_pretrained(output_dir / STUDENT_DIR)
        if not isinstance(student, MambaVLM):
            tokenizer.save_pretrained(output_dir / STUDENT_DIR)
        stages = [stage_summary(s.name, s.lr, losses) for s, losses in zip(config.stages, state.phase_losses)]
        metrics = {
            "teacher_val_accuracy": teacher_accuracy,
            "student_val_accuracy": val_accuracy(student, val_json, image_root, val_set, config),
            "stages": stages,
            "throughput": throughput_summary(state, [stage.name for stage in config.stages]),
            **skip_metrics(state),
            "layout": str(config.layout),
            "seeding": config.seeding,
            "mamba_layers": mamba_layers,
            "num_layers": num_layers,
            "num_processes": acc.num_processes,
            "gradient_accumulation_steps": acc.gradient_accumulation_steps,
            "wall_seconds": time.perf_counter() - started,
            "config": config.model_dump(mode="json"),
        }
        with atomic_file(output_dir / METRICS_FILE) as f:
            json.dump(metrics, f, indent=1)
        summary = ", ".join(
            f"{s['name']} {s['first_loss']:.4g} -> {s['last_loss']:.4g}" for s in stages if s["first_loss"] is not None
        )
        logger.info(
            f"done in {metrics['wall_seconds']:.0f} s: loss, mean of the first -> last tenth of each stage's steps: "
            f"{summary}; val accuracy teacher "
            f"{metrics['teacher_val_accuracy']}, student {metrics['student_val_accuracy']}, "
            f"{state.num_skipped} skipped records; student in {output_dir / STUDENT_DIR}"
        )
    acc.wait_for_everyone()
    trainer.end()
    return metrics
