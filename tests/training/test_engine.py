"""The engine's loss is token-weighted over the whole global batch (transformers' ``num_items_in_batch``):
micro-batch size and the number of processes change neither the step losses nor the weights."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed

from mambavlm.data.collate import VLMCollator
from mambavlm.model import MambaVLM, build_model
from mambavlm.training import load_train_config, run_finetune
from mambavlm.training.finetune import training_dataset
from tests.conftest import ROOT, TINY_TRAIN, assert_same_weights, four_records, subprocess_env, tiny_vlm


def overrides(out: Path, train: Path, micro: int) -> list[str]:
    return [
        f"output_dir={out}", f"data={{train: {train}}}", "train.max_steps=3", "train.global_batch_size=4",
        f"train.micro_batch_size={micro}", "train.lr=3e-3", "train.warmup_ratio=0", "train.save_every=null",
        "train.weight_decay=0.1",
    ]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in MambaVLM.from_pretrained(out / "final").state_dict().items()}


def test_micro_batch_size_changes_neither_the_losses_nor_the_weights(tmp_path: Path) -> None:
    train = four_records(tmp_path / "data")
    runs = {micro: run_finetune(load_train_config(TINY_TRAIN, overrides(tmp_path / f"m{micro}", train, micro)))
            for micro in (4, 2, 1)}
    reference = runs[4]["step_losses"]
    assert len(reference) == 3 and reference[-1] < reference[0]
    for micro in (2, 1):
        # step 1 from the same weights to 1e-6; later steps carry the weights' float32 noise (seen 1.4e-6)
        assert runs[micro]["step_losses"][0] == pytest.approx(reference[0], rel=1e-6), micro
        assert runs[micro]["step_losses"] == pytest.approx(reference, rel=1e-5), micro
        assert_same_weights(final_weights(tmp_path / "m4"), final_weights(tmp_path / f"m{micro}"))

    # Step 1's loss, computed independently: every record alone (no padding), summed token losses over
    # all answer tokens of the global batch.
    config = load_train_config(TINY_TRAIN, overrides(tmp_path / "x", train, 4))
    set_seed(config.seed)
    model = build_model(config.model).eval()
    dataset = training_dataset(model, train, train.parent, None)
    total, count = 0.0, 0
    with torch.no_grad():
        for index in range(len(dataset)):
            batch = VLMCollator(model.tokenizer.pad_token_id)([dataset[index]])
            logits = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
            labels = batch["labels"][:, 1:]
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), reduction="sum").item()
            count += int((labels != -100).sum())
    assert count == 2 * (1 + 1) + 2 * (40 + 1)  # answers and their EOS
    assert reference[0] == pytest.approx(total / count, rel=1e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_one_process_losses_and_weights(tmp_path: Path) -> None:
    """Global batch 4: 1 process x micro 4 against 2 processes x micro 1 (2 accumulation steps each),
    where each process's records hold different numbers of answer tokens."""
    train = four_records(tmp_path / "data")
    run_finetune(load_train_config(TINY_TRAIN, overrides(tmp_path / "one", train, 4)))
    accelerate = Path(sys.executable).with_name("accelerate")
    env = subprocess_env(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    cmd = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "train" / "finetune.py"), "--config", str(TINY_TRAIN), *overrides(tmp_path / "two", train, 1),
    ]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert (two["num_processes"], two["gradient_accumulation_steps"]) == (2, 2)
    assert two["step_losses"][0] == pytest.approx(one["step_losses"][0], rel=1e-6)
    assert two["step_losses"] == pytest.approx(one["step_losses"], rel=1e-5)
    assert_same_weights(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"))


def test_cpu_threads_default_to_the_cores_each_process_may_use(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # accelerate launch leaves each CPU process OMP_NUM_THREADS=1 unless started with --cpu; the trainer
    # gives it the cores its affinity allows, shared among the processes, unless cpu_threads says otherwise.
    from mambavlm.training.engine import Trainer, cpu_thread_count

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    assert [cpu_thread_count(None, n) for n in (1, 2, 3, 8)] == [5, 2, 1, 1]
    assert cpu_thread_count(3, 2) == 3
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        Trainer(tmp_path / "a", cpu_threads=None)
        assert torch.get_num_threads() == 5
        Trainer(tmp_path / "b", cpu_threads=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="cpu_threads"):
        load_train_config(TINY_TRAIN, ["output_dir=x", "cpu_threads=0"])


def test_fp16_on_a_cpu_says_it_trains_in_float32(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """accelerate turns fp16 off on a CPU without a word (no autocast: the matmuls stay float32), while
    the run's train_config.yaml records fp16: a fresh user trained "in fp16" with float32's losses."""
    from accelerate.state import AcceleratorState

    from mambavlm.training.engine import Trainer

    caplog.set_level(logging.WARNING)
    AcceleratorState._reset_state(True)
    try:
        Trainer(tmp_path / "a", mixed_precision="fp16")
        assert "mixed_precision=fp16 has no effect on cpu: training in float32" in caplog.text
        AcceleratorState._reset_state(True)
        caplog.clear()
        Trainer(tmp_path / "b", mixed_precision="bf16")  # autocasts on a CPU: nothing to say
        assert "has no effect" not in caplog.text
    finally:
        AcceleratorState._reset_state(True)


def test_processes_that_did_not_join_one_group_refuse_to_train(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """configs/accelerate/ddp.yaml on a machine without GPUs: the launcher set WORLD_SIZE=8, but each
    process ran alone and repeated the whole run into the same output_dir."""
    from mambavlm.training.engine import Trainer

    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(RuntimeError, match="started 8 processes, but they did not join one process group"):
        Trainer(tmp_path / "a")
    monkeypatch.setenv("WORLD_SIZE", "1")
    Trainer(tmp_path / "b")


def test_a_fresh_start_says_so_when_there_is_nothing_to_resume(tmp_path: Path) -> None:
    """resume_from=latest finding no checkpoint starts from the beginning, and says so."""
    from mambavlm.training.engine import fresh_start_note

    assert fresh_start_note(None, tmp_path) is None
    assert "no checkpoint in" in fresh_start_note("latest", tmp_path)
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text("{}")
    assert fresh_start_note("latest", tmp_path) is None


def test_a_fresh_start_over_an_earlier_runs_checkpoints_is_refused(tmp_path: Path) -> None:
    """A new run in a used output_dir kept the earlier run's checkpoints (higher step numbers) and
    deleted its own as it wrote them; resume_from=latest then loaded the earlier run (a fresh user's
    trial: the README's LoRA example after its main job). Refused before anything is built; resuming
    and an empty directory are not."""
    from mambavlm.config import ConfigError
    from mambavlm.training.engine import Trainer, check_fresh_output_dir

    check_fresh_output_dir(None, tmp_path)
    for step in (1000, 1500):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    check_fresh_output_dir("latest", tmp_path)
    with pytest.raises(ConfigError, match=r"holds checkpoints of an earlier run \(checkpoint-1000, checkpoint-1500\): "
                       "resume_from=latest continues it"):
        Trainer(tmp_path)


@pytest.mark.parametrize("resume_from", [None, "latest"])
def test_a_fresh_start_over_a_finished_run_or_a_saved_model_is_refused(tmp_path: Path, resume_from: str | None) -> None:
    """A finished run without checkpoints (train.checkpoints=false) was overwritten by the next run into
    its output_dir, and a saved model's folder accepted as one (a fresh user's trial): refused when the
    run would start from the beginning (resume_from=latest finding no checkpoint does too)."""
    from mambavlm.config import ConfigError
    from mambavlm.training.engine import METRICS_FILE, check_fresh_output_dir

    finished, model = tmp_path / "run", tmp_path / "final"
    finished.mkdir()
    (finished / METRICS_FILE).write_text("{}")
    with pytest.raises(ConfigError, match=f"{finished} holds a finished run"):
        check_fresh_output_dir(resume_from, finished)
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=f"{model} is a saved model"):
        check_fresh_output_dir(resume_from, model)
    (finished / "checkpoint-5").mkdir()
    (finished / "checkpoint-5" / "trainer_state.json").write_text("{}")
    if resume_from == "latest":
        check_fresh_output_dir(resume_from, finished)  # continues its checkpoint


def test_structure_copy_takes_no_parameter_memory_and_load_whole_restores_the_module() -> None:
    """What a distillation run gathers its FSDP-sharded student into: a copy with its parameters on the
    meta device (requires_grad and the tied embedding kept, buffers real, the teacher left out),
    filled from the trained module's state dict: then equal to it tensor by tensor, the output
    embedding tied to the input one again, and the same logits."""
    from mambavlm.distill.convert import convert_llama
    from mambavlm.distill.stages import DistillationModule, set_trainable
    from mambavlm.training.engine import load_whole, structure_copy
    from tests.conftest import DISTILL_LLAMA, tiny_llama

    teacher = tiny_llama(**{**DISTILL_LLAMA, "tie_word_embeddings": True}).requires_grad_(False)
    student = convert_llama(teacher, "list:1", "matvlm", torch.Generator().manual_seed(0))
    set_trainable(student, "stage2")
    skeleton = DistillationModule(structure_copy(student), teacher)
    assert all(p.is_meta for p in skeleton.parameters())
    assert skeleton.teacher is teacher
    assert skeleton.student.lm_head.weight is skeleton.student.model.embed_tokens.weight
    assert [p.requires_grad for p in skeleton.parameters()] == [p.requires_grad for p in student.parameters()]
    assert all(not b.is_meta for b in skeleton.buffers())
    with torch.no_grad():
        for param in student.parameters():
            param.add_(torch.randn_like(param) * 0.01)  # "trained"
    whole = load_whole(skeleton, DistillationModule(student, teacher).state_dict()).student
    assert whole.lm_head.weight is whole.model.embed_tokens.weight
    for (name, got), want in zip(whole.state_dict().items(), student.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    ids = torch.arange(12).reshape(2, 6)
    torch.testing.assert_close(whole(ids).logits, student(ids).logits, rtol=0, atol=0)


def _root_unit_checks(rank: int, init_file: str, results: str) -> None:
    """One gloo process: FSDP (use_orig_params, each block its own unit) over a model whose root holds
    an embedding and a head outside the blocks; ``root_unit_trains`` as the trainable set changes."""
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from mambavlm.training.engine import root_unit_trains

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=1)

    class Block(nn.Sequential):
        pass

    model = nn.Sequential(nn.Linear(4, 4), Block(nn.Linear(4, 4)), Block(nn.Linear(4, 4)), nn.Linear(4, 2))
    model.requires_grad_(False)
    model[1].requires_grad_(True)
    wrapped = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=True, device_id=torch.device("cpu"))
    checks = [root_unit_trains(wrapped)]  # only a block trains
    model[3].bias.requires_grad_(True)
    checks.append(root_unit_trains(wrapped))  # the head's bias, held by the root unit
    checks.append(root_unit_trains(nn.Linear(2, 2).requires_grad_(False)))  # not FSDP
    Path(results).write_text(json.dumps(checks))
    dist.destroy_process_group()


def test_root_unit_trains_tells_a_frozen_fsdp_root_apart(tmp_path: Path) -> None:
    """The engine refuses FSDP on one process when the root unit trains nothing (PyTorch's FSDP loses
    such a root's parameters before the first checkpoint, seen on an H200): the check itself."""
    import torch.multiprocessing as mp

    results = tmp_path / "checks.json"
    mp.spawn(_root_unit_checks, args=(str(tmp_path / "init"), str(results)), nprocs=1)
    assert json.loads(results.read_text()) == [False, True, True]


def test_a_tracker_whose_package_is_missing_is_refused_with_the_pip_command(monkeypatch, tmp_path) -> None:
    """accelerate only warns and logs nothing; the run refuses to start instead."""
    import accelerate.utils

    from mambavlm.config import ConfigError
    from mambavlm.training.engine import TRACKER_PACKAGES, Trainer, check_trackers

    monkeypatch.setattr(accelerate.utils, "is_comet_ml_available", lambda: False)
    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: True)
    with pytest.raises(ConfigError, match=r"trackers: comet_ml not installed; pip install comet-ml"):
        Trainer(tmp_path, trackers=["wandb", "comet_ml"])
    check_trackers(["wandb"])
    assert all(hasattr(accelerate.utils, f"is_{name}_available") for name in TRACKER_PACKAGES)


def test_zero3_leaves_are_the_modules_that_read_their_submodules_weights() -> None:
    """Under ZeRO-3 these are gathered whole in their forward: the Mamba-2 mixer (conv and gated-norm
    weights as function arguments), transformers' Mamba mixer (mamba_inner_fn), the vision encoder
    (``forward_intermediates`` bypasses the backbone's own forward); not the blocks around them."""
    from mambavlm.distill.convert import convert_llama
    from mambavlm.training.engine import zero3_leaf
    from tests.conftest import DISTILL_LLAMA, tiny_llama

    assert {type(m).__name__ for m in tiny_vlm().modules() if zero3_leaf(m)} == {"VisionEncoder", "MambaMixer"}

    hybrid = convert_llama(tiny_llama(**DISTILL_LLAMA), "list:1", "matvlm", torch.Generator().manual_seed(0))
    assert {type(m).__name__ for m in hybrid.modules() if zero3_leaf(m)} == {"Mamba2Mixer"}


def test_a_lora_vlms_structure_copy_filled_with_its_weights_answers_as_it_does() -> None:
    """What fine-tuning gathers an FSDP / ZeRO-3 model into (no second build): the structure copy of a
    MambaVLM with LoRA adapters on the LLM and the projector, filled from the trained model's state dict,
    gives its logits and greedy answers (peft's wrappers, the vision encoders' buffers kept)."""
    from PIL import Image

    from mambavlm.training.config import LoraSettings
    from mambavlm.training.engine import load_whole, structure_copy
    from mambavlm.training.lora import apply_lora
    from tests.conftest import fixed_batch, tiny_vlm

    model = tiny_vlm()
    apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0, projector="lora"))
    skeleton = structure_copy(model)
    assert all(p.is_meta for p in skeleton.parameters())
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)  # "trained" adapters and projector
    whole = load_whole(skeleton, model.state_dict()).eval()
    batch = fixed_batch(model)
    with torch.no_grad():
        want = model(**batch).logits
        torch.testing.assert_close(whole(**batch).logits, want, rtol=0, atol=0)
    images = [Image.new("RGB", (40, 30), (230, 30, 30)), Image.new("RGB", (30, 40), (30, 30, 230))]
    prompts = ["what colour ?", "and this ?"]
    assert whole.answer(images, prompts, max_new_tokens=6) == model.answer(images, prompts, max_new_tokens=6)


def test_the_profile_tables_own_times_equal_pytorchs_key_averages() -> None:
    """``_own_time_table`` (one pass over the events) against PyTorch's ``key_averages`` on a small
    CPU workload: each operator's own CPU time and call count as PyTorch sums them; no device table
    without device events."""
    from mambavlm.training.engine import _own_time_table

    layer = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(3):
            layer(torch.randn(16, 32)).sum().backward()
    events = profiler.events()
    assert _own_time_table(events, device=True, rows=10) is None
    table = _own_time_table(events, device=False, rows=1000)
    ours = {}
    for line in table.splitlines()[2:]:
        ms, calls, _, name = (cell.strip() for cell in line.strip("|").split("|"))
        ours[name] = (float(ms), int(calls))
    theirs = {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in profiler.key_averages()}
    assert ours.keys() == theirs.keys()
    for name, (ms, calls) in theirs.items():
        assert ours[name][1] == calls, name
        assert ours[name][0] == pytest.approx(ms, abs=1.5e-3), name  # printed to the microsecond
    first = float(table.splitlines()[2].strip("|").split("|")[0])
    assert first == max(ms for ms, _ in ours.values())


def test_trainable_parameters_are_counted_at_their_full_size_when_sharded() -> None:
    """The phase log's count (and the multi-GPU benchmark's gradient bytes, read from it): ZeRO-3 empties
    a parameter's tensor on every process and FSDP (use_orig_params) leaves a view of the local shard,
    so ``numel()`` then says 0 or a part; the sizes taken before wrapping give the whole, and only the
    trainable parameters count. Emulated here by shrinking the tensors as those wrappers do."""
    from mambavlm.training.engine import trainable_parameter_count

    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 3))
    model[1].bias.requires_grad_(False)
    sizes = {id(p): p.numel() for p in model.parameters()}
    want = 6 * 4 + 4 + 4 * 3  # by hand: the first layer's weight and bias, the second's weight
    assert trainable_parameter_count(model, sizes) == want
    model[0].weight.data = torch.empty(0)  # ZeRO-3: partitioned away
    model[1].weight.data = model[1].weight.data.flatten()[:5]  # FSDP: this process's part
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4 + 5  # what the log said
    assert trainable_parameter_count(model, sizes) == want
    extra = torch.nn.Parameter(torch.zeros(7))  # a parameter added after the sizes were taken
    model.register_parameter("extra", extra)
    assert trainable_parameter_count(model, sizes) == want + 7


def test_log_lines_label_each_step_with_the_1_based_epoch_it_belongs_to(tmp_path: Path, caplog) -> None:
    """With epochs: 3 the last line read "epoch 3" while a mid-epoch one read "epoch 0" (state.epoch,
    advanced at the end of an epoch before the line). By hand: 4 records, 2 per step -> 2 steps per
    epoch, 6 steps; step 2 (the end of epoch 1) is epoch 1/3, step 3 (the start of the next) 2/3."""
    train = four_records(tmp_path / "data")
    config = load_train_config(TINY_TRAIN, [
        f"output_dir={tmp_path / 'out'}", f"data={{train: {train}}}", "train.max_steps=null", "train.epochs=3",
        "train.global_batch_size=2", "train.micro_batch_size=2", "train.warmup_ratio=0", "train.save_every=null",
        "train.log_every=1",
    ])
    with caplog.at_level("INFO"):
        run_finetune(config)
    labels = {}
    for record in caplog.records:
        if match := re.search(r"finetune step (\d+)/6 \| epoch (\S+) \|", record.getMessage()):
            labels[int(match[1])] = match[2]
    assert labels == {1: "1/3", 2: "1/3", 3: "2/3", 4: "2/3", 5: "3/3", 6: "3/3"}


def test_a_stop_signal_repeated_within_the_duplicate_window_is_one_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """accelerate launch passes a group's SIGTERM on to its training process, which then gets it twice: inside
    ``stop_signals_caught`` the first SIGTERM is recorded, the same again at once is a duplicate (neither
    recorded nor acted on), and one after DUPLICATE_SIGNAL_S runs the handler it replaced (the default would
    end the process); on exit that handler is back."""
    from mambavlm.training import engine

    calls: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        received: list[int] = []
        with engine.stop_signals_caught(received):
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            assert received == [signal.SIGTERM] and calls == []
            monkeypatch.setattr(engine, "DUPLICATE_SIGNAL_S", 0.0)
            time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGTERM)
            assert received == [signal.SIGTERM] and calls == [signal.SIGTERM]
        os.kill(os.getpid(), signal.SIGTERM)
        assert calls == [signal.SIGTERM, signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, before)
