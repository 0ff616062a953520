"""Checkpoints: the last k kept, a crash inside a write leaves none, leftovers of a killed write ignored
and cleaned, resume paths resolved."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from mambavlm.training import find_checkpoints, save_checkpoint
from mambavlm.training.checkpoint import TRAINER_STATE_FILE, remove_unfinished_writes, resolve_resume

pytestmark = pytest.mark.usefixtures("on_cpu")


@pytest.fixture
def prepared_accelerator():
    accelerator = Accelerator()
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model


def test_checkpoints_keep_the_last_k(tmp_path, prepared_accelerator):
    accelerator, _ = prepared_accelerator
    for step in range(1, 5):
        save_checkpoint(accelerator, tmp_path, step, {"step": step}, keep_last=2)
    assert [p.name for p in find_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]
    assert json.loads((tmp_path / "checkpoint-4" / TRAINER_STATE_FILE).read_text()) == {"step": 4}
    assert resolve_resume("latest", tmp_path) == tmp_path / "checkpoint-4"


def test_a_crash_inside_the_write_leaves_no_checkpoint(tmp_path, prepared_accelerator, monkeypatch):
    accelerator, model = prepared_accelerator
    save_checkpoint(accelerator, tmp_path, 1, {"step": 1}, keep_last=1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-1").iterdir()}
    real_save_state = accelerator.save_state

    def crash_midway(output_dir, **kwargs):
        real_save_state(output_dir, **kwargs)  # files are written, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(accelerator, "save_state", crash_midway)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, tmp_path, 2, {"step": 2}, keep_last=1)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-1").iterdir()} == before


def test_leftovers_of_a_killed_write_are_ignored_and_cleaned(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / TRAINER_STATE_FILE).write_text("{}")
    (tmp_path / ".tmp-checkpoint-3-abc123").mkdir()  # what a SIGKILL during a write leaves
    (tmp_path / "checkpoint-x").mkdir()
    assert find_checkpoints(tmp_path) == [tmp_path / "checkpoint-2"]
    assert resolve_resume("latest", tmp_path) == tmp_path / "checkpoint-2"
    assert remove_unfinished_writes(tmp_path) == [tmp_path / ".tmp-checkpoint-3-abc123"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-x"]
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        resolve_resume(str(tmp_path / "checkpoint-x"), tmp_path)
