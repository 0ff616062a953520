"""Distillation on the one training engine: killed or stopped by SIGTERM mid-stage and resumed it repeats
the uninterrupted losses; bad records are skipped and counted as fine-tuning counts them, even a first micro-batch
whose every record is bad."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
from pathlib import Path

import pytest
import yaml
from accelerate.data_loader import SeedableRandomSampler

from mambavlm.data.synthetic import make_shapes_vqa
from mambavlm.training import load_train_config, run_finetune
from mambavlm.training.engine import Trainer
from tests.conftest import (
    DISTILL_LLAMA,
    ROOT,
    assert_same_weights,
    four_records,
    tiny_llama,
    tiny_llama_vlm,
    tiny_vlm,
)


def distill_main(argv: list[str]) -> dict:
    spec = importlib.util.spec_from_file_location("distill_script", ROOT / "train/distill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaMA VLM (random weights), saved as a MambaVLM directory."""
    path = tmp_path_factory.mktemp("teacher") / "model"
    tiny_llama_vlm(**DISTILL_LLAMA).save_pretrained(path)
    return path


def distill_args(teacher: Path, out: Path, *extra: str) -> list[str]:
    stages = ", ".join(
        f"{{name: {name}, max_steps: 5, lr: {lr}, global_batch_size: 8, micro_batch_size: 4}}"
        for name, lr in (("stage1", 1e-2), ("stage2", 5e-3), ("stage3", 3e-3))
    )
    return [
        "--config", str(ROOT / "configs/distill/tiny.yaml"),
        f"teacher={teacher}", f"output_dir={out}", "layout=head-interleaved:2",
        "data.synthetic={num_train: 24, num_val: 4, image_size: 24}",
        f"stages=[{stages}]", "eval_batch_size=4", "eval_max_new_tokens=3", "log_every=1", "save_every=3",
        *extra,
    ]


def test_distillation_killed_or_stopped_mid_stage_resumes_with_the_uninterrupted_losses(
    teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    whole = distill_main(distill_args(teacher, tmp_path / "whole"))
    uninterrupted = [stage["step_losses"] for stage in whole["stages"]]
    assert all(len(losses) == 5 and None not in losses for losses in uninterrupted)

    # A crash at global step 8 (stage2, step 3): the newest checkpoint is step 6 (stage2, step 1).
    real_log = Trainer._log

    def crash_at_step_8(self, phase, state, *args):  # noqa: ANN001
        real_log(self, phase, state, *args)
        if state.global_step == 8:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(Trainer, "_log", crash_at_step_8)
    out = tmp_path / "killed"
    with pytest.raises(SystemExit) as exit_info:  # the script's one Ctrl-C line, exit 130
        distill_main(distill_args(teacher, out))
    assert exit_info.value.code == 130
    # checkpoints at steps 3 and 6 (save_every) and 5 (the end of stage1); the last two are kept
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert (state["phase"], state["step"], state["global_step"]) == (1, 1, 6)
    assert not (out / "metrics.json").exists()

    monkeypatch.setattr(Trainer, "_log", real_log)
    resumed = distill_main(distill_args(teacher, out, "resume_from=latest"))
    losses = [stage["step_losses"] for stage in resumed["stages"]]
    for stage_losses, expected in zip(losses, uninterrupted):
        assert stage_losses == pytest.approx(expected, rel=1e-6)
    assert resumed["student_val_accuracy"] == whole["student_val_accuracy"]

    # SIGTERM (a scheduler's preemption) as global step 7 (stage2, step 2) starts its second micro-batch:
    # the step finishes, its checkpoint is written, the script exits 143 naming it, and the resume repeats
    # the uninterrupted losses
    calls, micro_step = [0], Trainer._micro_step

    def signalled(self, *args):  # noqa: ANN001, ANN002
        calls[0] += 1
        if calls[0] == 14:  # 2 micro-batches per step
            os.kill(os.getpid(), signal.SIGTERM)
        return micro_step(self, *args)

    monkeypatch.setattr(Trainer, "_micro_step", signalled)
    out = tmp_path / "stopped"
    with pytest.raises(SystemExit) as exit_info:
        distill_main(distill_args(teacher, out))
    assert exit_info.value.code == 143
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"stopped by SIGTERM after step 7: its checkpoint is {out / 'checkpoint-7'}; resume with resume_from=latest")
    state = json.loads((out / "checkpoint-7" / "trainer_state.json").read_text())
    assert (state["phase"], state["step"], state["global_step"]) == (1, 2, 7)
    monkeypatch.setattr(Trainer, "_micro_step", micro_step)
    resumed = distill_main(distill_args(teacher, out, "resume_from=latest"))
    for stage, expected in zip(resumed["stages"], uninterrupted):
        assert stage["step_losses"] == pytest.approx(expected, rel=1e-6)


def test_resume_latest_on_a_finished_distillation_says_so_and_leaves_its_results(
    teacher: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """resume_from=latest on a distillation that had finished evaluated teacher and student again and
    overwrote metrics.json (its wall_seconds became the rerun's): now train/distill.py logs one line naming
    the student, returns the recorded metrics (exit status 0) and writes nothing."""
    out = tmp_path / "run"
    one_step = "stages=[{name: stage1, max_steps: 1, lr: 1.0e-2, global_batch_size: 8, micro_batch_size: 8}]"
    args = distill_args(teacher, out, "data.synthetic={num_train: 8, num_val: 2, image_size: 24}", one_step,
                        "eval_batch_size=2", "eval_max_new_tokens=2")
    finished = distill_main(args)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    caplog.clear()
    with caplog.at_level("INFO"):
        assert distill_main([*args, "resume_from=latest"]) == finished
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == before
    [line] = [r.getMessage() for r in caplog.records]
    assert line.endswith(f"resume_from=latest: {out} holds a finished run of this config, nothing to resume: its "
                         f"model is {out / 'student'}, its results {out / 'metrics.json'} (left as they are)")


def bad_image_data(root: Path) -> tuple[Path, set[int]]:
    """16 Shapes-VQA records, the images of the last 8 overwritten with bytes no decoder reads."""
    train, _ = make_shapes_vqa(root, 16, 0, image_size=24)
    records = json.loads(train.read_text())
    bad = set(range(8, 16))
    for index in bad:
        (root / records[index]["image"]).write_bytes(b"not an image")
    return train, bad


def visited_records(seed: int, num_records: int, micro: int, steps: int) -> list[int]:
    """The records the engine's first epoch visits in ``steps`` steps of one micro-batch each."""
    sampler = SeedableRandomSampler(range(num_records), data_seed=seed)
    sampler.set_epoch(0)
    return list(sampler)[: micro * steps]


def test_bad_records_are_skipped_and_counted_alike_in_distillation_and_finetuning(
    teacher: Path, tmp_path: Path
) -> None:
    train, bad = bad_image_data(tmp_path / "data")
    micro, steps = 4, 3
    seed = next(s for s in range(200) if set(visited_records(s, 16, micro, 1)) <= bad)  # first micro-batch all bad
    expected = sum(index in bad for index in visited_records(seed, 16, micro, steps))

    stage = f"{{name: stage1, max_steps: {steps}, lr: 1.0e-2, global_batch_size: {micro}, micro_batch_size: {micro}}}"
    distilled = distill_main([
        "--config", str(ROOT / "configs/distill/tiny.yaml"), f"teacher={teacher}", f"output_dir={tmp_path / 'd'}",
        f"data={{train: {train}}}", f"stages=[{stage}]", f"seed={seed}", "eval_batch_size=4",
    ])
    finetuned = run_finetune(load_train_config(ROOT / "configs/train/tiny.yaml", [
        f"output_dir={tmp_path / 'f'}", f"data={{train: {train}}}", f"seed={seed}", f"train.max_steps={steps}",
        f"train.global_batch_size={micro}", f"train.micro_batch_size={micro}",
    ]))
    for metrics in (distilled, finetuned):
        assert metrics["num_skipped"] == expected > micro
        assert metrics["skipped_by_kind"] == {"unreadable image": expected}
    assert distilled["stages"][0]["step_losses"][0] is None  # the all-bad first step trained on nothing
    assert finetuned["step_losses"][0] is None
    on_disk = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert on_disk["skipped_by_kind"] == {"unreadable image": expected}


def test_data_longer_than_the_teacher_takes_is_an_error_before_training(teacher: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        distill_main(distill_args(teacher, tmp_path / "run", "data.max_length=1000"))
    assert exit_info.value.code == 2
    assert re.search(r"^error: data.max_length=1000 exceeds what the teacher .* takes \(256 tokens\)",
                     capsys.readouterr().err, re.MULTILINE)
    assert not list((tmp_path / "run").glob("checkpoint-*"))


@pytest.mark.parametrize(("layout", "message"), [
    ("list:1,7", r"indices \[7\] are not layers of a 4-layer model"),
    ("tail-stacked:4", r"a 4-layer model has room for at most 3 attention layers"),
])
def test_a_layout_the_teacher_cannot_take_is_an_error_before_the_data(
    teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture, layout: str, message: str
) -> None:
    """A layout valid in itself but not for the teacher's depth: a one-line error naming the layout and
    the teacher, before any data or checkpoint is written (it was a traceback after the data)."""
    with pytest.raises(SystemExit) as exit_info:
        distill_main([*distill_args(teacher, tmp_path / "run"), f"layout={layout}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(rf"^error: layout={re.escape(layout)}: .*{message}.* \(the teacher {re.escape(str(teacher))}\)$",
                     err, re.MULTILINE), err[-2000:]
    assert not (tmp_path / "run").exists()  # nothing written: not even the directory the run created


def test_a_run_that_fails_on_its_teacher_leaves_no_directory_it_created(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """A missing teacher stopped the run after its output_dir (and the missing parents) had been created
    for the run's lock: they were left behind, empty. Now the run removes the directories it created and
    left empty; one that existed before the run is kept."""
    missing_teacher = tmp_path / "no-teacher"
    with pytest.raises(SystemExit) as exit_info:
        distill_main(distill_args(missing_teacher, tmp_path / "new" / "run"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: teacher {missing_teacher} does not exist\n"
    assert list(tmp_path.iterdir()) == []
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(SystemExit):
        distill_main(distill_args(missing_teacher, existing))
    assert existing.is_dir() and list(existing.iterdir()) == []


def test_a_teacher_path_that_is_missing_or_a_run_directory_is_named_with_what_to_use(
    teacher: Path, tmp_path: Path
) -> None:
    """A missing teacher says so; a training run's output directory (which eval/evaluate.py takes) names
    its model directory, where it was 'neither a MambaVLM nor an HF model' alone."""
    from mambavlm.distill.run import load_teacher

    with pytest.raises(FileNotFoundError, match=rf"^teacher {re.escape(str(tmp_path / 'nope'))} does not exist$"):
        load_teacher(tmp_path / "nope", "plain")
    run = tmp_path / "tiny-llama"
    run.mkdir()
    (run / "final").symlink_to(teacher, target_is_directory=True)
    with pytest.raises(FileNotFoundError, match=rf"a training run's output directory\? its model is {re.escape(str(run / 'final'))}\)$"):
        load_teacher(run, "plain")


def test_a_distilled_hybrid_as_teacher_is_named_as_such(tmp_path: Path) -> None:
    """A student given back as teacher was refused as 'its LLM is hybrid_llama; distillation needs a
    LLaMA-family one', which a LLaMA hybrid seems to be: now it says the teacher is already distilled."""
    from mambavlm.config import ConfigError
    from mambavlm.distill.convert import convert_llama, convert_vlm
    from mambavlm.distill.run import load_teacher

    convert_vlm(tiny_llama_vlm(**DISTILL_LLAMA), "list:1,3", "mmmamba").save_pretrained(tmp_path / "student")
    with pytest.raises(ConfigError, match=r"^teacher .*student is already a distilled hybrid \(Mamba-2 in layers "
                                          r"\[1, 3\]\): distill from its LLaMA teacher, with the layout you want$"):
        load_teacher(tmp_path / "student", "plain")
    convert_llama(tiny_llama(), "linear", "mmmamba").save_pretrained(tmp_path / "text-student")
    with pytest.raises(ConfigError, match=r"^teacher .*text-student is already a distilled hybrid: distill from"):
        load_teacher(tmp_path / "text-student", "plain")


def test_micro_batch_size_does_not_change_the_stage_losses(teacher: Path, tmp_path: Path) -> None:
    """Every objective (mmMamba's layer MSE and KL, MaTVLM's L2 + KL + CE) averages over the whole global
    batch's real / answer tokens: micro-batches of 4, 2 and 1 give the same step losses."""
    train = four_records(tmp_path / "data")
    stages = ", ".join(
        f"{{name: {name}, max_steps: 3, lr: 5.0e-3, global_batch_size: 4, micro_batch_size: MICRO{extra}}}"
        for name, extra in (("stage1", ""), ("stage3", ""), ("matvlm", ", gamma: 0.5"))
    )
    losses = {}
    for micro in (4, 2, 1):
        metrics = distill_main([
            "--config", str(ROOT / "configs/distill/tiny.yaml"), f"teacher={teacher}",
            f"output_dir={tmp_path / f'm{micro}'}", f"data={{train: {train}}}",
            f"stages=[{stages.replace('MICRO', str(micro))}]", "layout=head-interleaved:2",
        ])
        losses[micro] = [loss for stage in metrics["stages"] for loss in stage["step_losses"]]
    assert len(losses[4]) == 9
    for micro in (2, 1):
        assert losses[micro][0] == pytest.approx(losses[4][0], rel=1e-6), micro
        assert losses[micro] == pytest.approx(losses[4], rel=1e-5), micro


def test_two_processes_give_the_one_process_stage_losses_and_student(teacher: Path, tmp_path: Path) -> None:
    """mmMamba's three stages and MaTVLM's single stage with a global batch of 4: 1 process x 2
    accumulation steps and 2 CPU processes (gloo) x 1 give the same step losses, and the student each
    saves (gathered on the main process, one model) holds the same weights."""
    import socket
    import subprocess
    import sys

    from mambavlm.model import MambaVLM
    from tests.conftest import subprocess_env

    train = four_records(tmp_path / "data")
    stages = ", ".join(
        f"{{name: {name}, max_steps: 2, lr: 5.0e-3, global_batch_size: 4, micro_batch_size: 2{extra}}}"
        for name, extra in (("stage1", ""), ("stage2", ""), ("stage3", ""), ("matvlm", ", gamma: 0.5"))
    )
    args = ["--config", str(ROOT / "configs/distill/tiny.yaml"), f"teacher={teacher}", f"data={{train: {train}}}",
            f"stages=[{stages}]", "layout=head-interleaved:2"]
    one = distill_main([*args, f"output_dir={tmp_path / 'one'}"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "train" / "distill.py"), *args, f"output_dir={tmp_path / 'two'}"]
    result = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (one["num_processes"], one["gradient_accumulation_steps"]) == (1, 2)
    assert (two["num_processes"], two["gradient_accumulation_steps"]) == (2, 1)
    losses = {name: [s["step_losses"] for s in metrics["stages"]] for name, metrics in (("one", one), ("two", two))}
    assert [len(stage) for stage in losses["one"]] == [2, 2, 2, 2]
    for stage_one, stage_two in zip(losses["one"], losses["two"], strict=True):
        assert stage_two == pytest.approx(stage_one, rel=1e-5)
    # each stage's second step is timed (its first warms up), 4 samples, counted over both processes
    for metrics in (one, two):
        assert [(t["phase"], t["timed_steps"], t["samples"]) for t in metrics["throughput"]] == [
            (name, 1, 4) for name in ("stage1", "stage2", "stage3", "matvlm")
        ]
    assert [t["tokens"] for t in two["throughput"]] == [t["tokens"] for t in one["throughput"]]
    student_one = MambaVLM.from_pretrained(tmp_path / "one" / "student").state_dict()
    student_two = MambaVLM.from_pretrained(tmp_path / "two" / "student").state_dict()
    assert_same_weights(student_one, student_two)


def checkpointed_run(out: Path, teacher: Path) -> str:
    """A run folder as a killed distillation leaves it: checkpoint-3 and the run's config.yaml (returned)."""
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "trainer_state.json").write_text("{}")
    saved = yaml.safe_dump({"teacher": str(teacher), "layout": "head-interleaved:2", "seeding": "mmmamba",
                            "mixer_options": {}})
    (out / "config.yaml").write_text(saved)
    return saved


@pytest.mark.parametrize(("override", "change"), [
    ("layout=linear", "layout: 'head-interleaved:2' -> 'linear'"),
    ("seeding=matvlm", "seeding: 'mmmamba' -> 'matvlm'"),
])
def test_resuming_with_another_student_shape_names_the_change(teacher: Path, tmp_path: Path, override: str,
                                                              change: str, capsys: pytest.CaptureFixture) -> None:
    """A fresh user's resume with another layout ended in load_state_dict's missing / unexpected keys, and
    one with another seeding (other mixer norms) in its size mismatch, after the run's config.yaml had
    been overwritten: now one error line naming the setting, before the teacher loads, the saved config
    untouched (a checkpoint as a run leaves it)."""
    out = tmp_path / "run"
    saved = checkpointed_run(out, teacher)
    with pytest.raises(SystemExit) as exit_info:
        distill_main(distill_args(teacher, out, override, "resume_from=latest"))
    assert exit_info.value.code == 2
    assert (f"error: resume_from: {out / 'checkpoint-3'} was saved by a run with another model ({change})"
            in capsys.readouterr().err)
    assert (out / "config.yaml").read_text() == saved


@pytest.fixture(scope="module")
def wider_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The teacher with a wider LLM (hidden 48, not 32): another architecture, as a MambaVLM directory."""
    path = tmp_path_factory.mktemp("wider_teacher") / "model"
    tiny_llama_vlm(**DISTILL_LLAMA, hidden_size=48, intermediate_size=96).save_pretrained(path)
    return path


def test_resuming_with_another_teacher_names_it_before_anything_is_written(
    teacher: Path, wider_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A resume whose teacher has other shapes than the checkpointed run's (the student, its converted
    copy, has them too) loaded that teacher, wrote the data, rewrote the run's config.yaml and only then
    failed in the checkpoint load: now one error line naming ``teacher`` and both directories, before
    the teacher loads, config.yaml untouched and no data written."""
    hidden = [json.loads((path / "config.json").read_text())["text_config"]["hidden_size"]
              for path in (teacher, wider_teacher)]
    assert hidden[0] != hidden[1]  # the two teachers' architectures differ
    out = tmp_path / "run"
    saved = checkpointed_run(out, teacher)
    with pytest.raises(SystemExit) as exit_info:
        distill_main(distill_args(wider_teacher, out, "resume_from=latest"))
    assert exit_info.value.code == 2
    assert (out / "config.yaml").read_text() == saved
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3", "config.yaml"]  # no data, no logs
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        f"error: resume_from: {out / 'checkpoint-3'} was saved by a run with another model "
        f"(teacher: {str(teacher)!r} -> {str(wider_teacher)!r})"
    ), err


def test_a_profiled_distillation_step_writes_its_tables_and_changes_no_loss(teacher: Path, tmp_path: Path) -> None:
    """profile_step counts optimiser steps over all stages: step 3 is stage2's first; its operator tables
    and trace are written, and the stage losses are those of an unprofiled run."""
    train = four_records(tmp_path / "data")
    stages = ", ".join(f"{{name: {name}, max_steps: 2, lr: 5.0e-3, global_batch_size: 4, micro_batch_size: 2}}"
                       for name in ("stage1", "stage2"))
    runs = {}
    for name, extra in (("plain", []), ("profiled", ["profile_step=3"])):
        metrics = distill_main([
            "--config", str(ROOT / "configs/distill/tiny.yaml"), f"teacher={teacher}",
            f"output_dir={tmp_path / name}", f"data={{train: {train}}}", f"stages=[{stages}]",
            "layout=head-interleaved:2", *extra,
        ])
        runs[name] = [loss for stage in metrics["stages"] for loss in stage["step_losses"]]
    assert runs["profiled"] == pytest.approx(runs["plain"], rel=1e-6)
    profile = tmp_path / "profiled" / "profile"
    assert sorted(p.name for p in profile.iterdir()) == ["step-3-rank-0.json", "step-3-rank-0.txt"]
    assert "step 3, process 0: operators by their own CPU time" in (profile / "step-3-rank-0.txt").read_text()
    assert not (tmp_path / "plain" / "profile").exists()


def test_val_accuracy_skips_an_entry_that_is_not_a_record(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A val file with a string and a record without conversations among its records scores the records
    alone, as fine-tuning's evaluation does, and names the skipped entries in warnings (it raised
    AttributeError / ValueError after every stage)."""
    from types import SimpleNamespace

    from mambavlm.distill.run import val_accuracy

    _, val = make_shapes_vqa(tmp_path / "data", 0, 3, image_size=32)
    records = json.loads(val.read_text())
    mixed = tmp_path / "data" / "mixed.json"
    mixed.write_text(json.dumps(records[:1] + ["oops", {"id": "no_turns", "image": "x.png"}] + records[1:]))
    model = tiny_vlm()
    settings = SimpleNamespace(eval_batch_size=2, eval_max_new_tokens=4)
    expected = val_accuracy(model, val, tmp_path / "data", None, settings)
    assert expected is not None  # the three records answered
    with caplog.at_level("WARNING"):
        assert val_accuracy(model, mixed, tmp_path / "data", None, settings) == expected
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert "skipping 1: a str, not a record" in warnings and "skipping no_turns" in warnings
