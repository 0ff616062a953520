"""Distil a Transformer VLM into a hybrid Mamba-2 model: ``accelerate launch train/distill.py --config
configs/distill/NAME.yaml [teacher=DIR layout=... output_dir=... key=value ...]``.

The configuration names the teacher, the layout, the seeding and the stages; the stages run as phases
of the one training engine (``mambavlm.distill.run``), with checkpoints (``save_every``), exact resume
(``resume_from=latest``), bad-record skipping, trackers and logs. The student is written to
OUTPUT_DIR/student, the losses and val accuracies to OUTPUT_DIR/metrics.json.

Keys (key=value, dotted into sections and lists: stages.2.lr=1e-4):
  teacher=DIR          a MambaVLM directory whose LLM is LLaMA-family (train/finetune.py's final/), or an
                       HF Llama directory
  layout=RULE:VALUE    which layers become Mamba-2: head-interleaved:K, tail-interleaved:K (attention in
                       the first / last layer of each block of K), head-stacked:N, tail-stacked:N (N
                       attention layers at the bottom / top), ratio:R (that share of the layers Mamba-2,
                       spread evenly: MaTVLM), list:I,J,... (these layers), linear (every layer)
  seeding=mmmamba|matvlm   how the Mamba-2 mixers start from the attention they replace
  mixer_options={...}  Mamba-2 mixer fields over the seeding's (e.g. {d_conv: 2})
  stages=[{name, max_steps, lr, ...}]   stage1, stage2, stage3 (mmMamba) or matvlm, run in order
  data.train=JSON data.val=JSON data.image_root=DIR, or data.synthetic={...}; data.num_workers=N
                       data.max_length=N
  output_dir=DIR save_every=N keep_last=N resume_from=latest|CHECKPOINT mixed_precision=no|bf16|fp16
  gradient_checkpointing=true sync_each_batch=true trackers=[tensorboard] seed=N log_every=N
  profile_step=N cpu_threads=N eval_batch_size=N eval_max_new_tokens=N
  template=plain|vicuna_v1   an HF Llama teacher's conversation template (a MambaVLM brings its own)

Exit status: 0 done (resume_from=latest on a run finished with this config: one line naming the student,
nothing run or written); 2 a config or path error (one "error: ..." line); 143 stopped by SIGTERM with a
checkpoint (resume_from=latest continues); 130 interrupted by Ctrl-C (no checkpoint since the last one).
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
    from mambavlm.training.cli import run_from_command_line

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        config = load_distill_config(args.config, args.overrides)
    except (ConfigError, TypeError) as err:  # a config error is the user's to fix: the message, no traceback
        parser.exit(2, f"error: {err}\n")
    return run_from_command_line(parser, lambda: run_distillation(config), config.output_dir, "resume_from")


if __name__ == "__main__":
    main()
