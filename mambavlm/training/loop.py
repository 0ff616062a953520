"""The training loop: one code path for a laptop CPU, one GPU and many (DDP, FSDP, DeepSpeed ZeRO-2).

``Trainer(config).run()`` builds the model and data, trains with accelerate (gradient accumulation to
the global batch, clipping, mixed precision), writes checkpoints, saves the final model with
``save_pretrained``, scores the val split by greedy exact match and writes ``metrics.json``.

Determinism: the shuffle of epoch ``e`` is a function of ``(seed, e)`` only, and a checkpoint stores
how many batches of the current epoch were consumed, so a resumed run sees exactly the batches an
uninterrupted run would. Each optimiser step consumes ``global_batch_size`` samples: micro-batches
``k*n*a ... (k+1)*n*a - 1`` of the epoch's order (``n`` processes, ``a`` accumulation steps), process
``p`` taking every ``n``-th one, so the processes' batches partition the step's batch whatever ``n`` is.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.data_loader import SeedableRandomSampler
from accelerate.logging import get_logger
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    set_seed,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mambavlm.config import ConfigError
from mambavlm.data.collate import VLMCollator
from mambavlm.data.llava import LlavaDataset, SkippedSample
from mambavlm.data.synthetic import make_shapes_vqa
from mambavlm.io import atomic_file
from mambavlm.llm.factory import check_mamba_training_kernels
from mambavlm.model import MambaVLM, build_model
from mambavlm.training.checkpoint import (
    load_checkpoint,
    remove_unfinished_writes,
    resolve_resume,
    save_checkpoint,
)
from mambavlm.training.config import DataConfig, TrainConfig
from mambavlm.training.evaluation import BlankImage, generate_answers, load_vqa_items
from mambavlm.training.optim import apply_freeze_policy, build_optimizer, build_scheduler

__all__ = ["FINAL_MODEL_DIR", "METRICS_FILE", "Trainer", "gradient_accumulation_steps"]

logger = get_logger(__name__)

METRICS_FILE = "metrics.json"
FINAL_MODEL_DIR = "final"
SYNTHETIC_DIR = "data"
SYNTHETIC_SPEC_FILE = "synthetic.json"
VAL_ANSWERS_FILE = "val_answers.jsonl"
TRAIN_CONFIG_FILE = "train_config.yaml"


def gradient_accumulation_steps(global_batch_size: int, micro_batch_size: int, num_processes: int) -> int:
    """``global / (micro * processes)``; a ConfigError when it does not divide evenly."""
    per_pass = micro_batch_size * num_processes
    if global_batch_size % per_pass:
        raise ConfigError(
            f"train.global_batch_size={global_batch_size} is not a multiple of train.micro_batch_size="
            f"{micro_batch_size} x {num_processes} processes = {per_pass}"
        )
    return global_batch_size // per_pass


class Trainer:
    """Runs one training job described by a :class:`TrainConfig`."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=config.train.mixed_precision,
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1, sync_with_dataloader=False),
            step_scheduler_with_optimizer=False,
            log_with=list(config.trackers) or None,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
            # a micro-batch of text-only samples leaves the projector unused
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        self.accumulation = gradient_accumulation_steps(
            config.train.global_batch_size, config.train.micro_batch_size, self.accelerator.num_processes
        )
        self.accelerator.gradient_accumulation_steps = self.accumulation
        self._standin_batch: dict[str, Any] | None = None

    def run(self) -> dict[str, Any]:
        """Train, save ``final/`` and the last checkpoint, score the val split; returns the metrics.

        The metrics (``OUTPUT_DIR/metrics.json``) are returned on the main process, ``{}`` elsewhere.
        """
        started = time.perf_counter()
        cfg, acc = self.config, self.accelerator
        train_json, val_json, image_root = prepare_data(self.config.data, self.output_dir, self.accelerator)
        set_seed(cfg.seed)
        model = build_model(cfg.model)
        check_mamba_training_kernels(model.llm, acc.device)
        apply_freeze_policy(model, cfg.train.freeze)
        if cfg.train.gradient_checkpointing:
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.tokenizer = model.tokenizer
        self.train_set = self._dataset(model, train_json, image_root)
        # each process gets every n-th of the epoch's full micro-batches (accelerate's sharding)
        batches_per_process = len(self.train_set) // cfg.train.micro_batch_size // acc.num_processes
        steps_per_epoch = batches_per_process // self.accumulation
        if steps_per_epoch == 0:
            raise ConfigError(
                f"data.train has {len(self.train_set)} records: fewer than one global batch "
                f"(train.global_batch_size={cfg.train.global_batch_size})"
            )
        total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
        optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay)
        scheduler = build_scheduler(optimizer, total_steps, cfg.train.warmup_ratio)
        model, optimizer, loader, scheduler = acc.prepare(
            model, optimizer, self._loader(self.train_set), scheduler
        )
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            remove_unfinished_writes(self.output_dir)
            (self.output_dir / TRAIN_CONFIG_FILE).write_text(
                yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
            )
        if cfg.trackers:
            acc.init_trackers("mambavlm", config=_flat_scalars(cfg.model_dump(mode="json")))

        state = self._initial_state()
        resume = resolve_resume(cfg.train.resume_from, self.output_dir)
        if resume is not None:
            state = self._resume(resume)
        logger.info(
            f"{len(self.train_set)} training records, {acc.num_processes} process(es), "
            f"{self.accumulation} accumulation step(s) per optimiser step, "
            f"{steps_per_epoch} steps per epoch, {total_steps} steps in all"
            + (f", resuming at step {state['step']} from {resume}" if resume is not None else "")
        )
        saved_step = state["step"] if resume is not None else None
        self._train(model, optimizer, scheduler, loader, state, total_steps, steps_per_epoch)
        if saved_step != state["step"]:
            save_checkpoint(acc, self.output_dir, state["step"], state, cfg.train.keep_last)

        final_model = self._full_model(model)
        metrics: dict[str, Any] = {}
        if acc.is_main_process:
            metrics = self._finish(final_model, state, val_json, image_root, started)
        acc.wait_for_everyone()
        acc.end_training()
        return metrics

    def _finish(
        self,
        model: MambaVLM,
        state: dict[str, Any],
        val_json: Path | None,
        image_root: Path | None,
        started: float,
    ) -> dict[str, Any]:
        """Save ``final/``, score the val split, write ``metrics.json`` (main process)."""
        model.save_pretrained(self.output_dir / FINAL_MODEL_DIR)
        metrics = {
            "step_losses": state["step_losses"],
            **self._evaluate(model, val_json, image_root),
            "num_skipped": state["num_skipped"],
            "num_truncated": state["num_truncated"],
            "steps": state["step"],
            "num_processes": self.accelerator.num_processes,
            "gradient_accumulation_steps": self.accumulation,
            "wall_seconds": time.perf_counter() - started,
            "config": self.config.model_dump(mode="json"),
        }
        with atomic_file(self.output_dir / METRICS_FILE) as f:
            json.dump(metrics, f, indent=1)
        final_loss = state["step_losses"][-1] if state["step_losses"] else None
        logger.info(
            f"done in {metrics['wall_seconds']:.1f} s: final loss {_format_loss(final_loss)}, "
            f"val accuracy {metrics['val_accuracy']}, {state['num_skipped']} skipped records; "
            f"model in {self.output_dir / FINAL_MODEL_DIR}"
        )
        return metrics

    def _dataset(self, model: MambaVLM, train_json: Path, image_root: Path | None) -> LlavaDataset:
        transforms = [encoder.preprocess for encoder in model.vision.encoders]
        if self.config.blind:
            transforms = [BlankImage(t) for t in transforms]
        return LlavaDataset(
            train_json,
            image_root if image_root is not None else train_json.parent,
            model.tokenizer,
            model.template,
            transforms,
            model.num_visual_tokens,
            self.config.data.max_length or model.config.max_length,
            model.add_bos,
        )

    def _loader(self, dataset: LlavaDataset) -> DataLoader:
        """Micro-batches in an order that depends on (seed, epoch) only; incomplete batches dropped."""
        return DataLoader(
            dataset,
            batch_size=self.config.train.micro_batch_size,
            sampler=SeedableRandomSampler(dataset, data_seed=self.config.seed),
            collate_fn=VLMCollator(self.tokenizer.pad_token_id),
            num_workers=self.config.data.num_workers,
            drop_last=True,
        )

    def _initial_state(self) -> dict[str, Any]:
        train = self.config.train
        return {
            "step": 0,
            "epoch": 0,
            "batches_done": 0,
            "step_losses": [],
            "num_skipped": 0,
            "num_truncated": 0,
            "num_processes": self.accelerator.num_processes,
            "micro_batch_size": train.micro_batch_size,
            "global_batch_size": train.global_batch_size,
        }

    def _resume(self, path: Path) -> dict[str, Any]:
        """Restore model, optimiser, scheduler and RNG from ``path``; returns its trainer state."""
        state = load_checkpoint(self.accelerator, path)
        layout = ("num_processes", "micro_batch_size", "global_batch_size")
        now = self._initial_state()
        changed = [f"{k}: {state[k]} -> {now[k]}" for k in layout if state[k] != now[k]]
        if changed:
            raise ConfigError(
                f"cannot resume from {path}: the batch layout changed ({', '.join(changed)}), so the "
                "position in the data cannot be restored"
            )
        return state

    def _train(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        loader: DataLoader,
        state: dict[str, Any],
        total_steps: int,
        steps_per_epoch: int,
    ) -> None:
        """The loop over optimiser steps; ``state`` is updated in place."""
        cfg, acc = self.config.train, self.accelerator
        batches_per_epoch = steps_per_epoch * self.accumulation
        progress = tqdm(
            total=total_steps, initial=state["step"], desc="train", disable=not acc.is_local_main_process
        )
        window = _Window()
        step_totals = torch.zeros(6, dtype=torch.float64, device=acc.device)
        model.train()
        while state["step"] < total_steps:
            loader.set_epoch(state["epoch"])
            batches = acc.skip_first_batches(loader, state["batches_done"]) if state["batches_done"] else loader
            for batch in batches:
                with acc.accumulate(model):
                    loss, counts = self._micro_step(model, batch)
                    step_totals += counts
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.max_grad_norm is not None:
                        acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    lr = optimizer.param_groups[0]["lr"]
                    optimizer.step()
                    if acc.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad()
                state["batches_done"] += 1
                if not acc.sync_gradients:
                    continue
                loss_sum, loss_count, samples, tokens, skipped, truncated = acc.reduce(step_totals, "sum").tolist()
                step_totals.zero_()
                step_loss = loss_sum / loss_count if loss_count else None  # None: every record skipped
                state["step"] += 1
                state["step_losses"].append(step_loss)
                state["num_skipped"] += int(skipped)
                state["num_truncated"] += int(truncated)
                if state["batches_done"] == batches_per_epoch:
                    state["epoch"] += 1
                    state["batches_done"] = 0
                window.add(samples, tokens)
                progress.update(1)
                progress.set_postfix(loss=_format_loss(step_loss), lr=f"{lr:.2e}")
                if state["step"] % cfg.log_every == 0 or state["step"] == total_steps:
                    self._log(state, total_steps, step_loss, lr, window)
                if cfg.save_every and state["step"] % cfg.save_every == 0 and state["step"] < total_steps:
                    save_checkpoint(acc, self.output_dir, state["step"], state, cfg.keep_last)
                if state["step"] >= total_steps or state["batches_done"] == 0:
                    break
        progress.close()

    def _micro_step(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Loss of one micro-batch and its counts (loss sum, losses, samples, tokens, skipped, truncated)."""
        acc = self.accelerator
        skipped = batch["skipped"]
        if skipped:
            ids = ", ".join(f"{i} ({reason})" for i, reason in skipped)
            logger.warning(f"skipped {len(skipped)} record(s): {ids}", main_process_only=False)
        tokens = float(batch["attention_mask"].sum()) if batch["attention_mask"] is not None else 0.0
        counts = torch.tensor(
            [0.0, 0.0, len(batch["ids"]), tokens, len(skipped), batch["num_truncated"]],
            dtype=torch.float64,
            device=acc.device,
        )
        if batch["input_ids"] is None:
            # every process must run forward and backward; a zero loss on a valid batch keeps them in step
            return _model_loss(model, self._standin()) * 0.0, counts
        loss = _model_loss(model, batch)
        counts[0], counts[1] = loss.detach().double(), 1.0
        return loss, counts

    def _standin(self) -> dict[str, Any]:
        """A one-sample batch from the first valid training record (for all-skipped micro-batches)."""
        if self._standin_batch is None:
            for index in range(len(self.train_set)):
                sample = self.train_set[index]
                if not isinstance(sample, SkippedSample):
                    batch = VLMCollator(self.tokenizer.pad_token_id)([sample])
                    self._standin_batch = _to_device(batch, self.accelerator.device)
                    break
            else:
                raise ValueError("every record of data.train was skipped: nothing to train on")
        return self._standin_batch

    def _log(
        self, state: dict[str, Any], total_steps: int, loss: float | None, lr: float, window: _Window
    ) -> None:
        samples_per_s, tokens_per_s = window.rates()
        logger.info(
            f"step {state['step']}/{total_steps} | epoch {state['epoch']} | loss {_format_loss(loss)} | "
            f"lr {lr:.3e} | "
            f"{samples_per_s:.1f} samples/s | {tokens_per_s:.0f} tokens/s"
        )
        values = {"lr": lr, "samples_per_s": samples_per_s, "tokens_per_s": tokens_per_s}
        self.accelerator.log(values if loss is None else {"loss": loss, **values}, step=state["step"])

    def _full_model(self, model: nn.Module) -> MambaVLM | None:
        """The trained model as a plain MambaVLM on the main process (None elsewhere).

        With parameters sharded (FSDP, ZeRO-3) the full state dict is gathered into a fresh copy.
        """
        acc = self.accelerator
        sharded = acc.distributed_type == DistributedType.FSDP or (
            acc.distributed_type == DistributedType.DEEPSPEED and acc.state.deepspeed_plugin.zero_stage == 3
        )
        if not sharded:
            return acc.unwrap_model(model) if acc.is_main_process else None
        state_dict = acc.get_state_dict(model)
        if not acc.is_main_process:
            return None
        plain = build_model(self.config.model, load_weights=False, load_tokenizer=False)
        plain.load_state_dict(state_dict)
        plain.tokenizer = self.tokenizer
        return plain.to(acc.device)

    def _evaluate(self, model: MambaVLM, val_json: Path | None, image_root: Path | None) -> dict[str, Any]:
        """Greedy exact match on the val split (main process); answers go to val_answers.jsonl."""
        if val_json is None:
            return {"val_accuracy": None, "val_num_items": 0, "val_num_skipped": 0}
        items = load_vqa_items(val_json, image_root)
        model.eval()
        rows, skipped = generate_answers(
            model,
            items,
            self.config.train.eval_batch_size,
            self.config.train.eval_max_new_tokens,
            blind=self.config.blind,
        )
        with atomic_file(self.output_dir / VAL_ANSWERS_FILE) as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        accuracy = sum(r["correct"] for r in rows) / len(rows) if rows else None
        return {"val_accuracy": accuracy, "val_num_items": len(rows), "val_num_skipped": len(skipped)}


class _Window:
    """Samples and tokens since the last log line, for throughput."""

    def __init__(self) -> None:
        self.start, self.samples, self.tokens = time.perf_counter(), 0.0, 0.0

    def add(self, samples: float, tokens: float) -> None:
        self.samples += samples
        self.tokens += tokens

    def rates(self) -> tuple[float, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rates = self.samples / elapsed, self.tokens / elapsed
        self.start, self.samples, self.tokens = time.perf_counter(), 0.0, 0.0
        return rates


def _model_loss(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        labels=batch["labels"],
    ).loss


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = dict(batch)
    for key in ("input_ids", "attention_mask", "labels"):
        out[key] = batch[key].to(device)
    if batch["pixel_values"] is not None:
        out["pixel_values"] = [p.to(device) for p in batch["pixel_values"]]
    return out


def _format_loss(loss: float | None) -> str:
    return f"{loss:.4f}" if loss is not None else "n/a"


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
