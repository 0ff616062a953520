"""Checkpoints: the last k kept, a crash inside a write leaves none, leftovers of a killed write ignored
and cleaned, resume paths resolved."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from mambavlm.training import find_checkpoints, save_checkpoint
from mambavlm.config import ConfigError
from mambavlm.training.checkpoint import (
    TRAINER_STATE_FILE,
    load_checkpoint,
    remove_unfinished_writes,
    resolve_resume,
)

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
    with pytest.raises(FileNotFoundError, match=r"^resume_from='.*checkpoint-x' is not a checkpoint directory"):
        resolve_resume(str(tmp_path / "checkpoint-x"), tmp_path)
    # named by the key a train config writes it under (a distill config's is top-level)
    with pytest.raises(FileNotFoundError, match=r"^train.resume_from='.*checkpoint-x' is not a checkpoint directory"):
        resolve_resume(str(tmp_path / "checkpoint-x"), tmp_path, "train.resume_from")


def test_a_checkpoint_that_does_not_exist_is_named_with_the_checkpoints_there_are(tmp_path) -> None:
    """An explicit resume_from whose directory is gone (keep_last deleted the checkpoint a stop line named)
    said it was 'not a checkpoint directory (no trainer_state.json)': now that it does not exist, and which
    checkpoints output_dir holds."""
    for step in (140, 160):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / TRAINER_STATE_FILE).write_text("{}")
    with pytest.raises(FileNotFoundError) as info:
        resolve_resume(str(tmp_path / "checkpoint-54"), tmp_path)
    assert str(info.value) == (f"resume_from={str(tmp_path / 'checkpoint-54')!r} does not exist; {tmp_path} holds "
                               "checkpoint-140, checkpoint-160 (resume_from=latest takes the newest)")
    with pytest.raises(FileNotFoundError, match=r"^train.resume_from='.*' does not exist; .* holds no checkpoint$"):
        resolve_resume(str(tmp_path / "checkpoint-54"), tmp_path / "empty", "train.resume_from")


def test_a_checkpoint_of_another_model_is_one_config_error_naming_it_and_the_mismatch(tmp_path) -> None:
    """Resuming another model's checkpoint ended in load_state_dict's multi-line RuntimeError."""
    saver = Accelerator()
    saver.prepare(nn.Linear(3, 2))
    saver.save_state(str(tmp_path / "checkpoint-1"))
    (tmp_path / "checkpoint-1" / TRAINER_STATE_FILE).write_text("{}")
    loader = Accelerator()
    loader.prepare(nn.Linear(3, 5))
    with pytest.raises(ConfigError, match=(
        rf"^{tmp_path / 'checkpoint-1'} does not fit this run's model \(size mismatch for weight: copying a param "
        r"with shape torch.Size\(\[2, 3\]\) from checkpoint, the shape in current model is torch.Size\(\[5, 3\]\)\.; "
        r"size mismatch for bias: .*\): a checkpoint resumes only the model it was saved from$"
    )):
        load_checkpoint(loader, tmp_path / "checkpoint-1")


def _fsdp_optimizer_round_trip(rank: int, world: int, init_file: str, out_dir: str, initialize: bool) -> None:
    """Rank ``rank`` of a 2-process gloo group: FSDP (use_orig_params, each Linear its own unit, sharded
    state dicts: configs/accelerate/fsdp.yaml's choices) on the CPU, three AdamW steps, the optimiser
    saved and loaded into a fresh one through accelerate's own FSDP functions; writes both states."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from accelerate import PartialState
    from accelerate.utils import load_fsdp_optimizer, save_fsdp_optimizer
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import (
        ShardedOptimStateDictConfig,
        ShardedStateDictConfig,
        StateDictType,
    )
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from mambavlm.training.checkpoint import initialize_optimizer_state

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    PartialState()  # accelerate's logging needs its state
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    model[0].bias.requires_grad_(False)  # frozen and trainable parameters in one unit
    model = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({nn.Linear}), use_orig_params=True,
                 device_id=torch.device("cpu"))
    plugin = SimpleNamespace(fsdp_version=1, state_dict_type=StateDictType.SHARDED_STATE_DICT,
                             state_dict_config=ShardedStateDictConfig(),
                             optim_state_dict_config=ShardedOptimStateDictConfig())
    accelerator = SimpleNamespace(process_index=rank, wait_for_everyone=dist.barrier)

    def adamw() -> torch.optim.AdamW:
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)

    trained = adamw()
    for step in range(3):
        model(torch.randn(4, 5, generator=torch.Generator().manual_seed(10 * rank + step))).square().sum().backward()
        trained.step()
        trained.zero_grad()
    save_fsdp_optimizer(plugin, accelerator, trained, model, out_dir)
    weights = [p.detach().clone() for p in model.parameters()]
    fresh = adamw()
    if initialize:
        initialize_optimizer_state(fresh)
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
        assert all(p.grad is None for p in model.parameters())
    load_fsdp_optimizer(plugin, accelerator, fresh, model, out_dir)
    torch.save({"trained": trained.state_dict(), "loaded": fresh.state_dict()}, f"{out_dir}/rank{rank}.pt")
    dist.barrier()  # no rank closes its connections while another still uses them
    dist.destroy_process_group()


@pytest.mark.parametrize("initialize", [True, False], ids=["initialized", "fresh"])
def test_fsdp_sharded_optimizer_checkpoint_restores_the_moments(tmp_path, initialize: bool) -> None:
    """accelerate loads an FSDP optimiser checkpoint into the optimiser's own state as template: a fresh
    AdamW gets only its hyper-parameters back (the resumed 2-GPU FSDP run diverged from its second
    step); ``initialize_optimizer_state`` first (as ``load_checkpoint`` does under FSDP) restores
    every step count and moment exactly. 2 CPU processes (gloo)."""
    import torch.multiprocessing as mp

    mp.spawn(_fsdp_optimizer_round_trip, args=(2, str(tmp_path / "init"), str(tmp_path), initialize), nprocs=2)
    for rank in range(2):
        states = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        trained, loaded = states["trained"]["state"], states["loaded"]["state"]
        assert trained  # each rank holds the moments of its shards
        if not initialize:
            assert loaded == {}
            continue
        assert loaded.keys() == trained.keys()
        for index, state in trained.items():
            assert float(loaded[index]["step"]) == float(state["step"]) == 3.0
            for key in ("exp_avg", "exp_avg_sq"):
                assert state[key].abs().sum() > 0 or state[key].numel() == 0
                torch.testing.assert_close(loaded[index][key], state[key], rtol=0, atol=0)


def test_a_second_run_in_an_output_dir_another_process_writes_is_refused_naming_it(tmp_path):
    """Two runs in one output_dir at once (a second launch, or the training process that a stopped
    `accelerate launch` leaves running) had both started, each overwriting the other's checkpoints: the
    second is now a ConfigError naming the first's process; once that process is killed the directory is
    free again, and the lock writes nothing into it."""
    import subprocess
    import sys

    from mambavlm.training.engine import Trainer
    from tests.conftest import subprocess_env

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from mambavlm.training.engine import Trainer; "
         f"Trainer({str(out)!r}); print('ready', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env=subprocess_env(),
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(ConfigError, match=rf"^{out} is being written by another run \(pid {holder.pid}: "):
            Trainer(out)
    finally:
        holder.kill()
        holder.wait()
    trainer = Trainer(out, resume_from="latest")  # the killed holder's lock went with it
    Trainer(out, resume_from="latest")  # this process holds it: a second trainer of its own is let through
    assert list(out.iterdir()) == []
    trainer.end()
    from mambavlm.training.checkpoint import release_output_dir

    release_output_dir(out)


def test_a_checkpoint_is_one_log_line_naming_where_it_is(tmp_path, prepared_accelerator, caplog):
    """accelerate's save_state wrote six INFO lines per checkpoint, each naming the temporary directory
    (gone once renamed into place): the log now holds the one line naming the checkpoint; accelerate's
    loggers keep their level after it."""
    import logging

    accelerator, _ = prepared_accelerator
    before = [logging.getLogger(name).level for name in ("accelerate.accelerator", "accelerate.checkpointing")]
    with caplog.at_level(logging.INFO):
        save_checkpoint(accelerator, tmp_path, 1, {"step": 1}, keep_last=2)
    assert [r.getMessage() for r in caplog.records if str(tmp_path) in r.getMessage()] == [
        f"[RANK 0] saved {tmp_path / 'checkpoint-1'}"]
    assert [logging.getLogger(name).level for name in ("accelerate.accelerator", "accelerate.checkpointing")] == before
