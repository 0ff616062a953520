"""Train a MambaVLM: ``accelerate launch train/finetune.py --config configs/train/NAME.yaml [key=value ...]``.

The same command runs on a CPU, one GPU, or many (pick a file from configs/accelerate/ with
``accelerate launch --config_file``). Overrides use dotted keys: ``output_dir=outputs/run2
train.max_steps=100 model.projector.d_state=8 blind=true``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="train YAML (configs/train/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the train config")
    args = parser.parse_args(argv)
    # imported after parsing: importing mambavlm loads torch, transformers and the model (it registers
    # with transformers' Auto classes), seconds that --help and a usage error need not wait for
    from mambavlm.config import ConfigError
    from mambavlm.training import load_train_config, run_finetune
    from mambavlm.training.cli import run_from_command_line

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        config = load_train_config(args.config, args.overrides)
    except (ConfigError, TypeError) as err:  # a config error is the user's to fix: the message, no traceback
        parser.exit(2, f"error: {err}\n")
    run_from_command_line(parser, lambda: run_finetune(config), config.output_dir, "train.resume_from")


if __name__ == "__main__":
    main()
