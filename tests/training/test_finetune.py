"""Fine-tuning end to end on the tiny config: the loss falls, outputs and checkpoints are written,
resume repeats the losses, gradient checkpointing, skipped records, 2 processes = 1, and
eval/evaluate.py reproduces the trainer's answers."""

from __future__ import annotations

import importlib.util
import json
import fcntl
import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import pytest
import transformers

from mambavlm.config import ConfigError
from mambavlm.data.synthetic import make_shapes_vqa
from mambavlm.model import MambaVLM
from mambavlm.training import Trainer, TrainingStopped, find_checkpoints, load_train_config, run_finetune
from mambavlm.training.checkpoint import TRAINER_STATE_FILE
from tests.conftest import ROOT, TINY_TRAIN, subprocess_env

pytestmark = pytest.mark.usefixtures("on_cpu")


# A few-second run: 48 synthetic records, 8 per step, 6 steps.
MICRO_RUN = [
    "data.synthetic.num_train=48",
    "data.synthetic.num_val=12",
    "train.max_steps=6",
    "train.global_batch_size=8",
    "train.micro_batch_size=4",
    "train.lr=3e-3",
    "train.warmup_ratio=0",
    "train.log_every=2",
    "train.save_every=3",
    "train.keep_last=5",
    "train.eval_batch_size=6",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def micro_config(output_dir: Path, *overrides: str):
    return load_train_config(TINY_TRAIN, [f"output_dir={output_dir}", *MICRO_RUN, *overrides])


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory) -> Path:
    """One uninterrupted 6-step run (checkpoints at steps 3 and 6), shared by several tests."""
    out = tmp_path_factory.mktemp("micro_run")
    run_finetune(micro_config(out))
    return out


def read_metrics(output_dir: Path) -> dict:
    return json.loads((output_dir / "metrics.json").read_text())


def test_short_run_learns_and_writes_its_outputs(micro_run):
    metrics = read_metrics(micro_run)
    losses = metrics["step_losses"]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) / 2 < 0.7 * sum(losses[:2]) / 2
    assert metrics["num_skipped"] == 0 and metrics["steps"] == 6
    assert metrics["val_num_items"] == 12 and 0.0 <= metrics["val_accuracy"] <= 1.0
    assert metrics["config"]["train"]["max_steps"] == 6
    throughput = metrics["throughput"]  # steps 2-6 timed (the first is the warm-up), 8 samples each
    assert (throughput["phase"], throughput["timed_steps"], throughput["samples"]) == ("finetune", 5, 40)
    assert throughput["tokens_per_s"] == pytest.approx(throughput["tokens"] / throughput["seconds"])
    assert throughput["tokens"] > 40 * 8 and throughput["peak_memory_gib"] is None  # no CUDA here
    assert [p.name for p in find_checkpoints(micro_run)] == ["checkpoint-3", "checkpoint-6"]
    state = json.loads((micro_run / "checkpoint-3" / TRAINER_STATE_FILE).read_text())
    assert (state["step"], state["global_step"], state["phase_losses"]) == (3, 3, [losses[:3]])
    reloaded = MambaVLM.from_pretrained(micro_run / "final")
    assert reloaded.config.spec == micro_config(micro_run).model


def test_resume_repeats_the_uninterrupted_losses(micro_run, tmp_path):
    """Resume from the step-3 checkpoint of the 6-step run: steps 4-6 must log the same losses."""
    config = micro_config(tmp_path, f"train.resume_from={micro_run / 'checkpoint-3'}")
    run_finetune(config)
    resumed, uninterrupted = read_metrics(tmp_path)["step_losses"], read_metrics(micro_run)["step_losses"]
    assert resumed == uninterrupted  # bit-exact on CPU
    # steps 2-3 timed before the checkpoint, 5-6 after the resume (step 4 warms the new start up)
    assert read_metrics(tmp_path)["throughput"]["timed_steps"] == 4



def test_resume_latest_on_a_finished_run_says_so_and_leaves_its_results(micro_run, tmp_path, caplog):
    """train.resume_from=latest on a run that had finished evaluated it again and overwrote metrics.json
    (its wall_seconds became the rerun's) and val_answers.jsonl: now it logs one line naming the final
    model, returns the recorded metrics and writes nothing."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(micro_run, out)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    with caplog.at_level("INFO"):
        assert run_finetune(micro_config(out, "train.resume_from=latest")) == read_metrics(micro_run)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == before
    [line] = [r.getMessage() for r in caplog.records]
    assert line.endswith(f"train.resume_from=latest: {out} holds a finished run of this config, nothing to resume: "
                         f"its model is {out / 'final'}, its results {out / 'metrics.json'} (left as they are)")


def test_a_run_is_finished_only_for_resume_latest_with_its_config_and_its_model(micro_run):
    """Another config (more steps: the run resumes from its latest checkpoint and trains them), no
    resume_from, or no final model where the config puts it (a LoRA run's final_adapter/): not finished."""
    from mambavlm.training.engine import finished_run_metrics

    same = micro_config(micro_run).model_dump(mode="json")
    assert finished_run_metrics(micro_run, "latest", "train.resume_from", same, micro_run / "final") == read_metrics(
        micro_run)
    longer = micro_config(micro_run, "train.max_steps=8").model_dump(mode="json")
    assert finished_run_metrics(micro_run, "latest", "train.resume_from", longer, micro_run / "final") is None
    assert finished_run_metrics(micro_run, None, "train.resume_from", same, micro_run / "final") is None
    assert finished_run_metrics(micro_run, "latest", "train.resume_from", same, micro_run / "final_adapter") is None


def signal_at_micro_batch(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """The process sends itself SIGTERM as its ``call``-th micro-batch (1-based) starts: a scheduler's
    preemption arriving in the middle of a step."""
    calls = [0]
    micro_step = Trainer._micro_step

    def signalled(self, *args):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return micro_step(self, *args)

    monkeypatch.setattr(Trainer, "_micro_step", signalled)


def test_a_sigterm_ends_the_step_writes_its_checkpoint_and_the_resume_repeats_the_losses(micro_run, tmp_path,
                                                                                          monkeypatch):
    """SIGTERM during step 2's first micro-batch (2 per step): step 2 finishes, checkpoint-2 is written
    (save_every is 3), TrainingStopped says so with exit code 143, the handler before the run is back and
    output_dir is free (another process can lock it); resuming from latest gives the uninterrupted run's
    six losses, bit for bit."""
    before = signal.getsignal(signal.SIGTERM)
    signal_at_micro_batch(monkeypatch, 3)
    with pytest.raises(TrainingStopped) as stopped:
        run_finetune(micro_config(tmp_path, "data.synthetic.num_val=0"))
    err = stopped.value
    assert (err.signal_name, err.step, err.checkpoint, err.exit_code) == ("SIGTERM", 2, tmp_path / "checkpoint-2", 143)
    assert str(err) == f"stopped by SIGTERM after step 2: its checkpoint is {tmp_path / 'checkpoint-2'}"
    assert signal.getsignal(signal.SIGTERM) is before
    assert find_checkpoints(tmp_path) == [tmp_path / "checkpoint-2"] and not (tmp_path / "final").exists()
    assert json.loads((tmp_path / "checkpoint-2" / TRAINER_STATE_FILE).read_text())["step"] == 2
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError while the run holds it
    finally:
        os.close(fd)
    monkeypatch.undo()
    run_finetune(micro_config(tmp_path, "data.synthetic.num_val=0", "train.resume_from=latest"))
    assert read_metrics(tmp_path)["step_losses"] == read_metrics(micro_run)["step_losses"]


def test_a_sigterm_in_a_checkpoints_step_writes_it_once_and_without_checkpoints_none(tmp_path, monkeypatch):
    """In step 3 (a save_every step) the stop keeps that step's checkpoint, written once; with
    checkpoints off the run stops with none and says so."""
    signal_at_micro_batch(monkeypatch, 5)
    saves = []
    save = Trainer._save
    monkeypatch.setattr(Trainer, "_save", lambda self, state: saves.append(state.global_step) or save(self, state))
    with pytest.raises(TrainingStopped, match=r"after step 3: its checkpoint is .*checkpoint-3$"):
        run_finetune(micro_config(tmp_path / "saving", "data.synthetic.num_val=0"))
    assert saves == [3] and find_checkpoints(tmp_path / "saving") == [tmp_path / "saving" / "checkpoint-3"]
    signal_at_micro_batch(monkeypatch, 1)
    with pytest.raises(TrainingStopped, match=r"^stopped by SIGTERM after step 1: no checkpoint \(checkpoints are off\)$"):
        run_finetune(micro_config(tmp_path / "none", "data.synthetic.num_val=0", "train.checkpoints=false"))
    assert not list((tmp_path / "none").glob("*checkpoint*")) and saves == [3]


def test_killing_the_process_group_stops_the_run_with_a_checkpoint_and_one_line(tmp_path):
    """train/finetune.py with a DataLoader worker, stopped as the README says (SIGTERM to its process
    group, the worker included) once it has logged step 2 of 1000: it exits 143 with one line naming the
    step, its checkpoint and how to resume; no traceback, and the worker did not die under the step."""
    cmd = [sys.executable, str(ROOT / "train" / "finetune.py"), "--config", str(TINY_TRAIN), f"output_dir={tmp_path}",
           *MICRO_RUN, "train.max_steps=1000", "data.num_workers=1", "data.synthetic.num_val=0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS="1"), stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, start_new_session=True)
    lines, logged_step_2 = [], threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "finetune step 2/1000" in line:
                logged_step_2.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert logged_step_2.wait(timeout=300), "".join(lines)[-3000:]
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=120)  # a worker left ignoring SIGTERM would hang multiprocessing's exit
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(timeout=30)
    log = "".join(lines)
    assert code == 143, log[-3000:]
    [checkpoint] = find_checkpoints(tmp_path)
    step = int(checkpoint.name.split("-")[1])
    assert 2 <= step < 1000
    assert lines[-1] == (f"stopped by SIGTERM after step {step}: its checkpoint is {checkpoint}; "
                         "resume with train.resume_from=latest\n")
    assert "Traceback" not in log and "DataLoader worker" not in log, log[-3000:]


def test_resume_with_another_lr_warns_and_keeps_the_checkpoints(micro_run, tmp_path, caplog):
    """Resumed with another lr: the warning says the checkpoint's lr is kept, and it is (its optimiser
    and scheduler are restored): steps 4-6 repeat the uninterrupted losses."""
    config = micro_config(tmp_path, f"train.resume_from={micro_run / 'checkpoint-3'}", "train.lr=0.5")
    with caplog.at_level("INFO"):
        run_finetune(config)
    warning = " ".join(r.getMessage() for r in caplog.records if "settings other than its own" in r.getMessage())
    assert "lr 0.003 -> 0.5 (the checkpoint's is kept: the optimiser and scheduler are restored)" in warning
    phase_line = next(r.getMessage() for r in caplog.records if "resuming at step" in r.getMessage())
    assert "lr 0.003," in phase_line  # the lr that runs, not the config's (a fresh user's trial)
    assert any(r.getMessage().endswith(f"saved {tmp_path / 'checkpoint-6'}") for r in caplog.records)
    assert "max_grad_norm" not in warning and "total_steps" not in warning
    assert read_metrics(tmp_path)["step_losses"] == read_metrics(micro_run)["step_losses"]
    # progress in the log lines (no bar outside a terminal): the last step has nothing left
    assert any(re.search(r"finetune step 6/6 \| .* \| elapsed \d+s, eta 0s$", r.getMessage()) for r in caplog.records)


def test_resume_with_other_training_data_warns_that_the_batches_differ(micro_run, tmp_path, caplog):
    """The checkpoint records how many records it was trained on: a resume over another count (here 56
    synthetic records for 48) says so, where it had continued silently with other batches than the
    checkpoint's run would have seen; the same data resumes without that warning."""
    assert json.loads((micro_run / "checkpoint-3" / TRAINER_STATE_FILE).read_text())["num_records"] == 48
    resumed = f"train.resume_from={micro_run / 'checkpoint-3'}"
    with caplog.at_level("WARNING"):
        run_finetune(micro_config(tmp_path / "same", resumed))
        assert not [r for r in caplog.records if "other training data" in r.getMessage()]
        run_finetune(micro_config(tmp_path / "more", resumed, "data.synthetic.num_train=56"))
    [warning] = [r.getMessage() for r in caplog.records if "other training data" in r.getMessage()]
    assert warning.endswith(f"resuming from {micro_run / 'checkpoint-3'} with other training data: 48 records then, 56 "
                            "now; the position in the epoch is kept by count, the records it reaches differ")


def test_durations_in_log_lines_read_as_a_person_writes_them():
    from mambavlm.progress import format_duration

    assert [format_duration(s) for s in (0.4, 42, 59.6, 61, 271, 3599, 3600, 7500)] == [
        "0s", "42s", "1m00s", "1m01s", "4m31s", "59m59s", "1h00m", "2h05m"]


def test_resuming_with_another_model_names_the_changes_before_building(micro_run, tmp_path):
    """A fresh user's resume with another projector ended in load_state_dict's size mismatch: now a
    ConfigError naming each changed setting, saved -> now."""
    config = micro_config(tmp_path, f"train.resume_from={micro_run / 'checkpoint-3'}", "model.projector.d_state=4",
                          "lora={r: 4}")
    with pytest.raises(ConfigError) as error:
        run_finetune(config)
    message = str(error.value)
    assert message.startswith(f"train.resume_from: {micro_run / 'checkpoint-3'} was saved by a run with another model (")
    assert "lora: None -> {" in message and "'r': 4" in message and "model.projector.d_state: 8 -> 4" in message
    assert not (tmp_path / "train_config.yaml").exists()
    from mambavlm.training.checkpoint import check_resumed_architecture

    saved = micro_config(micro_run).model_dump(mode="json")
    moved = micro_config(micro_run, "model.vision.encoders.0.weights=/elsewhere/dinov2.safetensors").model_dump(mode="json")
    check_resumed_architecture(micro_run / "checkpoint-3", "train_config.yaml", moved, ("model",), "train.resume_from")
    assert saved["model"] != moved["model"]  # only where the weights came from differs: no error


def test_changed_settings_note_names_each_change_and_its_effect():
    from mambavlm.training.engine import changed_settings_note

    saved = {"lr": 1e-3, "betas": [0.9, 0.999], "total_steps": 6, "max_grad_norm": 1.0}
    assert changed_settings_note(saved, dict(saved)) is None
    note = changed_settings_note(saved, {**saved, "total_steps": 10, "max_grad_norm": None, "betas": [0.9, 0.95]})
    assert note == ("betas [0.9, 0.999] -> [0.9, 0.95] (the checkpoint's is kept: the optimiser and scheduler are "
                    "restored); total_steps (from max_steps, or epochs x steps per epoch) 6 -> 10 (the new value "
                    "applies from the resumed step); max_grad_norm 1.0 -> None (the new value applies from the "
                    "resumed step)")
    assert changed_settings_note({}, saved) is None  # a checkpoint from before settings were recorded


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, monkeypatch):
    overrides = ["train.max_steps=3", "train.save_every=null", "data.synthetic.num_val=0"]
    run_finetune(micro_config(tmp_path / "plain", *overrides))
    calls = []
    checkpoint = transformers.modeling_utils.checkpoint

    def counted_checkpoint(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counted_checkpoint)
    with warnings.catch_warnings():  # transformers 5.24 deprecates gradient_checkpointing_enable: not called
        warnings.filterwarnings("error", message=".*checkpointing_enable.* deprecated", category=FutureWarning)
        run_finetune(micro_config(tmp_path / "ckpt", *overrides, "train.gradient_checkpointing=true"))
    assert calls, "the LLM layers were not checkpointed"
    plain, recomputed = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "ckpt")
    assert recomputed["step_losses"] == pytest.approx(plain["step_losses"], rel=1e-6)


def test_skipped_records_are_counted_not_fatal(tmp_path):
    data = tmp_path / "data"
    train_json, _ = make_shapes_vqa(data, num_train=16, num_val=0, image_size=32)
    records = json.loads(train_json.read_text())
    records[0]["image"] = "images/missing.png"
    records[1]["conversations"] = records[1]["conversations"][:1]  # no assistant turn
    (data / "images" / Path(records[2]["image"]).name).write_bytes(b"not a png")
    train_json.write_text(json.dumps(records))
    config = micro_config(
        tmp_path / "run", f"data.train={train_json}", "train.max_steps=2", "train.save_every=null"
    )
    run_finetune(config)
    metrics = read_metrics(tmp_path / "run")
    assert metrics["num_skipped"] == 3 and len(metrics["step_losses"]) == 2
    assert metrics["val_accuracy"] is None


def test_micro_batches_with_every_record_skipped_keep_training(tmp_path):
    """15 of 16 records lack an answer: most micro-batches are empty and run a zero-loss stand-in."""
    data = tmp_path / "data"
    train_json, _ = make_shapes_vqa(data, num_train=16, num_val=0, image_size=48)
    records = json.loads(train_json.read_text())
    for record in records[1:]:
        record["conversations"] = record["conversations"][:1]
    train_json.write_text(json.dumps(records))
    config = micro_config(
        tmp_path / "run", f"data.train={train_json}", "train.max_steps=2", "train.save_every=null"
    )
    run_finetune(config)
    metrics = read_metrics(tmp_path / "run")
    assert metrics["num_skipped"] == 15
    # the step holding the one good record has its loss; the other step had nothing to learn from
    assert sorted(loss is None for loss in metrics["step_losses"]) == [False, True]


def test_two_processes_match_one_process(tmp_path):
    """Same global batch (16) on 1 process x 4 accumulation steps and on 2 processes x 2, the 2-process
    gradients reduced after every micro-batch (``train.sync_each_batch``); the default, once per step (DDP's
    no_sync over the first micro-batch), is test_engine's two-process test (losses and weights)."""
    common = [*MICRO_RUN, "train.max_steps=3", "train.global_batch_size=16", "train.save_every=null",
              "data.synthetic.num_val=0"]
    one = tmp_path / "one"
    run_finetune(load_train_config(TINY_TRAIN, [f"output_dir={one}", *common]))
    two = tmp_path / "two"
    # `accelerate launch --cpu` starts one process unless given an MPI hostfile; the torchrun launcher
    # (--multi_gpu) with ACCELERATE_USE_CPU starts two CPU processes that talk through gloo.
    result = launch_two_processes(f"output_dir={two}", *common, "train.sync_each_batch=true")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    m1, m2 = read_metrics(one), read_metrics(two)
    assert (m1["num_processes"], m1["gradient_accumulation_steps"]) == (1, 4)
    assert (m2["num_processes"], m2["gradient_accumulation_steps"]) == (2, 2)
    assert m2["config"]["train"]["sync_each_batch"] is True
    assert m2["step_losses"] == pytest.approx(m1["step_losses"], rel=1e-5)  # seen: <= 6e-8
    # the timed steps' samples and tokens are counted over both processes: the same global batches
    for key in ("timed_steps", "samples", "tokens"):
        assert m2["throughput"][key] == m1["throughput"][key], key


def test_a_profiled_step_writes_its_operator_tables_and_trace_and_is_not_timed(tmp_path):
    """train.profile_step=2 of 3: step-2-rank-0.txt lists the operators (the model's matrix products
    among them) and step-2-rank-0.json is a Chrome trace; the losses are those of an unprofiled run, and
    only step 3 is timed (step 1 never is, step 2 was slowed by the profiler)."""
    common = ["train.max_steps=3", "train.save_every=null", "data.synthetic.num_val=0"]
    plain, profiled = tmp_path / "plain", tmp_path / "profiled"
    run_finetune(micro_config(plain, *common))
    run_finetune(micro_config(profiled, *common, "train.profile_step=2"))
    assert sorted(p.name for p in (profiled / "profile").iterdir()) == ["step-2-rank-0.json", "step-2-rank-0.txt"]
    table = (profiled / "profile" / "step-2-rank-0.txt").read_text()
    assert "step 2, process 0: operators by their own CPU time" in table
    assert "aten::mm" in table or "aten::addmm" in table
    # every micro-batch of the step, timed, and only the last reduces gradients (accumulation's no_sync)
    config = micro_config(profiled)
    accumulation = config.train.global_batch_size // config.train.micro_batch_size
    rows = [line for line in table.splitlines() if line.startswith("| ") and ("reduced" in line or "no_sync" in line)]
    kinds = [row.split("|")[2].strip() for row in rows]
    assert kinds[-1] == "reduced" and set(kinds[:-1]) <= {"accumulated (no_sync)"}, table
    assert len(rows) == accumulation >= 2, table
    assert all(float(row.split("|")[3]) > 0 for row in rows)
    trace = json.loads((profiled / "profile" / "step-2-rank-0.json").read_text())
    assert any(event.get("name", "").startswith("aten::") for event in trace["traceEvents"])
    assert read_metrics(profiled)["step_losses"] == pytest.approx(read_metrics(plain)["step_losses"], rel=1e-6)
    assert read_metrics(plain)["throughput"]["timed_steps"] == 2
    assert read_metrics(profiled)["throughput"]["timed_steps"] == 1
    assert not (plain / "profile").exists()


def launch_two_processes(*overrides: str, script: Path = ROOT / "train" / "finetune.py") -> subprocess.CompletedProcess:
    """``script`` (train/finetune.py) on 2 CPU processes (gloo) with the tiny train config and ``overrides``."""
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
        str(script), "--config", str(TINY_TRAIN), *overrides,
    ]
    env = subprocess_env(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


SIGNALLED_RANK_1 = textwrap.dedent(
    """
    import os, runpy, signal, sys
    from mambavlm.training import Trainer

    calls, micro_step = [0], Trainer._micro_step

    def signalled(self, *args):  # rank 1 alone receives SIGTERM as step 2 (one micro-batch per step) starts
        calls[0] += 1
        if calls[0] == 2 and self.accelerator.process_index == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return micro_step(self, *args)

    Trainer._micro_step = signalled
    sys.argv[0] = FINETUNE
    runpy.run_path(FINETUNE, run_name="__main__")
    """
)


def test_two_process_run_stopped_on_one_rank_resumes_exactly_and_refuses_another_layout(micro_run, tmp_path):
    """2 processes, 6 steps. A SIGTERM to rank 1 alone during step 2 stops both ranks after step 2 (the
    flag rides in the step's reduction), each saying why, with checkpoint-2 holding both ranks' RNG
    states; resumed from it on 2 processes, the run repeats the uninterrupted losses (those of the
    1-process run: 2 processes give them within 6e-8, test_two_processes_match_one_process); resuming
    it on 1 process is refused, naming the change."""
    common = [*MICRO_RUN, "data.synthetic.num_val=0"]
    out = tmp_path / "run"
    script = tmp_path / "signalled.py"
    script.write_text(SIGNALLED_RANK_1.replace("FINETUNE", repr(str(ROOT / "train" / "finetune.py"))))
    result = launch_two_processes(f"output_dir={out}", *common, script=script)
    log = result.stdout + result.stderr
    assert result.returncode != 0
    checkpoint = out / "checkpoint-2"
    hint = "; resume with train.resume_from=latest"
    assert f"stopped by SIGTERM after step 2: its checkpoint is {checkpoint}{hint}" in log, log[-3000:]
    assert f"stopped by another process's signal after step 2: its checkpoint is {checkpoint}{hint}" in log
    assert find_checkpoints(out) == [checkpoint]
    assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    result = launch_two_processes(f"output_dir={out}", *common, "train.resume_from=latest")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert read_metrics(out)["step_losses"] == pytest.approx(read_metrics(micro_run)["step_losses"], rel=1e-6)
    with pytest.raises(ConfigError, match=r"batch layout changed \(num_processes: 2 -> 1\)"):
        run_finetune(micro_config(tmp_path / "one", "data.synthetic.num_val=0",
                                  f"train.resume_from={out / 'checkpoint-3'}"))


# --- eval/evaluate.py -----------------------------------------------------------------------------


def test_evaluate_script_reproduces_the_trainers_val_answers(micro_run, tmp_path):
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "eval" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    out = tmp_path / "answers.jsonl"
    accuracy = evaluate.main(
        ["--model", str(micro_run), "--data", str(micro_run / "data" / "val.json"), "--out", str(out),
         "--batch-size", "6", "--max-new-tokens", "4"]
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    trainer_rows = [json.loads(line) for line in (micro_run / "val_answers.jsonl").read_text().splitlines()]
    assert rows == trainer_rows
    assert accuracy == pytest.approx(read_metrics(micro_run)["val_accuracy"])
    assert set(rows[0]) == {"id", "question", "answer", "reference", "correct"}


def test_time_blocked_on_the_data_loader_is_measured(tmp_path, monkeypatch):
    """A loader that takes 20 ms per record: the timed steps' data wait is at least 20 ms for each of
    their records but one micro-batch (accelerate's loader reads one batch ahead, and after the last
    there is none), and at most their seconds (metrics.json's ``data_wait_share``). The run asks for no
    checkpoints (``train.checkpoints=false``, over the config's ``save_every=3``): it leaves the final
    model and no checkpoint; a new run into that directory is refused (it would overwrite them)."""
    import time

    from mambavlm.data.llava import LlavaDataset

    load = LlavaDataset.__getitem__

    def slow(self, index):
        time.sleep(0.02)
        return load(self, index)

    monkeypatch.setattr(LlavaDataset, "__getitem__", slow)
    run_finetune(micro_config(tmp_path, "data.num_workers=0", "data.synthetic.num_val=0", "train.checkpoints=false"))
    assert find_checkpoints(tmp_path) == [] and not list(tmp_path.glob("*checkpoint*"))
    assert (tmp_path / "final" / "config.json").is_file()
    for resume in ("null", "latest"):
        with pytest.raises(ConfigError, match=f"{tmp_path} holds a finished run \\(metrics.json and its final model\\)"):
            run_finetune(micro_config(tmp_path, "train.checkpoints=false", f"train.resume_from={resume}"))
    throughput = read_metrics(tmp_path)["throughput"]
    waited = throughput["data_wait_share"] * throughput["seconds"]
    assert (throughput["samples"] - 4) * 0.02 <= waited <= throughput["seconds"]


def test_a_val_record_that_cannot_be_read_is_skipped_and_named_not_fatal_after_training(tmp_path):
    """A val record without conversations, an entry that is not a record and an image given as a list
    had raised once training was over (a traceback, no metrics.json); each is now named in val_skipped
    and the other records are answered."""
    data = tmp_path / "data"
    train_json, val_json = make_shapes_vqa(data, num_train=16, num_val=4, image_size=32)
    val = json.loads(val_json.read_text())
    good_ids = [r["id"] for r in val]
    val += [{"id": "no_conv", "image": val[0]["image"]}, "a string", {**val[1], "id": "image_list", "image": [val[1]["image"]]}]
    val_json.write_text(json.dumps(val))
    config = micro_config(tmp_path / "run", f"data.train={train_json}", f"data.val={val_json}", "train.max_steps=1",
                          "train.save_every=null")
    run_finetune(config)
    metrics = read_metrics(tmp_path / "run")
    assert metrics["val_num_items"] == len(good_ids)
    answered = [json.loads(line)["id"] for line in (tmp_path / "run" / "val_answers.jsonl").read_text().splitlines()]
    assert answered == good_ids
    assert {s["id"]: s["reason"] for s in metrics["val_skipped"]} == {
        "no_conv": "expected a human turn then an assistant turn",
        str(len(good_ids) + 1): "a str, not a record (a mapping with 'conversations')",
        "image_list": f"'image' must be a path string, got {[val[1]['image']]!r}",
    }
    assert metrics["val_num_skipped"] == 3


@pytest.mark.parametrize("key", ["data.train", "data.val"])
@pytest.mark.parametrize(
    "content, message",
    [
        ("jsonl", "a JSON Lines file"),
        ("object", "expected a list of record dicts, got a JSON dict"),
        ("broken", "not a JSON file of LLaVA records"),
    ],
)
def test_a_data_file_that_is_not_a_json_list_is_one_config_error_before_training(tmp_path, key, content, message):
    """JSON Lines, a JSON object, or a list broken half-way: a ConfigError naming the key (one line from
    train/finetune.py), raised before any step; a bad data.val had been found only after training, and
    both as a ValueError (a traceback)."""
    data = tmp_path / "data"
    train_json, val_json = make_shapes_vqa(data, num_train=16, num_val=2, image_size=32)
    records = json.loads((train_json if key == "data.train" else val_json).read_text())
    bad = tmp_path / "bad.json"
    bad.write_text({
        "jsonl": "".join(json.dumps(r) + "\n" for r in records),
        "object": json.dumps({"data": records}),
        "broken": json.dumps(records)[:-40],
    }[content])
    files = {"data.train": train_json, "data.val": val_json, key: bad}
    config = micro_config(tmp_path / "run", *(f"{k}={v}" for k, v in files.items()), "train.max_steps=1",
                          "train.save_every=null")
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: {re.escape(str(bad))}: .*{re.escape(message)}"):
        run_finetune(config)
    assert not find_checkpoints(tmp_path / "run") and not (tmp_path / "run" / "final").exists()


def test_a_run_whose_model_cannot_be_built_leaves_no_directory_it_created(tmp_path):
    """A model that cannot be built (here an encoder's weights file that does not exist) stopped the run
    after its output_dir (and the missing parents) had been created: they were left behind, empty. Now
    they are removed; a directory that existed before the run, empty or not, is kept as it was."""
    missing = "model.vision.encoders.0.weights=/nonexistent/dinov2.safetensors"
    with pytest.raises(FileNotFoundError, match="encoder weights file not found"):
        run_finetune(micro_config(tmp_path / "new" / "run", missing))
    assert list(tmp_path.iterdir()) == []
    existing = tmp_path / "existing"
    (existing / "notes").mkdir(parents=True)
    for output_dir in (existing / "notes", existing):
        with pytest.raises(FileNotFoundError):
            run_finetune(micro_config(output_dir, missing))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == [Path("existing"), Path("existing/notes")]


def test_training_data_whose_every_record_is_skipped_is_one_config_error_naming_the_kinds(tmp_path):
    """A wrong image folder (every image missing) with one record without an answer: a ConfigError (one
    line from train/finetune.py) counting the kinds and naming the first record; was a ValueError
    traceback saying only that every record was skipped."""
    data = tmp_path / "data"
    train_json, _ = make_shapes_vqa(data, num_train=16, num_val=0, image_size=32)
    records = json.loads(train_json.read_text())
    records[3]["conversations"] = records[3]["conversations"][:1]
    train_json.write_text(json.dumps(records))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = micro_config(tmp_path / "run", f"data.train={train_json}", f"data.image_root={elsewhere}",
                          "train.max_steps=1", "train.save_every=null")
    first = records[0]["id"]
    with pytest.raises(ConfigError) as caught:
        run_finetune(config)
    assert str(caught.value) == (
        "every record of the training data was skipped, nothing to train on: 16 records (15 image file not found, "
        f"1 no assistant turn); the first, {first}: image file not found: {elsewhere / records[0]['image']}"
    )


def test_help_names_every_key_of_the_train_config(capsys: pytest.CaptureFixture) -> None:
    """train/finetune.py --help gave only ``--config`` and ``overrides``: a user had to read the schema to learn
    the keys. Now it lists every field of TrainConfig and of its train, data, data.synthetic, lora and model
    sections, and the values of the Literal ones (freeze, mixed precision, LoRA's projector), so that it cannot
    fall behind the schema."""
    import typing

    from mambavlm.config import ModelConfig
    from mambavlm.training.config import DataConfig, LoraSettings, SyntheticDataConfig, TrainConfig, TrainingConfig

    spec = importlib.util.spec_from_file_location("finetune_script", ROOT / "train/finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    missing = [f"{key}=" for key in TrainConfig.model_fields if f"{key}=" not in text and f"{key}." not in text]
    for prefix, section in (("train", TrainingConfig), ("data", DataConfig), ("lora", LoraSettings),
                            ("model", ModelConfig)):
        missing += [f"{prefix}.{key}" for key in section.model_fields
                    if f"{prefix}.{key}" not in text and not (prefix == "lora" and f"{key}:" in text)]
    missing += [f"synthetic {key}" for key in SyntheticDataConfig.model_fields if f"{key}:" not in text]
    for section, key in ((TrainingConfig, "freeze"), (TrainingConfig, "mixed_precision"), (LoraSettings, "projector")):
        missing += [value for value in typing.get_args(section.model_fields[key].annotation) if value not in text]
    assert not missing, missing
