"""Train a MambaVLM: ``accelerate launch train/finetune.py --config configs/train/NAME.yaml [key=value ...]``.

The same command runs on a CPU, one GPU, or many (pick a file from configs/accelerate/ with
``accelerate launch --config_file``). Overrides use dotted keys: ``output_dir=outputs/run2
train.max_steps=100 model.projector.d_state=8 blind=true``. The schema with every default:
mambavlm/training/config.py (TrainConfig).

Keys (key=value, dotted into sections):
  model=YAML           a model YAML (configs/model/*.yaml), or its keys: model.name model.max_length
                       model.vision.* model.projector.* (d_state, ...) model.llm.* (model.llm.config.*: the
                       transformers config's fields)
  data.train=JSON data.val=JSON data.image_root=DIR   LLaVA-format JSON files (image paths relative to
                       data.image_root, default the JSON's directory); without data.train, the synthetic task:
                       data.synthetic={num_train: N, num_val: N, image_size: 32, seed: 0}
  data.num_workers=N data.max_length=N
  train.freeze=align|finetune   the projector only, or the projector and the LLM
  train.epochs=N train.max_steps=N train.global_batch_size=N train.micro_batch_size=N
  train.lr=X train.weight_decay=X train.warmup_ratio=X train.max_grad_norm=X
  train.mixed_precision=no|bf16|fp16 train.gradient_checkpointing=true train.sync_each_batch=true
  train.profile_step=N train.log_every=N
  train.save_every=N train.checkpoints=true|false train.keep_last=N train.resume_from=latest|CHECKPOINT
  train.eval_batch_size=N train.eval_max_new_tokens=N   the val split, scored by exact match at the end
  lora={r: 16, alpha: 32, dropout: 0.05}   LoRA on the LLM through peft instead of all its weights; also
                       lora.target_modules=[...] lora.projector=full|lora|frozen lora.qlora=true (4-bit NF4)
  output_dir=DIR seed=N blind=true (every image a blank grey one) trackers=[tensorboard] cpu_threads=N

Exit status: 0 done (train.resume_from=latest on a run finished with this config: nothing run or written);
2 a config or path error (one "error: ..." line); 143 stopped by SIGTERM with a checkpoint
(train.resume_from=latest continues); 130 interrupted by Ctrl-C (no checkpoint since the last one).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
