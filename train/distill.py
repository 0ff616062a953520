"""Distill a Transformer into a hybrid Mamba-2 model: ``accelerate launch train/distill.py --config
configs/distill/NAME.yaml [teacher=DIR layout=... output_dir=... key=value ...]``.

The teacher (a MambaVLM directory whose LLM is LLaMA-family, or an HF Llama directory) is loaded and
frozen in this process; the student is a converted copy (``mambavlm.distill.hybrid``) that keeps the
teacher's vision encoders and projector. The configured stages run in order (mmMamba's stage1 ->
stage2 -> stage3, or MaTVLM's single ``matvlm`` stage), each with its own AdamW and
warmup-stable-decay schedule over the parameters the stage trains. At the end the student is saved
to ``OUTPUT_DIR/student`` and ``OUTPUT_DIR/metrics.json`` records ``teacher_val_accuracy``,
``student_val_accuracy`` and ``stages`` = [{name, first_loss, last_loss, ...}], where first_loss /
last_loss average the first / last tenth of the stage's steps (1 to 10 steps).

Validation accuracy is greedy exact match on the val split: generated answers for a MambaVLM (the
training loop's scorer), argmax of the answer tokens given the question for a text-only LM.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.data_loader import SeedableRandomSampler
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, GradientAccumulationPlugin, set_seed
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM, get_wsd_schedule

from mambavlm.config import ConfigError, LLMConfig
from mambavlm.data.collate import VLMCollator
from mambavlm.data.llava import LlavaDataset
from mambavlm.distill.config import DistillConfig, DistillStageConfig, load_distill_config
from mambavlm.distill.hybrid import convert_llama, convert_vlm, mamba_mixers
from mambavlm.distill.stages import DistillationObjective, language_model, set_trainable
from mambavlm.io import atomic_file
from mambavlm.llm.templates import get_template
from mambavlm.llm.tokenizer import IGNORE_INDEX, build_tokenizer
from mambavlm.model import CONFIG_FILE, MambaVLM
from mambavlm.training.evaluation import generate_answers, load_vqa_items
from mambavlm.training.loop import gradient_accumulation_steps, prepare_data
from mambavlm.training.optim import build_optimizer

logger = get_logger(__name__)

METRICS_FILE = "metrics.json"
STUDENT_DIR = "student"


def load_teacher(path: str | Path, template: str) -> tuple[nn.Module, Any, Any]:
    """(teacher, tokenizer, conversation template) from a MambaVLM or an HF Llama directory."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        teacher = MambaVLM.from_pretrained(path)
        if teacher.config.llm.family != "llama":
            raise ConfigError(
                f"teacher {path}: its LLM is {teacher.config.llm.family!r}; distillation needs a LLaMA-family one"
            )
        return teacher, teacher.tokenizer, teacher.template
    if (path / "config.json").is_file():
        model_type = LlamaConfig.get_config_dict(str(path))[0].get("model_type")
        if model_type != "llama":
            raise ConfigError(f"teacher {path} holds a {model_type!r} model; distillation needs a 'llama' one")
        llm_config = LLMConfig(family="llama", source=str(path), template=template)
        teacher = LlamaForCausalLM.from_pretrained(path)
        return teacher, build_tokenizer(llm_config), get_template(template)
    raise FileNotFoundError(f"teacher {path}: neither a MambaVLM ({CONFIG_FILE}) nor an HF model (config.json)")


class TextOnly:
    """The image transform of a text-only teacher: an image record is an error naming the problem."""

    def __call__(self, image: Image.Image) -> Tensor:
        raise ValueError("the teacher is a text-only LM, but a record has an image: use a MambaVLM teacher")


def build_dataset(
    teacher: nn.Module, tokenizer: Any, template: Any, records: Path, image_root: Path, max_length: int | None
) -> LlavaDataset:
    """LLaVA-format records tokenised as the teacher was trained (its template, BOS, visual tokens)."""
    if isinstance(teacher, MambaVLM):
        return LlavaDataset(
            records,
            image_root,
            tokenizer,
            template,
            [encoder.preprocess for encoder in teacher.vision.encoders],
            teacher.num_visual_tokens,
            max_length or teacher.config.max_length,
            teacher.add_bos,
        )
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
    """Greedy exact match on the val split (None without one)."""
    if val_json is None:
        return None
    model.eval()
    if isinstance(model, MambaVLM):
        rows, _ = generate_answers(
            model, load_vqa_items(val_json, image_root), config.eval_batch_size, config.eval_max_new_tokens
        )
        return sum(r["correct"] for r in rows) / len(rows) if rows else None
    return answer_token_accuracy(model, dataset, config.eval_batch_size, model.device)


def _window(num_steps: int) -> int:
    return max(1, min(10, num_steps // 10))


def run_stage(
    accelerator: Accelerator,
    objective: DistillationObjective,
    stage: DistillStageConfig,
    dataset: LlavaDataset,
    pad_token_id: int,
    config: DistillConfig,
) -> dict[str, Any]:
    """Train ``objective.student`` for one stage; returns {name, first_loss, last_loss, steps, ...}."""
    accelerator.gradient_accumulation_steps = gradient_accumulation_steps(
        stage.global_batch_size, stage.micro_batch_size, accelerator.num_processes
    )
    objective.stage, objective.weights = stage.name, stage.loss_weights
    trainable = set_trainable(objective.student, stage.name)
    optimizer = build_optimizer(objective, stage.lr, stage.weight_decay)
    warmup = math.ceil(stage.warmup_ratio * stage.max_steps)
    decay = min(math.ceil(stage.decay_ratio * stage.max_steps), stage.max_steps - warmup)
    scheduler = get_wsd_schedule(optimizer, warmup, decay, num_training_steps=stage.max_steps)
    loader = DataLoader(
        dataset,
        batch_size=stage.micro_batch_size,
        sampler=SeedableRandomSampler(dataset, data_seed=config.seed),
        collate_fn=VLMCollator(pad_token_id),
        num_workers=config.data.num_workers,
        drop_last=True,
    )
    model, optimizer, scheduler, loader = accelerator.prepare(objective, optimizer, scheduler, loader)
    if len(loader) < accelerator.gradient_accumulation_steps:
        raise ConfigError(f"stage {stage.name}: {len(dataset)} records are fewer than one global batch")
    logger.info(
        f"stage {stage.name}: {stage.max_steps} steps at lr {stage.lr:g}, "
        f"{sum(p.numel() for p in objective.parameters() if p.requires_grad):,} trainable parameters "
        f"in {len(trainable)} tensors"
    )
    model.train()
    objective.teacher.eval()
    losses: list[float] = []
    step_loss, micro_steps, epoch, valid_batch = torch.zeros((), device=accelerator.device), 0, 0, None
    while len(losses) < stage.max_steps:
        loader.set_epoch(epoch)
        for batch in loader:
            skipped = batch["input_ids"] is None
            if not skipped:
                valid_batch = batch
            elif valid_batch is None:
                raise ValueError("every record of the first micro-batch was skipped: check the data")
            with accelerator.accumulate(model):
                # A micro-batch whose records were all skipped still runs (on the last valid batch, with
                # zero weight), so that every process takes part in each gradient synchronisation.
                loss, _ = model(valid_batch)
                loss = loss * 0.0 if skipped else loss
                step_loss += loss.detach()
                micro_steps += 0 if skipped else 1
                accelerator.backward(loss)
                if accelerator.sync_gradients and stage.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(model.parameters(), stage.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            losses.append(float(accelerator.reduce(step_loss / max(micro_steps, 1), "mean")))
            step_loss.zero_()
            micro_steps = 0
            if len(losses) % config.log_every == 0 or len(losses) == stage.max_steps:
                logger.info(f"stage {stage.name} step {len(losses)}/{stage.max_steps}: loss {losses[-1]:.6f}")
            if len(losses) == stage.max_steps:
                break
        epoch += 1
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    window = _window(len(losses))
    return {
        "name": stage.name,
        "first_loss": sum(losses[:window]) / window,
        "last_loss": sum(losses[-window:]) / window,
        "steps": len(losses),
        "lr": stage.lr,
        "step_losses": losses,
    }


def run_distillation(config: DistillConfig) -> dict[str, Any]:
    """Convert the teacher, run the stages, save the student and metrics.json; returns the metrics."""
    started = time.perf_counter()
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1, sync_with_dataloader=False),
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    train_json, val_json, image_root = prepare_data(config.data, output_dir, accelerator)
    image_root = image_root if image_root is not None else train_json.parent
    set_seed(config.seed)
    teacher, tokenizer, template = load_teacher(config.teacher, config.template)
    teacher.requires_grad_(False)
    teacher.eval().to(accelerator.device)
    generator = torch.Generator().manual_seed(config.seed)  # CPU draws: the same student on any device
    if isinstance(teacher, MambaVLM):
        student = convert_vlm(teacher, config.layout, config.seeding, generator)
    else:
        student = convert_llama(teacher, config.layout, config.seeding, generator)
    if config.gradient_checkpointing:
        language_model(student).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mamba_layers = sorted(mamba_mixers(language_model(student)))
    num_layers = language_model(teacher).config.num_hidden_layers
    logger.info(f"student: Mamba-2 in layers {mamba_layers} of {num_layers} ({config.layout}, {config.seeding} seeding)")

    max_length = config.data.max_length
    train_set = build_dataset(teacher, tokenizer, template, train_json, image_root, max_length)
    val_set = build_dataset(teacher, tokenizer, template, val_json, image_root, max_length) if val_json else None
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    teacher_accuracy = val_accuracy(teacher, val_json, image_root, val_set, config) if accelerator.is_main_process else None

    objective = DistillationObjective(student, teacher, config.stages[0].name)
    stages = [
        run_stage(accelerator, objective, stage, train_set, tokenizer.pad_token_id, config)
        for stage in config.stages
    ]
    metrics: dict[str, Any] = {}
    if accelerator.is_main_process:
        student = objective.student.eval()
        student.save_pretrained(output_dir / STUDENT_DIR)
        if not isinstance(student, MambaVLM):
            tokenizer.save_pretrained(output_dir / STUDENT_DIR)
        metrics = {
            "teacher_val_accuracy": teacher_accuracy,
            "student_val_accuracy": val_accuracy(student, val_json, image_root, val_set, config),
            "stages": stages,
            "layout": str(config.layout),
            "seeding": config.seeding,
            "mamba_layers": mamba_layers,
            "num_layers": num_layers,
            "wall_seconds": time.perf_counter() - started,
            "config": config.model_dump(mode="json"),
        }
        with atomic_file(output_dir / METRICS_FILE) as f:
            json.dump(metrics, f, indent=1)
        summary = ", ".join(f"{s['name']} {s['first_loss']:.4g} -> {s['last_loss']:.4g}" for s in stages)
        logger.info(
            f"done in {metrics['wall_seconds']:.0f} s: {summary}; val accuracy teacher "
            f"{metrics['teacher_val_accuracy']}, student {metrics['student_val_accuracy']}; "
            f"student in {output_dir / STUDENT_DIR}"
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="distill YAML (configs/distill/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (teacher=DIR layout=ratio:0.25 ...)")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return run_distillation(load_distill_config(args.config, args.overrides))


if __name__ == "__main__":
    main()
