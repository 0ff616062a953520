"""Resumable checkpoints: ``OUTPUT_DIR/checkpoint-STEP/``, written atomically, the last K kept.

A checkpoint holds accelerate's ``save_state`` (model, optimiser, scheduler, gradient scaler, the RNG
state of every process) plus ``trainer_state.json`` (step, epoch, position in the epoch, the loss
curve so far). It is written into a temporary sibling directory and renamed into place once complete,
so a run killed mid-write leaves the previous checkpoints as they were and no ``checkpoint-STEP``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import wraps
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, broadcast_object_list

from mambavlm.atomic import atomic_directory
from mambavlm.config import ConfigError

logger = get_logger(__name__)

__all__ = [
    "CHECKPOINT_PREFIX",
    "TRAINER_STATE_FILE",
    "check_resumed_architecture",
    "find_checkpoints",
    "initialize_optimizer_state",
    "load_checkpoint",
    "lock_output_dir",
    "prune_checkpoints",
    "release_output_dir",
    "releasing_output_dir_on_error",
    "remove_unfinished_writes",
    "resolve_resume",
    "save_checkpoint",
]

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_FILE = "trainer_state.json"
_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
_UNFINISHED_NAME = re.compile(rf"^\.(tmp|old|del)-{CHECKPOINT_PREFIX}\d+")


def find_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete ``checkpoint-STEP`` directories under ``output_dir``, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _CHECKPOINT_NAME.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


WEIGHT_SOURCE_KEYS = ("source", "weights")
"""Settings that say where initial weights came from, not what the model is: a resumed run reads its
weights from the checkpoint, so they may differ (moved files)."""


def _differences(old: Any, new: Any, prefix: str) -> list[str]:
    """``prefix.key: old -> new`` for each setting that differs (a whole section where one side has none),
    ``WEIGHT_SOURCE_KEYS`` aside."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted((old.keys() | new.keys()) - set(WEIGHT_SOURCE_KEYS))
        return [d for key in keys for d in _differences(old.get(key), new.get(key), f"{prefix}.{key}")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):  # e.g. the vision encoders
        return [d for i, (a, b) in enumerate(zip(old, new, strict=True)) for d in _differences(a, b, f"{prefix}.{i}")]
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def check_resumed_architecture(
    checkpoint: Path | None, config_file: str, current: dict[str, Any], keys: Sequence[str], resume_key: str
) -> None:
    """A checkpoint resumes only the model it was saved from. The run that wrote ``checkpoint`` saved its
    config as ``checkpoint.parent / config_file``; its values under ``keys`` (top-level sections, e.g.
    ``model``) must equal ``current``'s (the new run's config as a dict), else loading would fail deep
    in ``load_state_dict`` with a size mismatch or missing keys; where the initial weights came from
    (``WEIGHT_SOURCE_KEYS``) may differ. Nothing to check without a checkpoint or
    a saved config.

    Raises:
        ConfigError: naming ``resume_key``, the checkpoint and each differing setting (saved -> now).
    """
    saved_file = checkpoint.parent / config_file if checkpoint is not None else None
    if saved_file is None or not saved_file.is_file():
        return
    saved = yaml.safe_load(saved_file.read_text()) or {}
    changed = [d for key in keys for d in _differences(saved.get(key), current.get(key), key)]
    if changed:
        shown = "; ".join(changed[:5]) + (f"; and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise ConfigError(
            f"{resume_key}: {checkpoint} was saved by a run with another model ({shown}): a checkpoint resumes "
            f"only the model it was saved from; set those back, or another output_dir to start over"
        )


def resolve_resume(resume_from: str | None, output_dir: str | Path, resume_key: str = "resume_from") -> Path | None:
    """The checkpoint to resume from: ``None``, a directory, or ``"latest"`` (None if there is none).
    Raises FileNotFoundError naming ``resume_key`` (the config key, ``train.resume_from`` in a train
    config) for a directory without a trainer state, or one that does not exist (naming the checkpoints
    ``output_dir`` holds: ``keep_last`` may have deleted the one a log line named)."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        checkpoints = find_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from)
    if not path.exists():
        held = [c.name for c in find_checkpoints(output_dir)]
        hint = (
            f"; {output_dir} holds {', '.join(held)} ({resume_key}=latest takes the newest)" if held
            else f"; {output_dir} holds no checkpoint"
        )
        raise FileNotFoundError(f"{resume_key}={resume_from!r} does not exist{hint}")
    if not (path / TRAINER_STATE_FILE).is_file():
        raise FileNotFoundError(
            f"{resume_key}={resume_from!r} is not a checkpoint directory (no {TRAINER_STATE_FILE})"
        )
    return path


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    step: int,
    trainer_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write ``output_dir/checkpoint-STEP`` atomically on every process, then keep the last ``keep_last``.

    All processes call this: each writes its part of the state (its RNG state; its shard under FSDP)
    into the temporary directory the main process created, and the main process renames it into
    place after every process has finished.
    """
    target = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    with ExitStack() as stack:
        tmp = stack.enter_context(atomic_directory(target)) if accelerator.is_main_process else None
        tmp = Path(broadcast_object_list([str(tmp) if tmp is not None else None])[0])
        with _quiet_below_warning(*ACCELERATE_SAVE_LOGGERS):
            accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            (tmp / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state, indent=1) + "\n")
        accelerator.wait_for_everyone()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        logger.info(f"saved {target}")  # accelerate's own line names the temporary directory
        prune_checkpoints(output_dir, keep_last)
    return target


ACCELERATE_SAVE_LOGGERS = ("accelerate.accelerator", "accelerate.checkpointing")
"""accelerate's loggers that write six INFO lines per ``save_state``, each naming the temporary directory a
checkpoint is written into (gone once it is renamed into place): kept to warnings while one is saved, the
log's line for it being ``saved OUTPUT_DIR/checkpoint-STEP``."""


@contextmanager
def _quiet_below_warning(*names: str) -> Iterator[None]:
    """Raise the named loggers to WARNING for the block (their own level is restored after it)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def load_checkpoint(
    accelerator: Accelerator, path: str | Path, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Restore accelerate's state from ``path`` (every process) and return its trainer state. Raises
    ConfigError naming the checkpoint and the first mismatches when its weights do not fit the model.

    Under FSDP, ``optimizer`` (the phase's, as prepared) is given its state first
    (:func:`initialize_optimizer_state`), so that its moments are loaded too.
    """
    path = Path(path)
    if optimizer is not None and accelerator.distributed_type == DistributedType.FSDP:
        initialize_optimizer_state(optimizer)
    try:
        accelerator.load_state(str(path))
    except RuntimeError as err:  # load_state_dict's size mismatch / missing keys: another model's checkpoint
        if not str(err).startswith("Error(s) in loading state_dict"):
            raise
        details = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        shown = "; ".join(details[:2]) + (f"; and {len(details) - 2} more" if len(details) > 2 else "")
        raise ConfigError(f"{path} does not fit this run's model ({shown}): a checkpoint resumes only the model "
                          "it was saved from") from None
    return json.loads((path / TRAINER_STATE_FILE).read_text())


def initialize_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give a fresh optimiser its per-parameter state (AdamW: ``step``, ``exp_avg``, ``exp_avg_sq``)
    without changing any parameter: one step at learning rate 0 over zero gradients. Does nothing
    when it has state already. Gradients are left unset.

    accelerate loads an FSDP optimiser checkpoint (sharded state dict, ``load_fsdp_optimizer``) into
    the template ``FSDP.optim_state_dict(model, optimizer)`` of the optimiser as it is: for a fresh
    optimiser that template holds no moments, so only the hyper-parameters were loaded and a resumed
    run diverged from its second step (seen on 2 H200s). ``torch.distributed.checkpoint.state_dict``
    fills the template the same way (its private ``_init_optim_state``).
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    if inner.state:
        return
    lrs = [group["lr"] for group in inner.param_groups]
    for group in inner.param_groups:
        group["lr"] = 0.0
        for param in group["params"]:
            if param.requires_grad and param.grad is None:
                param.grad = torch.zeros_like(param)
    inner.step()
    for group, lr in zip(inner.param_groups, lrs, strict=True):
        group["lr"] = lr
    inner.zero_grad(set_to_none=True)


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints; returns the deleted paths.

    Each is renamed out of the ``checkpoint-STEP`` namespace before it is deleted, so a kill during
    deletion never leaves a partial ``checkpoint-STEP``.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    doomed = find_checkpoints(output_dir)[:-keep_last]
    for path in doomed:
        trash = path.with_name(f".del-{path.name}-{os.getpid()}")
        os.replace(path, trash)
        shutil.rmtree(trash)
    return doomed


def remove_unfinished_writes(output_dir: str | Path) -> list[Path]:
    """Delete temporaries that a killed run left beside its checkpoints; returns their paths."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    leftovers = [p for p in output_dir.iterdir() if _UNFINISHED_NAME.match(p.name)]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


_HELD_LOCKS: dict[Path, int] = {}  # output directories this process holds: resolved path -> descriptor
_CREATED_DIRS: dict[Path, list[Path]] = {}  # resolved path -> the directories its lock created, deepest first


def lock_output_dir(output_dir: str | Path) -> None:
    """Hold ``output_dir`` (created if missing) for this process until ``release_output_dir`` or the
    process ends (a kill included: the lock is the kernel's ``flock`` on the directory itself, no file is
    written). Taken once per process: a second call for a directory this process holds does nothing.
    The directories created here (``output_dir`` and any missing parents) are remembered, so that
    ``release_output_dir`` removes those a run left empty.

    Two runs writing one ``output_dir`` at once (a second launch; a process left running after
    ``accelerate launch`` itself was stopped, which does not pass a SIGTERM on) overwrite each other's
    checkpoints, data and final model, and a starting run deletes the unfinished checkpoint the other is
    writing (``remove_unfinished_writes``). On a system without ``fcntl`` nothing is locked.

    Raises:
        ConfigError: another process holds it, naming that process where ``/proc/locks`` tells it.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX
        return
    output_dir = Path(output_dir)
    missing = [path for path in (output_dir, *output_dir.parents) if not path.exists()]
    output_dir.mkdir(parents=True, exist_ok=True)
    key = output_dir.resolve()
    if key in _HELD_LOCKS:
        return
    fd = os.open(output_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _lock_holder(fd)
        os.close(fd)
        raise ConfigError(
            f"{output_dir} is being written by another run{f' ({holder})' if holder else ''}: wait for it to end or "
            "stop it (a run left behind by a stopped `accelerate launch`, say), or set another output_dir"
        ) from None
    _HELD_LOCKS[key] = fd
    _CREATED_DIRS[key] = [path.resolve() for path in missing]


def release_output_dir(output_dir: str | Path) -> None:
    """Let another run write ``output_dir`` (``lock_output_dir``); nothing when this process does not hold it.

    The directories ``lock_output_dir`` created that are still empty (a run that failed before writing
    anything) are removed, deepest first, up to the first that is not empty; a directory that existed
    before the lock, or holds anything, is kept."""
    key = Path(output_dir).resolve()
    fd = _HELD_LOCKS.pop(key, None)
    if fd is None:
        return
    os.close(fd)  # closing the last descriptor releases the flock
    for created in _CREATED_DIRS.pop(key, []):
        try:
            created.rmdir()  # refused for a directory that is not empty: the run wrote something
        except OSError:
            break


P = ParamSpec("P")
R = TypeVar("R")


def releasing_output_dir_on_error(run: Callable[P, R]) -> Callable[P, R]:
    """``run`` (a function whose ``Trainer`` locks an output directory: ``run_finetune``,
    ``run_distillation``) made to release, when it raises, the output directories it locked and still
    holds (``release_output_dir``: one the lock created and nothing was written into is removed), then
    re-raise. A run that fails on its model, teacher or layout before writing anything then leaves no
    empty ``output_dir`` behind; a directory that existed before, or holds anything, is kept."""

    @wraps(run)
    def released_on_error(*args: P.args, **kwargs: P.kwargs) -> R:
        held_before = set(_HELD_LOCKS)
        try:
            return run(*args, **kwargs)
        except BaseException:
            for key in set(_HELD_LOCKS) - held_before:
                release_output_dir(key)
            raise

    return released_on_error


def _lock_holder(fd: int) -> str | None:
    """``pid N: its command line`` of the process whose flock holds the file open as ``fd``, from Linux's
    ``/proc/locks``; None where that cannot be told."""
    stat = os.fstat(fd)
    file_id = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"  # as /proc/locks writes it
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 4242 00:2d:1234 0 EOF" (blocked waiters carry a "->" field first)
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == file_id:
            pid = fields[4]
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                command = ""
            return f"pid {pid}" + (f": {command}" if command else "")
    return None
