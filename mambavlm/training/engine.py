"""The one training engine: fine-tuning and every distillation stage run through ``Trainer.run``.

A run is a list of ``Phase``s (fine-tuning is one; mmMamba's distillation three). A phase names an
``Objective`` (the module to train and the loss of a micro-batch: next-token cross-entropy, or a
distillation stage's loss against a frozen teacher), a ``TrainablePolicy`` (which parameters train),
and how to optimise (AdamW groups, a cosine or warmup-stable-decay schedule, batch sizes, steps).
The engine gives every phase the same machinery, on a CPU, one GPU or many (accelerate: DDP, FSDP,
DeepSpeed ZeRO-2):

- gradient accumulation to the global batch, clipping, mixed precision;
- checkpoints ``OUTPUT_DIR/checkpoint-STEP`` (STEP counts optimiser steps over all phases), written
  atomically, the last K kept, one at the end of every phase; ``resume_from`` continues exactly, in
  the middle of a phase too, and ``resume_from="latest"`` on a run that has finished with the same config
  leaves it as it is (``finished_run_metrics``);
- bad records skipped, logged with their reason and counted by kind; a micro-batch whose records were
  all skipped still runs (with zero weight) so that the processes stay in step;
- a progress bar, a log line with loss, lr and throughput every ``log_every`` steps, trackers;
- a SIGTERM (a scheduler's preemption or time limit, ``kill``) stops the run at the end of the step
  running, on every process at the same step, with a checkpoint written there: ``TrainingStopped``.

Determinism: the shuffle of epoch ``e`` is a function of ``(seed, e)`` only, and a checkpoint stores
how many micro-batches of the current epoch were consumed, so a resumed run sees exactly the batches
an uninterrupted run would. Each optimiser step consumes ``global_batch_size`` samples: micro-batches
``k*n*a ... (k+1)*n*a - 1`` of the epoch's order (``n`` processes, ``a`` accumulation steps), process
``p`` taking every ``n``-th one, so the processes' batches partition the step's batch whatever ``n`` is.
The loss of a step is the sum of its item losses (answer tokens, for next-token prediction) over every
micro-batch and process, divided by the step's item count (transformers' ``num_items_in_batch``
convention): micro-batch size, accumulation and the number of processes do not change it, and the
logged loss is that number.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from accelerate import Accelerator, PartialState
from accelerate.data_loader import SeedableRandomSampler
from accelerate.logging import get_logger
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    gather_object,
)
from torch import Tensor, nn
from torch.autograd import DeviceType
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import PreTrainedModel, get_wsd_schedule
from transformers.models.mamba.modeling_mamba import MambaMixer

from mambavlm.atomic import atomic_file
from mambavlm.config import ConfigError
from mambavlm.data.llava import SkippedSample
from mambavlm.processes import check_process_group
from mambavlm.progress import format_duration
from mambavlm.training.checkpoint import (
    CHECKPOINT_PREFIX,
    TRAINER_STATE_FILE,
    find_checkpoints,
    load_checkpoint,
    lock_output_dir,
    release_output_dir,
    remove_unfinished_writes,
    resolve_resume,
    save_checkpoint,
)
from mambavlm.training.optim import build_optimizer, build_scheduler, no_decay_names

__all__ = [
    "DUPLICATE_SIGNAL_S",
    "METRICS_FILE",
    "RESTORED_SETTINGS",
    "STOP_SIGNALS",
    "TRACKER_PACKAGES",
    "ZERO3_LEAF_TYPES",
    "Objective",
    "Phase",
    "TrainablePolicy",
    "Trainer",
    "TrainerState",
    "TrainingStopped",
    "changed_settings_note",
    "check_fresh_output_dir",
    "check_trackers",
    "finished_run_metrics",
    "gradient_accumulation_steps",
    "load_whole",
    "new_throughput",
    "phase_settings",
    "require_standalone_fsdp_units",
    "root_unit_trains",
    "structure_copy",
    "throughput_summary",
    "zero3_leaf",
]

logger = get_logger(__name__)

STOP_SIGNALS = (signal.SIGTERM,)
"""Signals that stop ``Trainer.run`` at the end of the step running, with a checkpoint there: SIGTERM is
what SLURM (preemption, ``scancel``, the time limit), Kubernetes and ``kill`` send before they kill. A
second one while the step finishes acts as it would without the trainer (the process ends). SIGINT
(Ctrl-C) keeps Python's KeyboardInterrupt: no checkpoint."""


class TrainingStopped(Exception):
    """``Trainer.run`` stopped on a signal (``STOP_SIGNALS``) at the end of a step: ``signal_name`` (e.g.
    ``"SIGTERM"``, or ``"another process's signal"`` on a process that did not receive it), ``step`` (the
    optimiser steps done, over all phases), ``checkpoint`` (the checkpoint directory holding that step,
    None when the run writes none) and ``exit_code`` (128 + the signal's number, the shell's code for a
    process the signal ended)."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None, exit_code: int) -> None:
        self.signal_name, self.step, self.checkpoint, self.exit_code = signal_name, step, checkpoint, exit_code
        where = f"its checkpoint is {checkpoint}" if checkpoint is not None else "no checkpoint (checkpoints are off)"
        super().__init__(f"stopped by {signal_name} after step {step}: {where}")


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: the worker ignores ``STOP_SIGNALS``, so that a signal sent to the whole
    process group (``kill -- -PGID``, a terminal's job control) does not end it while the trainer finishes
    its step. The trainer shuts its loaders' workers down on every way out of a phase (``close_batches``),
    so none is left running."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def close_batches(batches: Iterator[Any]) -> None:
    """Shut a DataLoader iterator's worker processes down now: close accelerate's generator (whose frame
    holds PyTorch's iterator, shut down when freed), or PyTorch's iterator itself. A worker left running
    would outlive an exception that keeps the iterator referenced, and, ignoring SIGTERM, hang
    multiprocessing's join at exit."""
    if hasattr(batches, "close"):
        batches.close()
    elif hasattr(batches, "_shutdown_workers"):
        batches._shutdown_workers()


DUPLICATE_SIGNAL_S = 1.0
"""Seconds after a stop signal within which the same signal again counts as the same request. ``accelerate
launch`` (1.16) passes a SIGTERM it receives on to its training process, so a SIGTERM sent to the whole process
group reaches that process twice, milliseconds apart; as a second request it ended the run without its
checkpoint (1 run in 5 in a user's trial)."""


@contextmanager
def stop_signals_caught(received: list[int]) -> Iterator[None]:
    """While inside, each of ``STOP_SIGNALS`` appends its number to ``received``; the same signal again more
    than ``DUPLICATE_SIGNAL_S`` later acts at once (the handler it replaced runs: the default ends the
    process), within that it is a duplicate and ignored. On exit every replaced handler is back. Outside the
    main thread (where Python cannot install handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    first: dict[int, float] = {}

    def caught(signum: int, frame: Any) -> None:
        now = time.monotonic()
        if signum not in first:
            first[signum] = now
            received.append(signum)
        elif now - first[signum] > DUPLICATE_SIGNAL_S:
            signal.signal(signum, previous[signum])
            signal.raise_signal(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, caught)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def structure_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that takes no parameter memory: its parameters on the meta device (their
    ``requires_grad`` kept, tied parameters still one), its buffers copied. Made before accelerate
    wraps ``module`` in place (FSDP turns its blocks into FSDP units), it is what
    ``Trainer.gathered_module`` fills with the gathered weights."""
    memo: dict[int, Any] = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in module.parameters()
    }
    return copy.deepcopy(module, memo)


def root_unit_trains(prepared: nn.Module) -> bool:
    """Whether a parameter of the root FSDP unit of ``prepared`` (one held by no nested FSDP unit) trains.

    PyTorch's FSDP (version 1, ``use_orig_params``) with one process (NO_SHARD) never restores the
    parameters of a root unit that holds no trainable parameter after its backward: they stay plain
    tensors, the flat parameter's record of them is overwritten, and the next ``state_dict()`` (a
    checkpoint) fails, naming the first of them (seen on an H200; with 2 processes the sharded
    strategies restore them). True for a module that is not FSDP-wrapped.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if not isinstance(prepared, FSDP):
        return True
    nested = {id(p) for unit in FSDP.fsdp_modules(prepared) if unit is not prepared for p in unit.parameters()}
    return any(p.requires_grad for p in prepared.parameters() if id(p) not in nested)


def require_standalone_fsdp_units(plugin: Any, module: nn.Module) -> None:
    """Make every submodule whose class ``module.fsdp_standalone_modules`` names an FSDP unit of its own
    (nested in its block's unit), by adding the classes to the accelerate FSDP plugin's wrap policy
    before ``accelerate.prepare`` wraps ``module``.

    FSDP gathers a unit's parameters in the unit's own forward. An objective that calls a submodule
    outside its parent block's forward (distillation's layer loss runs each student Mamba-2 mixer on
    the teacher's attention input, ``distill.stages.layerwise_loss``) would find that submodule's
    parameters sharded, as 1-D slices (seen on 2 H200s), when only its decoder layer is a unit; as a
    unit of its own it gathers them whenever it is called.

    ``plugin``: ``accelerate.utils.FullyShardedDataParallelPlugin``, its policy either still the
    configured one (the class names, or the ``_no_split_modules`` default, are extended) or already
    resolved by an earlier ``prepare`` (its class set is extended). NO_WRAP (one unit) needs nothing.

    Raises:
        ConfigError: a size-based or custom policy, which cannot promise those units.
    """
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    wanted = list(getattr(module, "fsdp_standalone_modules", ()))
    policy = plugin.auto_wrap_policy
    if not wanted or policy is None:
        return
    classes = {type(m) for m in module.modules() if type(m).__name__ in wanted}
    if policy is transformer_auto_wrap_policy:
        names = list(plugin.transformer_cls_names_to_wrap or getattr(module, "_no_split_modules", None) or [])
        plugin.transformer_cls_names_to_wrap = names + sorted({c.__name__ for c in classes} - set(names))
    elif isinstance(policy, functools.partial) and policy.func is transformer_auto_wrap_policy:
        layers = set(policy.keywords.get("transformer_layer_cls", ()))
        plugin.auto_wrap_policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layers | classes)
    else:
        raise ConfigError(
            f"{type(module).__name__} calls its {', '.join(wanted)} modules on their own, so under FSDP each must be "
            f"a unit of its own: use fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP (configs/accelerate/fsdp.yaml) "
            f"or NO_WRAP, not {getattr(policy, '__name__', policy)!r}"
        )



ZERO3_LEAF_TYPES: tuple[type[nn.Module], ...] = (MambaMixer,)
"""transformers' modules whose forward hands their submodules' weights to a kernel (``MambaMixer`` to
mamba_ssm's ``mamba_inner_fn``): gathered whole under ZeRO-3, as the project's classes that set
``zero3_leaf``."""


def zero3_leaf(module: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 must gather ``module``'s parameters all at once in its forward."""
    return bool(getattr(type(module), "zero3_leaf", False)) or isinstance(module, ZERO3_LEAF_TYPES)


def load_whole(module: nn.Module, state_dict: dict[str, Tensor]) -> nn.Module:
    """``module`` (real, or a ``structure_copy``) with every tensor of ``state_dict`` (strict): copied
    into real parameters, or assigned to meta ones, after which the transformers models in it tie
    their tied weights again (assigning unties them). Returns ``module``."""
    empty = any(p.is_meta for p in module.parameters())
    module.load_state_dict(state_dict, assign=empty)
    if empty:
        for submodule in module.modules():
            if isinstance(submodule, PreTrainedModel):
                submodule.tie_weights()
    return module


class Objective(Protocol):
    """What a phase optimises: a sum of per-item losses over the step, divided by the step's item count.

    ``module``: the ``nn.Module`` that accelerate prepares, the optimiser steps and checkpoints hold.
    ``num_items(batch)``: the micro-batch's item counts, (K,) (answer tokens for next-token loss; real
    tokens and answer tokens for distillation), one per kind of item the loss normalises by.
    ``loss(prepared, batch, num_items)``: the sum of the micro-batch's item losses divided by
    ``num_items``, the counts of the whole optimiser step over every micro-batch and process
    (transformers' ``num_items_in_batch``), computed through ``prepared`` (``module`` as accelerate
    wrapped it: DDP / FSDP need the forward to go through it).
    """

    module: nn.Module

    def num_items(self, batch: dict[str, Any]) -> Tensor: ...

    def loss(self, prepared: nn.Module, batch: dict[str, Any], num_items: Tensor) -> Tensor: ...


class TrainablePolicy(Protocol):
    """Sets ``requires_grad`` on ``module``'s parameters for a phase; returns the names that train."""

    def __call__(self, module: nn.Module) -> set[str]: ...


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet-ml",
                    "aim": "aim", "clearml": "clearml", "dvclive": "dvclive"}
"""The pip package each accelerate tracker needs."""


def check_trackers(trackers: Sequence[str]) -> None:
    """Raise ConfigError naming the trackers whose package is not installed (accelerate would only warn
    and log nothing) and how to install them."""
    import accelerate.utils

    missing = [name for name in trackers if not getattr(accelerate.utils, f"is_{name}_available")()]
    if missing:
        raise ConfigError(
            f"trackers: {', '.join(missing)} not installed; pip install {' '.join(TRACKER_PACKAGES[n] for n in missing)}"
        )


def fresh_start_note(resume_from: str | None, output_dir: Path) -> str | None:
    """What to tell the user when ``resume_from="latest"`` found no checkpoint in ``output_dir`` and the
    run starts from the beginning. None otherwise."""
    if resume_from == "latest" and not find_checkpoints(output_dir):
        return f"resume_from=latest: no checkpoint in {output_dir}, starting from the beginning"
    return None


METRICS_FILE = "metrics.json"
"""What a finished fine-tuning or distillation run writes last in its ``output_dir``."""


def check_fresh_output_dir(resume_from: str | None, output_dir: Path) -> None:
    """Refuse to start a run from the beginning (no ``resume_from``, or ``"latest"`` with no checkpoint
    to continue) in an ``output_dir`` that holds an earlier run: its checkpoints (their step numbers
    would outrank the new run's, so keeping the last K would delete the new run's checkpoints and
    ``resume_from=latest`` would continue the earlier run), its results (``METRICS_FILE``: the new
    run would overwrite its final model and metrics), or a saved model (``config.json``).

    Raises:
        ConfigError: naming the directory, what it holds and the ways on.
    """
    checkpoints = find_checkpoints(output_dir)
    if resume_from is not None and (resume_from != "latest" or checkpoints):
        return  # continues a checkpoint
    if checkpoints:
        raise ConfigError(
            f"{output_dir} holds checkpoints of an earlier run ({', '.join(p.name for p in checkpoints)}): "
            "resume_from=latest continues it; to start over, set another output_dir or remove them"
        )
    if (output_dir / METRICS_FILE).is_file():
        raise ConfigError(
            f"{output_dir} holds a finished run ({METRICS_FILE} and its final model): a new run would overwrite "
            "them; set another output_dir or remove it"
        )
    if (output_dir / "config.json").is_file():
        raise ConfigError(f"{output_dir} is a saved model (config.json): a run writes into a directory of its own; "
                          "set another output_dir")


def finished_run_metrics(
    output_dir: str | Path, resume_from: str | None, resume_key: str, config: dict[str, Any], model_dir: str | Path
) -> dict[str, Any] | None:
    """The results of the finished run that ``resume_from="latest"`` asks to continue, read back, or None
    when the run is to go ahead.

    A run is finished when ``output_dir`` holds its ``METRICS_FILE`` (written last, after the final model)
    and its final model ``model_dir``, and the config recorded in METRICS_FILE is ``config`` (both as
    ``model_dump(mode="json")`` gives them) apart from ``resume_key`` (dotted: ``train.resume_from``) and
    ``output_dir``. Continuing it would train no step and only evaluate again, overwriting its model and
    results (``wall_seconds`` became the rerun's); instead one line is logged naming the model and the
    results, and nothing is written. A run recorded with another config (a larger ``max_steps``, say)
    resumes from its latest checkpoint as before. The metrics are returned on the main process, ``{}``
    elsewhere.

    Raises:
        ConfigError: METRICS_FILE is not a JSON object, naming the file.
    """
    output_dir, model_dir = Path(output_dir), Path(model_dir)
    metrics_file = output_dir / METRICS_FILE
    if resume_from != "latest" or not metrics_file.is_file() or not model_dir.is_dir():
        return None
    try:
        metrics = json.loads(metrics_file.read_text())
    except ValueError as err:
        raise ConfigError(f"{metrics_file}: not JSON ({err}); move it aside to resume the run") from None
    if not isinstance(metrics, dict):
        raise ConfigError(f"{metrics_file}: expected a JSON object of results, got {type(metrics).__name__}; "
                          "move it aside to resume the run")
    recorded = metrics.get("config")
    if not isinstance(recorded, dict) or _without_keys(recorded, resume_key) != _without_keys(config, resume_key):
        return None
    state = PartialState()  # accelerate's logger needs it; the processes of a launch each return here
    logger.info(f"{resume_key}=latest: {output_dir} holds a finished run of this config, nothing to resume: its model "
                f"is {model_dir}, its results {metrics_file} (left as they are)")
    return metrics if state.is_main_process else {}


def _without_keys(config: dict[str, Any], resume_key: str) -> dict[str, Any]:
    """``config`` without ``output_dir`` and the dotted ``resume_key`` (a copy)."""
    config = copy.deepcopy(config)
    config.pop("output_dir", None)
    *parents, last = resume_key.split(".")
    section = config
    for name in parents:
        section = section.get(name)
        if not isinstance(section, dict):
            return config
    section.pop(last, None)
    return config


@dataclass(frozen=True)
class Phase:
    """One run of the optimiser over the data: fine-tuning, or one distillation stage.

    Steps: ``max_steps``, or ``epochs`` passes over the data when None. Schedule: ``cosine`` (linear
    warmup over ``warmup_ratio`` of the steps, cosine decay to 0) or ``wsd`` (warmup, constant,
    linear decay over the last ``decay_ratio``). AdamW with ``betas`` and ``weight_decay`` (not on
    norms, biases, 1-D parameters); gradients clipped to ``max_grad_norm`` (None: no clipping).
    """

    name: str
    objective: Objective
    trainable: TrainablePolicy
    lr: float
    global_batch_size: int
    micro_batch_size: int
    max_steps: int | None = None
    epochs: int = 1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = 1.0
    schedule: Literal["cosine", "wsd"] = "cosine"
    warmup_ratio: float = 0.0
    decay_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"phase {self.name}: global_batch_size={self.global_batch_size} is not a multiple of "
                f"micro_batch_size={self.micro_batch_size}"
            )
        if self.schedule not in ("cosine", "wsd"):
            raise ConfigError(f"phase {self.name}: unknown schedule {self.schedule!r}; expected 'cosine' or 'wsd'")


@dataclass
class TrainerState:
    """Where a run is; written to ``trainer_state.json`` in every checkpoint.

    phase: index of the phase running. step: its optimiser steps done. epoch / batches_done: the
    position in its data (micro-batches of the epoch consumed by each process). global_step: steps
    over all phases (the checkpoint number). phase_losses: per phase, its step losses (None for a step
    whose every record was skipped). Skips: total, by kind (``SKIP_KINDS``); truncated samples.
    layout: the current phase's (processes, micro-batch, global batch), which a resume must match.
    settings: the current phase's optimisation settings (``phase_settings``), compared on resume.
    num_records: the records of the training data, compared on resume (None in older checkpoints).
    phase_throughput: per phase, what its timed steps took (``new_throughput``): every step but the
    first of each start of the phase (its warm-up: kernel compilation, allocator growth), checkpoint
    writes excluded; of their seconds, ``data_seconds`` blocked on the data loader (the mean over the
    processes); samples and tokens (attention-mask tokens, visual included) over all processes; the
    peak device memory of any one process (GiB; None on the CPU).
    """

    phase: int = 0
    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    global_step: int = 0
    phase_losses: list[list[float | None]] = field(default_factory=list)
    num_skipped: int = 0
    skipped_by_kind: dict[str, int] = field(default_factory=dict)
    num_truncated: int = 0
    layout: dict[str, int] = field(default_factory=dict)
    phase_throughput: list[dict[str, float | None]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    num_records: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], source: Path) -> TrainerState:
        known = set(cls.__dataclass_fields__)
        if not isinstance(data, dict) or set(data) - known:
            unknown = sorted(set(data) - known) if isinstance(data, dict) else data
            raise ValueError(f"{source}: not a trainer state of this mambavlm (unexpected: {unknown})")
        return cls(**data)


RESTORED_SETTINGS = ("lr", "weight_decay", "betas")
"""Settings a resumed phase takes from its checkpoint whatever its config says: they live in the
optimiser's parameter groups and the scheduler's base learning rates, which ``load_state`` restores."""


def phase_settings(phase: Phase, total_steps: int) -> dict[str, Any]:
    """What a phase optimises with (JSON values), as ``TrainerState.settings`` records it."""
    return {
        "lr": phase.lr,
        "weight_decay": phase.weight_decay,
        "betas": list(phase.betas),
        "total_steps": total_steps,
        "schedule": phase.schedule,
        "warmup_ratio": phase.warmup_ratio,
        "decay_ratio": phase.decay_ratio,
        "max_grad_norm": phase.max_grad_norm,
    }


def changed_settings_note(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """What differs between a checkpoint's phase settings and this run's, and what each change does on
    resume (None when nothing differs)."""
    changes = []
    for key, value in current.items():
        before = saved.get(key, value)
        if before == value:
            continue
        effect = ("the checkpoint's is kept: the optimiser and scheduler are restored" if key in RESTORED_SETTINGS
                  else "the new value applies from the resumed step")
        label = "total_steps (from max_steps, or epochs x steps per epoch)" if key == "total_steps" else key
        changes.append(f"{label} {before} -> {value} ({effect})")
    return "; ".join(changes) or None


def new_throughput() -> dict[str, float | None]:
    """An empty ``TrainerState.phase_throughput`` entry."""
    return {"timed_steps": 0, "seconds": 0.0, "data_seconds": 0.0, "samples": 0.0, "tokens": 0.0, "peak_memory_gib": None}


def throughput_summary(state: TrainerState, phase_names: Sequence[str]) -> list[dict[str, Any]]:
    """Per phase, for metrics.json: its name, timed steps, their seconds, samples and tokens, the share
    of those seconds the processes spent blocked on the data loader (their mean; a loader that keeps
    up is near 0), samples/s and tokens/s over all processes (None when no step was timed), and the
    peak memory of one process in GiB (None on the CPU)."""
    summary = []
    for name, entry in zip(phase_names, state.phase_throughput):
        seconds = entry["seconds"]
        summary.append({
            "phase": name,
            "timed_steps": entry["timed_steps"],
            "seconds": seconds,
            "samples": entry["samples"],
            "tokens": entry["tokens"],
            "data_wait_share": entry.get("data_seconds", 0.0) / seconds if seconds else None,
            "samples_per_s": entry["samples"] / seconds if seconds else None,
            "tokens_per_s": entry["tokens"] / seconds if seconds else None,
            "peak_memory_gib": entry["peak_memory_gib"],
        })
    return summary


def gradient_accumulation_steps(global_batch_size: int, micro_batch_size: int, num_processes: int) -> int:
    """``global / (micro * processes)``; a ConfigError when it does not divide evenly."""
    per_pass = micro_batch_size * num_processes
    if global_batch_size % per_pass:
        raise ConfigError(
            f"global_batch_size={global_batch_size} is not a multiple of micro_batch_size="
            f"{micro_batch_size} x {num_processes} processes = {per_pass}"
        )
    return global_batch_size // per_pass


def cpu_thread_count(requested: int | None, num_processes: int) -> int:
    """Torch threads per CPU training process: ``requested``, else the cores this process may run on
    (its CPU affinity) divided by the processes, at least 1. ``accelerate launch`` sets
    OMP_NUM_THREADS=1 for every CPU process unless started with ``--cpu``, which on a 2-core machine
    trains the offline default 1.6x slower than 2 threads (measured: 201 vs 125 ms per step)."""
    if requested is not None:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, num_processes))


class Trainer:
    """Runs phases in order over one dataset, with checkpoints, resume, skips and logs (see module doc).

    output_dir: checkpoints and tracker logs, held by the main process from here to ``end``
    (``lock_output_dir``: a second run writing it at the same time is a ConfigError naming the first).
    resume_from: a checkpoint directory, ``"latest"`` (the newest in output_dir; a fresh start when
    there is none) or None. save_every: optimiser steps
    between checkpoints (None: only at the end of each phase). save_checkpoints: False writes none (not
    even at a phase's end; ValueError with save_every). keep_last: checkpoints kept. sync_each_batch:
    reduce gradients after every micro-batch (accelerate's ``GradientAccumulationPlugin``; under FSDP
    sharded gradients accumulate, instead of unsharded ones inside ``no_sync``). profile_step: the
    optimiser step (counted over all phases, 1-based) to record with torch.profiler on every process
    (``profile_step_report``).
    cpu_threads: torch threads per process on the CPU (``cpu_thread_count``); ignored on accelerators.
    """

    def __init__(
        self,
        output_dir: str | Path,
        seed: int = 0,
        mixed_precision: Literal["no", "bf16", "fp16"] = "no",
        trackers: Sequence[str] = (),
        tracker_config: dict[str, Any] | None = None,
        log_every: int = 10,
        save_every: int | None = None,
        save_checkpoints: bool = True,
        sync_each_batch: bool = False,
        profile_step: int | None = None,
        keep_last: int = 2,
        resume_from: str | None = None,
        num_workers: int = 0,
        cpu_threads: int | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.seed = seed
        self.log_every = log_every
        if save_every is not None and not save_checkpoints:
            raise ValueError(f"save_every={save_every} asks for checkpoints that save_checkpoints=False turns off")
        self.save_every = save_every
        self.save_checkpoints = save_checkpoints
        self.profile_step = profile_step
        self.keep_last = keep_last
        self.resume_from = resume_from
        self.num_workers = num_workers
        check_trackers(trackers)
        self.accelerator = Accelerator(
            mixed_precision=mixed_precision,
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=1, sync_with_dataloader=False, sync_each_batch=sync_each_batch
            ),
            step_scheduler_with_optimizer=False,
            log_with=list(trackers) or None,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
            # a micro-batch of text-only samples leaves the projector unused; gradients live in DDP's
            # all-reduce buckets (no second copy of them: 11 GB for Mamba-2.8B's float32 gradients)
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True, gradient_as_bucket_view=True)],
        )
        check_process_group(self.accelerator)
        if self.accelerator.mixed_precision == "fp16" and not self.accelerator.native_amp:
            logger.warning(  # accelerate leaves fp16 off on a CPU (no autocast): the run records fp16 but is not
                f"mixed_precision=fp16 has no effect on {self.accelerator.device.type}: training in float32 "
                "(bf16 autocasts on a CPU too)"
            )
        if self.accelerator.is_main_process:  # before anything reads or writes output_dir
            lock_output_dir(self.output_dir)
        check_fresh_output_dir(resume_from, self.output_dir)
        plugin = self._deepspeed_plugin()
        if plugin is not None and plugin.zero3_init_flag:
            raise ConfigError(
                "the accelerate config sets zero3_init_flag: true (or ACCELERATE_DEEPSPEED_ZERO3_INIT=true): "
                "mambavlm builds each model whole and ZeRO-3 partitions it in accelerator.prepare; set "
                "zero3_init_flag: false (configs/accelerate/deepspeed_zero3.yaml)"
            )
        if self.accelerator.device.type == "cpu":
            threads = cpu_thread_count(cpu_threads, self.accelerator.num_processes)
            if threads != torch.get_num_threads():
                logger.info("training on the CPU with %d threads per process", threads)
                torch.set_num_threads(threads)
        self._trackers = list(trackers)
        self._tracker_config = tracker_config or {}
        self._prepared: nn.Module | None = None
        self._source: nn.Module | None = None  # the module self._prepared wraps
        self._no_decay: set[int] = set()  # ids of its parameters AdamW does not decay
        self._sizes: dict[int, int] = {}  # ids of its parameters -> their elements, unsharded
        self._standin: dict[str, Any] | None = None
        self._stop_received: list[int] = []  # STOP_SIGNALS caught during run, in order

    def _deepspeed_plugin(self) -> Any:
        if self.accelerator.distributed_type != DistributedType.DEEPSPEED:
            return None
        return self.accelerator.state.deepspeed_plugin

    @contextmanager
    def building_models(self) -> Iterator[None]:
        """Build (or load) every model of the run inside this context.

        Under DeepSpeed, accelerate registers its config with transformers whatever the config's
        ``zero3_init_flag`` says, and with ZeRO-3 transformers then constructs every ``PreTrainedModel``
        under ``deepspeed.zero.Init``, which partitions each submodule's parameters as soon as that
        submodule is built. A MambaVLM is vision encoders + projector + LLM assembled and initialised
        after construction (and a Mamba-2 mixer initialises its projections from their shapes), so here
        models are built whole, as ``zero3_init_flag: false`` asks, and ZeRO-3 partitions them in
        ``accelerator.prepare``. Elsewhere this does nothing.
        """
        plugin = self._deepspeed_plugin()
        if plugin is None:
            yield
            return
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            plugin.set_deepspeed_weakref()

    # ------------------------------------------------------------------------------------- run

    def run(
        self, phases: Sequence[Phase], dataset: Dataset, collate_fn: Callable[[list[Any]], dict[str, Any]]
    ) -> TrainerState:
        """Train through ``phases`` (resuming where a checkpoint left off); returns the final state.

        Raises ConfigError when the data holds fewer records than one global batch, when every record is
        skipped (found at the first micro-batch whose records all are, naming the kinds), or when a resumed
        checkpoint was written with another batch layout or another list of phases; TrainingStopped, with
        the step's checkpoint written, when one of ``STOP_SIGNALS`` arrives on any process (each stops at the
        end of the same step).
        """
        acc = self.accelerator
        if not phases:
            raise ValueError("no phases to run")
        plugin = self._deepspeed_plugin()
        modules = [id(phase.objective.module) for phase in phases]
        if plugin is not None and plugin.zero_stage == 3 and len(set(modules)) < len(modules):
            raise ConfigError(
                "a run of several phases (distillation stages) over one model cannot use DeepSpeed ZeRO-3, "
                "which partitions the model in place when its first phase starts; use FSDP "
                "(configs/accelerate/fsdp.yaml) or ZeRO-2"
            )
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            remove_unfinished_writes(self.output_dir)
        acc.wait_for_everyone()
        if self._trackers:
            acc.init_trackers("mambavlm", config=self._tracker_config)
        self.dataset, self.collate_fn = dataset, collate_fn
        resume = resolve_resume(self.resume_from, self.output_dir)
        if resume is None and (note := fresh_start_note(self.resume_from, self.output_dir)):
            logger.warning(note)
        state = TrainerState(phase_losses=[[] for _ in phases])
        if resume is not None:
            state = TrainerState.from_json(json.loads((resume / TRAINER_STATE_FILE).read_text()), resume)
            if len(state.phase_losses) != len(phases) or state.phase >= len(phases):
                raise ConfigError(
                    f"cannot resume from {resume}: it was written by a run of {len(state.phase_losses)} phase(s), "
                    f"this run has {len(phases)}"
                )
            logger.info(f"resuming from {resume}: phase {phases[state.phase].name}, step {state.step}")
        state.phase_throughput += [new_throughput() for _ in range(len(phases) - len(state.phase_throughput))]
        resume_phase = state.phase
        self._stop_received.clear()
        with stop_signals_caught(self._stop_received):
            for index, phase in enumerate(phases):
                if index < resume_phase:
                    continue
                self._run_phase(phase, state, resume if index == resume_phase else None)
                if index + 1 < len(phases):
                    state.phase, state.step, state.epoch, state.batches_done = index + 1, 0, 0, 0
        acc.wait_for_everyone()
        return state

    def run_or_end(
        self, phases: Sequence[Phase], dataset: Dataset, collate_fn: Callable[[list[Any]], dict[str, Any]]
    ) -> TrainerState:
        """``run``; when a stop signal ends it (TrainingStopped, re-raised), ``end`` first: the trackers are
        closed and ``output_dir`` is free for the resumed run."""
        try:
            return self.run(phases, dataset, collate_fn)
        except TrainingStopped:
            self.end()
            raise

    def end(self) -> None:
        """Close the trackers and let another run write ``output_dir`` (call once, after the run and anything
        logged or written after it)."""
        self.accelerator.end_training()
        if self.accelerator.is_main_process:
            release_output_dir(self.output_dir)

    def gathered_module(self, fresh: Callable[[], nn.Module]) -> nn.Module | None:
        """The last phase's trained module, whole, on the main process (None elsewhere).

        With parameters sharded (FSDP, ZeRO-3) the full state dict is gathered into ``fresh()``: a
        module of the same structure, real or a ``structure_copy`` (``load_whole``).
        """
        acc = self.accelerator
        if self._prepared is None:
            raise RuntimeError("run the trainer first")
        sharded = acc.distributed_type == DistributedType.FSDP or (
            acc.distributed_type == DistributedType.DEEPSPEED and acc.state.deepspeed_plugin.zero_stage == 3
        )
        if not sharded:
            return acc.unwrap_model(self._prepared) if acc.is_main_process else None
        state_dict = acc.get_state_dict(self._prepared)
        if not acc.is_main_process:
            return None
        with self.building_models():
            module = fresh()
        return load_whole(module, state_dict).to(acc.device)

    # ---------------------------------------------------------------------------------- phases

    def _run_phase(self, phase: Phase, state: TrainerState, resume: Path | None) -> None:
        acc = self.accelerator
        accumulation = gradient_accumulation_steps(phase.global_batch_size, phase.micro_batch_size, acc.num_processes)
        acc.gradient_accumulation_steps = accumulation
        # each process gets every n-th of the epoch's full micro-batches (accelerate's sharding)
        batches_per_process = len(self.dataset) // phase.micro_batch_size // acc.num_processes
        steps_per_epoch = batches_per_process // accumulation
        if steps_per_epoch == 0:
            raise ConfigError(
                f"phase {phase.name}: the data has {len(self.dataset)} records, fewer than one global batch "
                f"(global_batch_size={phase.global_batch_size})"
            )
        total_steps = phase.max_steps or phase.epochs * steps_per_epoch
        layout = {
            "num_processes": acc.num_processes,
            "micro_batch_size": phase.micro_batch_size,
            "global_batch_size": phase.global_batch_size,
        }
        if resume is not None and state.layout != layout:
            changed = [f"{k}: {state.layout.get(k)} -> {v}" for k, v in layout.items() if state.layout.get(k) != v]
            raise ConfigError(
                f"cannot resume from {resume}: the batch layout changed ({', '.join(changed)}), so the "
                "position in the data cannot be restored"
            )
        state.layout = layout
        settings = phase_settings(phase, total_steps)
        if resume is not None and state.settings and (note := changed_settings_note(state.settings, settings)):
            logger.warning(f"resuming from {resume} with settings other than its own: {note}")
        state.settings = settings
        if resume is not None and state.num_records not in (None, len(self.dataset)):
            # the epoch's shuffle is a permutation of the records: another count gives another order, so the
            # batches from here are not those the checkpoint's run would have seen (nor are they after an
            # edit that keeps the count, which this cannot tell)
            logger.warning(
                f"resuming from {resume} with other training data: {state.num_records} records then, "
                f"{len(self.dataset)} now; the position in the epoch is kept by count, the records it reaches differ"
            )
        state.num_records = len(self.dataset)

        module = phase.objective.module
        # FSDP wraps a module in place (its blocks become FSDP units, its parameters views of flat
        # shards): a later phase of the same module keeps that wrapping, with a new optimiser over the
        # parameters that now train (use_orig_params lets the trainable set change). DDP and DeepSpeed
        # wrap it anew each phase (DDP fixes its gradient buckets to the parameters training when it
        # wraps).
        keep = self._prepared is not None and self._source is module and acc.distributed_type == DistributedType.FSDP
        if self._prepared is not None:
            if not keep:
                acc.unwrap_model(self._prepared, keep_fp32_wrapper=False)  # undo accelerate's forward patch
            acc.free_memory()  # drop the previous phase's optimiser, scheduler, loader (and wrapper)
        if not keep:
            self._source, self._prepared = module, None
            self._no_decay = {id(p) for n, p in module.named_parameters() if n in no_decay_names(module)}
            self._sizes = {id(p): p.numel() for p in module.parameters()}  # before FSDP / ZeRO-3 shard them
        names = phase.trainable(module)
        optimizer = build_optimizer(module, phase.lr, phase.weight_decay, phase.betas, no_decay=self._no_decay,
                                    fused=acc.device.type == "cuda")
        scheduler = self._scheduler(optimizer, phase, total_steps)
        loader = DataLoader(
            self.dataset,
            batch_size=phase.micro_batch_size,
            sampler=SeedableRandomSampler(self.dataset, data_seed=self.seed),
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            worker_init_fn=ignore_stop_signals if self.num_workers else None,
            drop_last=True,
        )
        if not keep:
            self._mark_zero3_leaves(module)
            if acc.distributed_type == DistributedType.FSDP:
                require_standalone_fsdp_units(acc.state.fsdp_plugin, module)
        prepared, optimizer, loader, scheduler = acc.prepare(
            self._prepared if keep else module, optimizer, loader, scheduler
        )
        self._prepared = prepared
        if acc.distributed_type == DistributedType.FSDP and acc.num_processes == 1 and not root_unit_trains(prepared):
            raise ConfigError(
                f"phase {phase.name}: FSDP on one process runs unsharded (NO_SHARD), and there PyTorch's FSDP "
                "loses the parameters of a root unit none of whose parameters train (here the frozen ones outside "
                "the wrapped blocks: vision encoders, embeddings, ...) before the first checkpoint; on one GPU "
                "run without FSDP (configs/accelerate/ddp.yaml, or python train/...)"
            )
        if resume is not None:
            load_checkpoint(acc, resume, optimizer)
        trainable = trainable_parameter_count(module, self._sizes)
        logger.info(
            f"phase {phase.name}: {len(self.dataset)} records, {acc.num_processes} process(es), {accumulation} "
            f"accumulation step(s) per optimiser step, {steps_per_epoch} steps per epoch, {total_steps} steps, "
            # the schedule's peak lr: a resumed run's is its checkpoint's (restored with the optimiser)
            f"lr {optimizer.param_groups[0].get('initial_lr', phase.lr):g}, {trainable:,} trainable parameters in "
            f"{len(names)} tensors"
            + (f"; resuming at step {state.step}" if resume is not None else "")
        )
        saved_step = state.global_step if resume is not None else None
        self._train(
            phase, prepared, optimizer, scheduler, loader, state, total_steps, accumulation, steps_per_epoch * accumulation
        )
        if saved_step != state.global_step and self.save_checkpoints:
            self._save(state)

    def _mark_zero3_leaves(self, module: nn.Module) -> None:
        """Under ZeRO-3, the modules whose class sets ``zero3_leaf = True`` or is one of
        ``ZERO3_LEAF_TYPES`` (their forward reads their submodules' weights directly, as kernels'
        arguments) become DeepSpeed leaf modules: their whole parameter set is gathered in their own
        forward (``deepspeed.utils.set_z3_leaf_modules``)."""
        plugin = self._deepspeed_plugin()
        if plugin is None or plugin.zero_stage != 3:
            return
        leaves = sorted({type(m) for m in module.modules() if zero3_leaf(m)}, key=str)
        if leaves:
            from deepspeed.utils import set_z3_leaf_modules

            set_z3_leaf_modules(module, leaves)

    def _scheduler(self, optimizer: torch.optim.Optimizer, phase: Phase, total_steps: int) -> Any:
        if phase.schedule == "cosine":
            return build_scheduler(optimizer, total_steps, phase.warmup_ratio)
        warmup = math.ceil(phase.warmup_ratio * total_steps)
        decay = min(math.ceil(phase.decay_ratio * total_steps), total_steps - warmup)
        return get_wsd_schedule(optimizer, warmup, decay, num_training_steps=total_steps)

    def _save(self, state: TrainerState) -> Path:
        return save_checkpoint(self.accelerator, self.output_dir, state.global_step, state.to_json(), self.keep_last)

    def _stop(self, state: TrainerState, saved: bool) -> None:
        """End the run after this step on a stop signal: write its checkpoint (unless ``saved`` already, or
        checkpoints are off) and raise TrainingStopped."""
        checkpoint = None
        if self.save_checkpoints:
            checkpoint = self._save(state) if not saved else self.output_dir / f"{CHECKPOINT_PREFIX}{state.global_step}"
        if self._stop_received:
            signum = self._stop_received[0]
            name = signal.Signals(signum).name
        else:
            signum, name = signal.SIGTERM, "another process's signal"
        self.accelerator.wait_for_everyone()
        stopped = TrainingStopped(name, state.global_step, checkpoint, 128 + signum)
        logger.warning(str(stopped))
        raise stopped

    def _train(self, *args: Any) -> None:
        """``_train_steps`` with log lines written above the progress bar, not into it."""
        with logging_redirect_tqdm():
            self._train_steps(*args)

    def _train_steps(
        self,
        phase: Phase,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        loader: DataLoader,
        state: TrainerState,
        total_steps: int,
        accumulation: int,
        batches_per_epoch: int,
    ) -> None:
        """The loop over one phase's optimiser steps; ``state`` is updated in place.

        Each step first takes all its micro-batches, counts their loss items (``Objective.num_items``)
        and sums the counts over the processes, so that every micro-batch's loss is normalised by the
        whole step's count (transformers' ``num_items_in_batch``). Its backward is scaled by
        processes x accumulation steps, which DDP's gradient mean and accelerate's division undo: the
        gradient is that of the step's loss, whatever the micro-batch size or number of processes.
        """
        acc = self.accelerator
        losses = state.phase_losses[state.phase]
        # the bar on a terminal only: in a file or a pipe its carriage-return updates run into the log lines,
        # which carry the progress there (step i/N, elapsed, eta)
        progress = tqdm(total=total_steps, initial=state.step, desc=phase.name,
                        disable=not acc.is_local_main_process or not sys.stderr.isatty())
        window = _Window()
        window.first_step = state.step
        throughput = state.phase_throughput[state.phase]
        if acc.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(acc.device)
        step_start: float | None = None  # None: the step running is this start's first, not timed
        model.train()
        scale = acc.num_processes * accumulation
        while state.step < total_steps:
            loader.set_epoch(state.epoch)
            batches = iter(acc.skip_first_batches(loader, state.batches_done) if state.batches_done else loader)
            try:  # the workers shut down on every way out (they ignore SIGTERM: ignore_stop_signals)
                while state.step < total_steps and state.batches_done < batches_per_epoch:
                    waiting = time.perf_counter()
                    micro_batches = [next(batches) for _ in range(accumulation)]
                    waited = time.perf_counter() - waiting
                    num_items = sum(self._num_items(phase, batch) for batch in micro_batches)
                    num_items = acc.reduce(num_items, "sum")
                    # the step's loss stays on the device and its counts on the host: no micro-batch waits for
                    # the GPU (a device -> host read, or a blocking host -> device copy, drains its queue)
                    step_loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
                    counts = [0.0, 0.0, 0.0, 0.0]  # samples, tokens, skipped, truncated
                    kinds = [s.kind for batch in micro_batches for s in batch["skipped"]]
                    step_number = state.global_step + 1
                    micro_times: list[tuple[bool, float]] = []  # a profiled step's (synced?, seconds) per micro-batch
                    with self._profiling(step_number) as profiler:  # None but at train.profile_step
                        for batch in micro_batches:
                            micro_start = time.perf_counter()
                            with acc.accumulate(model):
                                loss = self._micro_step(phase, model, batch, num_items)
                                step_loss_sum += loss.detach().double()
                                counts = [total + n for total, n in zip(counts, _host_counts(batch), strict=True)]
                                acc.backward(loss * scale)
                                if acc.sync_gradients and phase.max_grad_norm is not None:
                                    acc.clip_grad_norm_(model.parameters(), phase.max_grad_norm)
                                lr = optimizer.param_groups[0]["lr"]
                                optimizer.step()
                                if acc.sync_gradients:
                                    scheduler.step()
                                optimizer.zero_grad()
                            if profiler is not None:  # the device's time for this micro-batch (one wait per micro-batch)
                                if acc.device.type == "cuda":
                                    torch.cuda.synchronize(acc.device)
                                micro_times.append((acc.sync_gradients, time.perf_counter() - micro_start))
                            state.batches_done += 1
                    if profiler is not None:
                        profile_step_report(profiler, self.output_dir / "profile", step_number, acc.process_index,
                                            micro_times)
                    # the stop signals caught ride in the step's one reduction: every process stops after the same step
                    stopping = float(bool(self._stop_received))
                    totals = torch.cat([step_loss_sum[None],
                                        torch.tensor([*counts, waited, stopping], dtype=torch.float64).to(acc.device)])
                    loss_sum, samples, tokens, skipped, truncated, waited, stopping = acc.reduce(totals, "sum").tolist()
                    now = time.perf_counter()
                    if step_start is not None and profiler is None:  # a profiled step is slowed: not timed
                        throughput["timed_steps"] += 1
                        throughput["seconds"] += now - step_start
                        # the mean over the processes of the time blocked on the data loader
                        throughput["data_seconds"] = throughput.get("data_seconds", 0.0) + waited / acc.num_processes
                        throughput["samples"] += samples
                        throughput["tokens"] += tokens
                    step_start = now
                    for kind in gather_object(kinds) if acc.num_processes > 1 else kinds:
                        state.skipped_by_kind[kind] = state.skipped_by_kind.get(kind, 0) + 1
                    step_loss = loss_sum if bool(num_items.sum() > 0) else None  # None: every record skipped
                    state.step += 1
                    state.global_step += 1
                    losses.append(step_loss)
                    state.num_skipped += int(skipped)
                    state.num_truncated += int(truncated)
                    window.add(samples, tokens)
                    progress.update(1)
                    progress.set_postfix(loss=format_loss(step_loss), lr=f"{lr:.2e}", refresh=False)  # shown at the bar's own interval
                    if state.batches_done == batches_per_epoch:
                        state.epoch += 1
                        state.batches_done = 0
                    if state.step % self.log_every == 0 or state.step == total_steps:
                        self._log(phase, state, total_steps, step_loss, lr, window, batches_per_epoch // accumulation)
                    saved = False
                    if self.save_every and state.global_step % self.save_every == 0 and state.step < total_steps:
                        self._save(state)
                        saved = True
                        step_start = time.perf_counter()
                    if stopping:
                        progress.close()
                        self._stop(state, saved)
                    if state.batches_done == 0:
                        break
            finally:
                close_batches(batches)
        progress.close()
        if acc.device.type == "cuda":
            peak = acc.gather(torch.tensor([torch.cuda.max_memory_allocated(acc.device) / 2**30], device=acc.device))
            throughput["peak_memory_gib"] = max(float(peak.max()), throughput["peak_memory_gib"] or 0.0)
        if throughput["seconds"]:
            logger.info(
                f"phase {phase.name}: {throughput['tokens'] / throughput['seconds']:,.0f} tokens/s, "
                f"{throughput['samples'] / throughput['seconds']:.2f} samples/s over {throughput['timed_steps']} "
                f"timed steps, {throughput.get('data_seconds', 0.0) / throughput['seconds']:.1%} of their time "
                "waiting for the data loader" + (f", peak {throughput['peak_memory_gib']:.2f} GiB per process"
                                                 if throughput["peak_memory_gib"] is not None else "")
            )

    @contextmanager
    def _profiling(self, step: int) -> Iterator[torch.profiler.profile | None]:
        """torch.profiler over the CPU (and CUDA) around optimiser step ``step`` when it is
        ``profile_step`` (stopped when the block ends, however it ends); else None."""
        if step != self.profile_step:
            yield None
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.accelerator.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as profiler:
            yield profiler

    def _num_items(self, phase: Phase, batch: dict[str, Any]) -> Tensor:
        """The micro-batch's loss items (``Objective.num_items``; zeros when every record was skipped)."""
        if batch["input_ids"] is None:
            return torch.zeros_like(phase.objective.num_items(self._standin_batch()), dtype=torch.float64).to(
                self.accelerator.device
            )
        return phase.objective.num_items(batch).to(device=self.accelerator.device, dtype=torch.float64)

    def _micro_step(self, phase: Phase, model: nn.Module, batch: dict[str, Any], num_items: Tensor) -> Tensor:
        """One micro-batch's share of the step's loss (a 0-dim tensor on the device)."""
        skipped: list[SkippedSample] = batch["skipped"]
        if skipped:
            ids = ", ".join(f"{s.id} ({s.reason})" for s in skipped)
            logger.warning(f"skipped {len(skipped)} record(s): {ids}", main_process_only=False)
        normaliser = num_items.clamp(min=1.0)
        if batch["input_ids"] is None:
            # every process must run forward and backward; a zero loss on a valid batch keeps them in step
            return phase.objective.loss(model, self._standin_batch(), normaliser) * 0.0
        return phase.objective.loss(model, batch, normaliser)

    def _standin_batch(self) -> dict[str, Any]:
        """A one-sample batch of the first valid record (for micro-batches whose records were all skipped)."""
        if self._standin is None:
            kinds: dict[str, int] = {}
            first: SkippedSample | None = None
            for index in range(len(self.dataset)):
                sample = self.dataset[index]
                if not isinstance(sample, SkippedSample):
                    self._standin = _to_device(self.collate_fn([sample]), self.accelerator.device)
                    break
                kinds[sample.kind] = kinds.get(sample.kind, 0) + 1
                first = first or sample
            else:
                # the data's fault, not the code's: one line (a ConfigError) saying what was wrong with it
                counted = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items(), key=lambda item: -item[1]))
                raise ConfigError(
                    f"every record of the training data was skipped, nothing to train on: {len(self.dataset)} "
                    f"records ({counted})" + (f"; the first, {first.id}: {first.reason}" if first is not None else "")
                )
        return self._standin

    def _log(
        self,
        phase: Phase,
        state: TrainerState,
        total_steps: int,
        loss: float | None,
        lr: float,
        window: _Window,
        steps_per_epoch: int,
    ) -> None:
        samples_per_s, tokens_per_s = window.rates()
        elapsed = time.perf_counter() - window.run_start
        remaining = elapsed / max(state.step - window.first_step, 1) * (total_steps - state.step)
        # "epoch e/E": the 1-based epoch the step just logged belongs to. state.epoch counts the epochs
        # finished (0-based position in the data); a step that ended its epoch has already advanced it
        # (batches_done back to 0), so it is that epoch's number itself, else the running epoch is one more.
        epoch = state.epoch if state.batches_done == 0 else state.epoch + 1
        epochs = -(-total_steps // steps_per_epoch)  # phase.epochs, or what max_steps reaches into
        logger.info(
            f"{phase.name} step {state.step}/{total_steps} | epoch {epoch}/{epochs} | loss {format_loss(loss)} | "
            f"lr {lr:.3e} | {samples_per_s:.1f} samples/s | {tokens_per_s:.0f} tokens/s | "
            f"elapsed {format_duration(elapsed)}, eta {format_duration(remaining)}"
        )
        values = {f"{phase.name}/lr": lr, f"{phase.name}/samples_per_s": samples_per_s, f"{phase.name}/tokens_per_s": tokens_per_s}
        if loss is not None:
            values[f"{phase.name}/loss"] = loss
        self.accelerator.log(values, step=state.global_step)


def trainable_parameter_count(module: nn.Module, sizes: dict[int, int]) -> int:
    """The elements of ``module``'s trainable parameters at their full size: ``sizes`` (``id(p)`` ->
    numel, taken before the module was wrapped) for the parameters it knows, whose tensors FSDP
    (``use_orig_params``: views of this process's shard) and ZeRO-3 (empty until gathered) shrink on each
    process; ``numel()`` for the others."""
    return sum(sizes.get(id(p), p.numel()) for p in module.parameters() if p.requires_grad)


PROFILE_ROWS = 40
"""Operators listed per table of a step profile."""


def _own_time_table(events: Iterable[Any], device: bool, rows: int) -> str | None:
    """The ``rows`` operators with the most own time: device kernels by their duration (``device``), or
    CPU operators by their duration less their children's; a markdown-like table of total ms, calls
    and share, or None when no event is of that kind.

    Why not PyTorch's ``key_averages().table()``: it recomputes every operator's device time through its
    whole subtree, again for each ancestor, which took over five minutes for one FSDP step of
    MambaVLM-2.8B at the paper's batch on an H200 (32 micro-batches); this is one pass over the events."""
    totals: dict[str, list[float]] = {}
    for event in events:
        if (event.device_type == DeviceType.CPU) == device:
            continue
        own = event.time_range.elapsed_us()
        if not device:
            own -= sum(child.time_range.elapsed_us() for child in event.cpu_children)
        total = totals.setdefault(event.name, [0.0, 0])
        total[0] += own
        total[1] += 1
    if not totals:
        return None
    whole = sum(t for t, _ in totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:rows]
    lines = ["| own ms | calls | share | name |", "|---:|---:|---:|---|"]
    lines += [f"| {t / 1e3:.3f} | {int(n)} | {100 * t / whole:.1f} % | {name[:120]} |" for name, (t, n) in ranked]
    return "\n".join(lines)


def profile_step_report(profiler: torch.profiler.profile, directory: Path, step: int, rank: int,
                        micro_times: Sequence[tuple[bool, float]] = ()) -> tuple[Path, Path]:
    """Write a recorded optimiser step: ``step-N-rank-R.txt``, the micro-batches' seconds and whether
    each reduced gradients (``micro_times``: (synced, seconds), each timed to the end of its device work),
    the operators by their own device time (CUDA runs) and by their own CPU time (``_own_time_table``,
    ``PROFILE_ROWS`` rows each: where a step's GPU time goes, and what the CPU spends enqueueing it), and
    ``step-N-rank-R.json``, the Chrome trace (chrome://tracing, ui.perfetto.dev) with both timelines.
    Returns the two paths."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"step-{step}-rank-{rank}"
    events = profiler.events()
    micro = None
    if micro_times:
        micro = "| micro-batch | gradients | seconds |\n|---:|---|---:|\n" + "\n".join(
            f"| {i} | {'reduced' if synced else 'accumulated (no_sync)'} | {seconds:.3f} |"
            for i, (synced, seconds) in enumerate(micro_times))
    tables = [(title, table) for title, table in (
        ("micro-batches", micro),
        ("kernels by their device time", _own_time_table(events, True, PROFILE_ROWS)),
        ("operators by their own CPU time", _own_time_table(events, False, PROFILE_ROWS)),
    ) if table is not None]
    text = "\n\n".join(f"step {step}, process {rank}: {title}\n{table}" for title, table in tables)
    with atomic_file(stem.with_suffix(".txt"), "w") as f:
        f.write(text + "\n")
    profiler.export_chrome_trace(str(stem.with_suffix(".json")))
    logger.info(f"step {step} profiled: {stem}.txt, {stem}.json", main_process_only=False)
    return stem.with_suffix(".txt"), stem.with_suffix(".json")


def _host_counts(batch: dict[str, Any]) -> tuple[int, int, int, int]:
    """A micro-batch's samples, real tokens, skipped records and truncated samples, from the collator's
    host-side fields (``VLMCollator``)."""
    return len(batch["ids"]), batch["num_tokens"], len(batch["skipped"]), batch["num_truncated"]


class _Window:
    """Samples and tokens since the last log line, for throughput."""

    def __init__(self) -> None:
        self.start, self.samples, self.tokens = time.perf_counter(), 0.0, 0.0
        self.run_start, self.first_step = self.start, 0  # this process's start in the phase, and its step

    def add(self, samples: float, tokens: float) -> None:
        self.samples += samples
        self.tokens += tokens

    def rates(self) -> tuple[float, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rates = self.samples / elapsed, self.tokens / elapsed
        self.start, self.samples, self.tokens = time.perf_counter(), 0.0, 0.0
        return rates


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = dict(batch)
    for key in ("input_ids", "attention_mask", "labels"):
        out[key] = batch[key].to(device)
    if batch["pixel_values"] is not None:
        out["pixel_values"] = [p.to(device) for p in batch["pixel_values"]]
    return out


def format_loss(loss: float | None) -> str:
    """A loss for a log line (``n/a`` when no record contributed)."""
    return f"{loss:.4f}" if loss is not None else "n/a"
