"""Merge a LoRA run's adapters into a full model: ``python train/merge_lora.py ADAPTER_DIR --out DIR``.

ADAPTER_DIR is a LoRA run's output_dir or its ``final_adapter/`` (``save_adapter``); another directory is
refused in one line. The base is ``--base`` (a saved MambaVLM),
else the ``base/`` saved beside the adapters (runs whose config does not pin the base weights), else
rebuilt from the model config stored there (the encoders' and the LLM's pretrained weights, as the
run loaded them). The adapters are folded into the weights (peft's
``merge_and_unload``) and the result is written with ``save_pretrained``: a plain MambaVLM, loadable
without peft. An ``--out`` that already holds something is refused unless ``--overwrite`` is given (the
new model then replaces it in one rename).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger("merge_lora")


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", type=Path, help="a LoRA run's output_dir or its final_adapter/ directory")
    parser.add_argument("--out", type=Path, required=True, help="where the merged model is written")
    parser.add_argument("--base", type=Path, help="a saved MambaVLM to merge into (default: rebuilt from the adapter's model config)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already holds something")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.overwrite and (not args.out.is_dir() or any(args.out.iterdir())):
        parser.exit(2, f"error: --out {args.out} already exists and is not empty; pass --overwrite to replace it\n")
    # imported after parsing: importing mambavlm loads torch, transformers and the model (it registers
    # with transformers' Auto classes), seconds that --help and a usage error need not wait for
    from mambavlm.config import ModelConfig, load_config
    from mambavlm.model import MambaVLM, build_model
    from mambavlm.training.finetune import resolve_adapter_dir
    from mambavlm.training.lora import (
        BASE_DIR,
        MODEL_CONFIG_FILE,
        load_adapter,
        merge_adapter,
    )

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        args.adapter = resolve_adapter_dir(args.adapter)
    except FileNotFoundError as err:
        parser.exit(2, f"error: {err}\n")
    if args.base is not None:
        model = MambaVLM.from_pretrained(args.base)
    elif (args.adapter / BASE_DIR).is_dir():
        model = MambaVLM.from_pretrained(args.adapter / BASE_DIR)
    else:
        model = build_model(load_config(ModelConfig, args.adapter / MODEL_CONFIG_FILE))
    try:
        settings = load_adapter(model, args.adapter)
    except ValueError as err:  # a --base other than the adapters' model
        parser.exit(2, f"error: {err}\n")
    merge_adapter(model, settings)
    model.save_pretrained(args.out)
    logger.info("merged %s into %s", args.adapter, args.out)
    return args.out


if __name__ == "__main__":
    main()
