"""Training, distillation and evaluation on 2 GPUs through ``accelerate launch`` with the project's
accelerate configs (DDP, FSDP, DeepSpeed ZeRO-2 and ZeRO-3) equal one GPU, on the tiny configs in float32.

- fine-tuning: the step losses of 2 GPUs equal those of 1 GPU with the same global batch; the model
  the 2-GPU run saves (gathered from its shards) reloads on one GPU and answers the validation
  questions with the tokens the run itself generated; killed after its step-3 checkpoint and resumed
  on 2 GPUs, the run repeats the uninterrupted losses;
- distillation (mmMamba's three stages and MaTVLM's stage): 2 GPUs give the 1-GPU stage losses, and
  the student is saved as one model that loads;
- evaluation: eval/run.py sharded over 2 GPUs gives the answers and scores of one.

These need 2 CUDA GPUs (the ``nvidia-h200-x2`` machine) and skip elsewhere; CI runs the 2-process
CPU versions (gloo, DDP only: accelerate's FSDP and DeepSpeed need accelerators) in
tests/training/test_finetune.py, tests/distill/test_distill_run.py and tests/eval/test_runner.py.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    DISTILL_LLAMA,
    ROOT,
    TINY_TRAIN,
    four_records,
    subprocess_env,
    tiny_llama_vlm,
    tiny_vlm,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

LOSS_RTOL = 1e-4
"""float32 on the GPU: the same sums in another order (cuBLAS, NCCL all-reduce, mamba_ssm's backward
atomics), measured well inside this."""


RUN = [
    "data.synthetic.num_train=48",
    "data.synthetic.num_val=6",
    "train.max_steps=6",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.lr=3e-3",
    "train.warmup_ratio=0",
    "train.save_every=3",
    "train.keep_last=5",
    "train.eval_batch_size=3",
    "train.mixed_precision=no",
]


def launch(script: str, processes: int, *args: str, strategy: str = "ddp", wrap: list[str] | None = None,
           devices: str | None = None) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file configs/accelerate/STRATEGY.yaml --num_processes N SCRIPT ARGS``."""
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(ROOT / "configs" / "accelerate" / f"{strategy}.yaml"),
           "--num_processes", str(processes), "--main_process_port", "0",
           *(wrap or []), str(ROOT / script), *args]
    extra = {"CUDA_VISIBLE_DEVICES": devices} if devices is not None else {}
    result = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(**extra), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, failure_report(result.stdout + result.stderr)
    return result


def failure_report(log: str) -> str:
    """The first traceback of a failed launch (the failing rank's own) and the log's end."""
    first = log.find("Traceback (most recent call last)")
    head = log[first:first + 6000] if first >= 0 else ""
    return f"{head}\n...\n{log[-3000:]}"


def metrics(output_dir: Path) -> dict:
    return json.loads((output_dir / "metrics.json").read_text())


def finetune(processes: int, output_dir: Path, strategy: str, *extra: str) -> dict:
    launch("train/finetune.py", processes, "--config", str(TINY_TRAIN), f"output_dir={output_dir}", *RUN, *extra,
           strategy=strategy, devices="0" if processes == 1 else "0,1")
    return metrics(output_dir)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_two_gpus_equal_one_reload_on_one_and_resume_exactly(strategy: str, tmp_path: Path) -> None:
    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    one = finetune(1, tmp_path / "one", strategy)
    two = finetune(2, tmp_path / "two", strategy)
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    assert (one["gradient_accumulation_steps"], two["gradient_accumulation_steps"]) == (4, 2)
    assert two["step_losses"] == pytest.approx(one["step_losses"], rel=LOSS_RTOL)
    assert two["throughput"]["peak_memory_gib"] > 0

    # the gathered model, reloaded on one GPU, answers as the 2-GPU run did
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "eval" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    out = tmp_path / "answers.jsonl"
    accuracy = evaluate.main(["--model", str(tmp_path / "two"), "--data", str(tmp_path / "two" / "data" / "val.json"),
                              "--out", str(out), "--batch-size", "3", "--max-new-tokens", "8"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    trained = [json.loads(line) for line in (tmp_path / "two" / "val_answers.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and rows == trained
    assert accuracy == pytest.approx(two["val_accuracy"])

    # killed after the step-3 checkpoint: resumed on 2 GPUs, steps 4-6 repeat the uninterrupted losses
    resumed = finetune(2, tmp_path / "resumed", strategy, f"train.resume_from={tmp_path / 'two' / 'checkpoint-3'}")
    assert resumed["step_losses"] == pytest.approx(two["step_losses"], rel=LOSS_RTOL)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "model"
    tiny_llama_vlm(**DISTILL_LLAMA).save_pretrained(path)
    return path


def distill_args(teacher: Path, tmp_path: Path) -> list[str]:
    """train/distill.py on the tiny configs: mmMamba's three stages and MaTVLM's, 2 steps each."""
    train = four_records(tmp_path / "data")
    stages = ", ".join(
        f"{{name: {name}, max_steps: 2, lr: 5.0e-3, global_batch_size: 4, micro_batch_size: 2{extra}}}"
        for name, extra in (("stage1", ""), ("stage2", ""), ("stage3", ""), ("matvlm", ", gamma: 0.5"))
    )
    return ["--config", str(ROOT / "configs/distill/tiny.yaml"), f"teacher={teacher}", f"data={{train: {train}}}",
            f"stages=[{stages}]", "layout=head-interleaved:2", "mixed_precision=no"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed_zero2"])
def test_distillation_on_two_gpus_equals_one_and_saves_one_student(strategy: str, teacher: Path,
                                                                    tmp_path: Path) -> None:
    from mambavlm.model import MambaVLM

    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    args = distill_args(teacher, tmp_path)
    wrap = ["--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer"] if strategy == "fsdp" else []
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"run{processes}"
        # FSDP on one process is refused when its root unit trains nothing (stage 1 here: PyTorch's FSDP
        # loses such a root's parameters); the 1-GPU reference runs unsharded
        one_gpu = strategy if strategy != "fsdp" else "ddp"
        launch("train/distill.py", processes, *args, f"output_dir={out}", strategy=one_gpu if processes == 1 else strategy,
               wrap=wrap if processes == 2 else [], devices="0" if processes == 1 else "0,1")
        runs[processes] = metrics(out)
    for stage_one, stage_two in zip(runs[1]["stages"], runs[2]["stages"], strict=True):
        assert len(stage_one["step_losses"]) == 2
        assert stage_two["step_losses"] == pytest.approx(stage_one["step_losses"], rel=LOSS_RTOL)
    one = MambaVLM.from_pretrained(tmp_path / "run1" / "student").state_dict()
    two = MambaVLM.from_pretrained(tmp_path / "run2" / "student").state_dict()
    assert one.keys() == two.keys()
    # AdamW's first updates are lr * g / (|g| + eps): where a gradient is ~0, the other summation
    # order of 2 GPUs can flip its sign and move that element by up to 2 lr per step. Such elements
    # must be rare; a parameter whose gradient is not synchronised would differ everywhere.
    total_lr = 5.0e-3 * 2 * 4
    report, off = [], 0
    for key, value in one.items():
        close = torch.isclose(two[key], value, rtol=1e-3, atol=1e-5)
        if not close.all():
            gap = (two[key] - value).abs().max().item()
            report.append(f"{key}: {int((~close).sum())} / {close.numel()} elements differ, by up to {gap:.2e}")
            off += int((~close).sum())
            assert gap <= 2 * total_lr, report[-1]
    assert off <= 1e-3 * sum(v.numel() for v in one.values()), "\n".join(report)


def test_distillation_under_zero3_is_refused_naming_what_to_use(teacher: Path, tmp_path: Path) -> None:
    """ZeRO-3 partitions the student in place when stage 1 starts: a run of several stages says so."""
    pytest.importorskip("deepspeed")
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(ROOT / "configs/accelerate/deepspeed_zero3.yaml"),
           "--num_processes", "2", "--main_process_port", "0", str(ROOT / "train/distill.py"),
           *distill_args(teacher, tmp_path), f"output_dir={tmp_path / 'run'}"]
    result = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(CUDA_VISIBLE_DEVICES="0,1"), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode != 0
    assert "cannot use DeepSpeed ZeRO-3" in result.stdout + result.stderr, failure_report(result.stdout + result.stderr)


def test_evaluation_sharded_on_two_gpus_equals_one(tmp_path: Path) -> None:
    """The mini POPE benchmark (LLaVA's question file, the official label files) through eval/run.py
    --annotations: answers and scores on 2 GPUs equal 1 GPU's."""
    from tests.eval.test_benchmarks_end_to_end import _pope

    tiny_vlm().save_pretrained(tmp_path / "model")
    (tmp_path / "pope").mkdir()
    mini = _pope(tmp_path / "pope")
    results = {}
    for processes in (1, 2):
        out = tmp_path / f"eval{processes}"
        launch("eval/run.py", processes, "--model", str(tmp_path / "model"), "--benchmark", mini.name,
               "--data", str(mini.questions), "--image-folder", str(mini.images), "--output-dir", str(out),
               "--annotations", str(mini.files.annotations), "--batch-size", "2", "--max-new-tokens", "4",
               devices="0" if processes == 1 else "0,1")
        answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
        results[processes] = (answers, json.loads((out / "results.json").read_text())["scores"])
    assert len(results[1][0]) == mini.num_questions and results[1][1]["counts"]["missing"] == 0
    assert results[2] == results[1]
