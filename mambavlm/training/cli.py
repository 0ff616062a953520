"""How ``train/finetune.py`` and ``train/distill.py`` end a run: the user's errors as one line, the exit
statuses a scheduler or shell reads."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from mambavlm.config import ConfigError
from mambavlm.llm.factory import LLMBuildError
from mambavlm.training.engine import TrainingStopped

__all__ = ["run_from_command_line"]

R = TypeVar("R")


def run_from_command_line(
    parser: argparse.ArgumentParser, run: Callable[[], R], output_dir: str | Path, resume_key: str
) -> R:
    """``run()``, its ends turned into exits of ``parser``'s program:

    - ConfigError, LLMBuildError, FileNotFoundError (found once the run starts: a data or model path, the
      LLM config against its source, accelerate's setup; the user's to fix): status 2, ``error: MESSAGE``;
    - Ctrl-C (KeyboardInterrupt; the engine's ``finally`` blocks have run, no checkpoint written since the
      last one): status 130, one line saying ``RESUME_KEY=latest`` goes on from the newest in ``output_dir``,
      rather than a traceback through the data loader;
    - a scheduler's SIGTERM (TrainingStopped, its step's checkpoint written): its exit status (143) and
      message, with the resume hint where a checkpoint was written.
    """
    try:
        return run()
    except (ConfigError, LLMBuildError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"interrupted by Ctrl-C: no checkpoint written for the steps since the last one; "
                         f"{resume_key}=latest continues from the newest in {output_dir}, if any\n")
    except TrainingStopped as err:
        hint = f"; resume with {resume_key}=latest" if err.checkpoint is not None else ""
        parser.exit(err.exit_code, f"{err}{hint}\n")
