"""Inspect a model config without weights: ``python -m mambavlm.describe CONFIG [key=value ...]``.

Builds the model on the meta device (no memory, no download) and prints a per-part parameter table
and a ``num_visual_tokens: N`` line (1458 for the paper's MambaVLM-2.8B config).
"""

from __future__ import annotations

import argparse
import sys

import torch

from mambavlm.config import ConfigError
from mambavlm.model import build_model, describe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mambavlm.describe", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="model YAML, e.g. configs/model/mambavlm-2.8b.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. projector.d_state=32")
    args = parser.parse_args(argv)
    try:
        with torch.device("meta"):
            model = build_model(args.config, args.overrides, load_weights=False, load_tokenizer=False)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"model: {model.config.name}")
    print(describe(model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
