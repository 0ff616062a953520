"""Inspect a model without its weights: ``python -m mambavlm.describe CONFIG [key=value ...]``.

CONFIG is a model YAML (with overrides), a train YAML (its ``model:`` section; overrides as the train
config takes them, ``model.projector.d_state=32``), a saved MambaVLM directory (its ``config.json``) or a training
run's output directory (its ``final/``, a distillation's ``student/``, as ``eval/`` and ``chat`` take it). Builds the
model on the meta device (no memory, no download, no weights read) and prints a per-part parameter
table and a ``num_visual_tokens: N`` line (1458 for the paper's MambaVLM-2.8B config); for a hybrid LLM
(``hybrid_llama``, a distilled student) also which layers are Mamba-2, e.g.
``llm layers: 8 Mamba-2 (0-3, 5, 7-9), 2 attention``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import huggingface_hub.errors
import torch

from mambavlm.config import ConfigError, exception_line, load_yaml
from mambavlm.configuration import MambaVLMConfig
from mambavlm.eval.model_dir import RUN_MODEL_DIRS
from mambavlm.model import MambaVLM, build_model, describe, is_mambavlm_directory

CONFIG_CLASS_ERRORS: tuple[type[Exception], ...] = tuple(
    cls for cls in (getattr(huggingface_hub.errors, "StrictDataclassError", None),) if cls is not None
)
"""What transformers' config classes raise for values their validators refuse (not a ValueError)."""


def meta_model(config: str, overrides: list[str]) -> MambaVLM:
    """The model a YAML (with overrides) or a saved MambaVLM directory describes, on the meta device.

    Raises:
        ConfigError: a directory that is not a saved MambaVLM, or overrides given with one.
    """
    path = Path(config)
    with torch.device("meta"):
        if not path.is_dir():
            if path.is_file() and {"model", "train"} <= load_yaml(path).keys():  # a train config: its model
                from mambavlm.training.config import load_train_config

                model_config = load_train_config(path, overrides).model
                return build_model(model_config, load_weights=False, load_tokenizer=False)
            return build_model(config, overrides, load_weights=False, load_tokenizer=False)
        if not is_mambavlm_directory(path):
            path = next((path / name for name in RUN_MODEL_DIRS if is_mambavlm_directory(path / name)), path)
        if not is_mambavlm_directory(path):
            raise ConfigError(f"{config} is a directory but not a saved MambaVLM (config.json + weights): describe "
                              "takes a model YAML (configs/model/*.yaml), a saved model's directory or a run's "
                              "output directory")
        if overrides:
            raise ConfigError(f"overrides apply to a model YAML, not to the saved model {config}")
        return MambaVLM(MambaVLMConfig.from_pretrained(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mambavlm.describe", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="model YAML (e.g. configs/model/mambavlm-2.8b.yaml), train YAML, saved "
                                       "model's directory or run's output directory")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. projector.d_state=32")
    args = parser.parse_args(argv)
    try:
        model = meta_model(args.config, args.overrides)
    except ConfigError as err:  # one line per problem, each naming the file or override and the key
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, *CONFIG_CLASS_ERRORS) as err:  # e.g. a saved model's config.json
        # that transformers refuses: its message, on one line
        print(f"error: {exception_line(err)}", file=sys.stderr)
        return 2
    print(f"model: {model.config.name}")
    print(describe(model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
