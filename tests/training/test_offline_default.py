"""The offline default's numbers do not drift with the libraries under it.

The first steps of ``configs/train/tiny.yaml`` (the README's main command) on a small slice of its
synthetic task must give the loss curve below: the same under transformers 5.17 and 5.24 (measured),
because the tiny Mamba-2 LLM runs this package's own mixer and initialisation. A change in any layer
under the default — a library's initialisation, a kernel's numerics, the data generator, the
tokenizer — moves these numbers and fails here, before it moves the README's accuracy.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mambavlm.training import load_train_config, run_finetune
from tests.conftest import TINY_TRAIN

FIRST_STEP_LOSSES = [7.276617, 4.316581, 3.295443, 2.296237, 2.33209, 1.511212, 1.240911, 1.841003]
"""Seen with torch 2.14.1 and transformers 5.17.0 / 5.24.0 (identical to 6 digits)."""


def test_the_offline_defaults_first_steps_do_not_move(tmp_path: Path) -> None:
    config = load_train_config(TINY_TRAIN, [
        f"output_dir={tmp_path}", "data.synthetic.num_train=64", "data.synthetic.num_val=0", "train.max_steps=8",
        "train.global_batch_size=8", "train.micro_batch_size=8", "train.save_every=null", "train.warmup_ratio=0",
    ])
    assert run_finetune(config)["step_losses"] == pytest.approx(FIRST_STEP_LOSSES, rel=1e-4)
