"""Distil a Transformer VLM into a hybrid Mamba-2 model: ``accelerate launch train/distill.py --config
configs/distill/NAME.yaml [teacher=DIR layout=... output_dir=... key=value ...]``.

The configuration names the teacher, the layout, the seeding and the stages; the stages run as phases
of the one training engine (``mambavlm.distill.run``), with checkpoints (``save_every``), exact resume
(``resume_from=latest``), bad-record skipping, trackers and logs.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="distill YAML (configs/distill/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (teacher=DIR layout=ratio:0.25 ...)")
    args = parser.parse_args(argv)
    # imported after parsing: importing mambavlm loads torch, transformers and the model (it registers
    # with transformers' Auto classes), seconds that --help and a usage error need not wait for
    from mambavlm.config import ConfigError
    from mambavlm.distill.config import load_distill_config
    from mambavlm.distill.run import run_distillation
    from mambavlm.llm.factory import LLMBuildError
    from mambavlm.training import TrainingStopped

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        config = load_distill_config(args.config, args.overrides)
    except (ConfigError, TypeError) as err:  # a config error is the user's to fix: the message, no traceback
        parser.exit(2, f"error: {err}\n")
    try:
        return run_distillation(config)
    except (ConfigError, LLMBuildError, FileNotFoundError) as err:  # found once the run starts (a data or
        # model path, the LLM config against its source, accelerate setup): also the user's to fix
        parser.exit(2, f"error: {err}\n")
    except KeyboardInterrupt:  # Ctrl-C: stopped where it was, without a checkpoint (the engine's finally
        # blocks have run); one line rather than a traceback through the data loader
        parser.exit(130, f"interrupted by Ctrl-C: no checkpoint written for the steps since the last one; "
                         f"resume_from=latest continues from the newest in {config.output_dir}, if any\n")
    except TrainingStopped as err:  # a scheduler's SIGTERM: the step's checkpoint is written, say how to go on
        hint = "; resume with resume_from=latest" if err.checkpoint is not None else ""
        parser.exit(err.exit_code, f"{err}{hint}\n")


if __name__ == "__main__":
    main()
