"""Training: config, freezing and optimiser groups, schedule, checkpoints, the loop, resume, 2 processes, eval."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from accelerate import Accelerator
from PIL import Image
from torch import nn

from mambavlm.config import ConfigError
from mambavlm.data.llava import LlavaDataset
from mambavlm.data.synthetic import make_shapes_vqa
from mambavlm.model import MambaVLM, build_model
from mambavlm.training import (
    BlankImage,
    run_finetune,
    apply_freeze_policy,
    build_scheduler,
    exact_match,
    find_checkpoints,
    load_train_config,
    normalize_answer,
    parameter_groups,
    save_checkpoint,
)
from mambavlm.training.checkpoint import TRAINER_STATE_FILE, remove_unfinished_writes, resolve_resume
from mambavlm.training.evaluation import BLANK_COLOR

REPO = Path(__file__).resolve().parents[1]
TINY_TRAIN = REPO / "configs" / "train" / "tiny.yaml"
TINY_MODEL = REPO / "configs" / "model" / "tiny.yaml"

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


@pytest.fixture(scope="module", autouse=True)
def on_cpu():
    """Train on the CPU even where a GPU is present: the equality tests compare CPU arithmetic."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ACCELERATE_USE_CPU", "true")
        yield


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


# --- config ---------------------------------------------------------------------------------------


def test_config_resolves_model_path_and_applies_model_overrides(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.yaml").write_text(TINY_MODEL.read_text())
    (tmp_path / "runs").mkdir()
    path = tmp_path / "runs" / "t.yaml"
    path.write_text("model: ../models/m.yaml\ndata: {synthetic: {num_train: 8, num_val: 2}}\noutput_dir: out\n")
    config = load_train_config(path, ["model.projector.d_state=5", "train.max_steps=3"])
    assert config.model.projector.d_state == 5
    assert config.model.llm.tokenizer == "builtin:tiny"
    assert config.train.max_steps == 3
    assert config.output_dir == "out"


def test_config_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"train\.learning_rate: unknown key"):
        load_train_config(TINY_TRAIN, ["train.learning_rate=1e-3"])
    with pytest.raises(ConfigError, match=r"model\.projector\.d_stat: unknown key"):
        load_train_config(TINY_TRAIN, ["model.projector.d_stat=4"])


def test_config_rejects_batch_sizes_that_do_not_divide():
    with pytest.raises(ConfigError, match="global_batch_size=10 is not a multiple of train.micro_batch_size=4"):
        load_train_config(TINY_TRAIN, ["train.global_batch_size=10", "train.micro_batch_size=4"])


def test_missing_data_file_is_a_clear_error(tmp_path):
    config = load_train_config(TINY_TRAIN, [f"output_dir={tmp_path}", f"data.train={tmp_path / 'nope.json'}"])
    with pytest.raises(FileNotFoundError, match=r"data\.train: file not found: .*nope\.json"):
        run_finetune(config)


# --- freezing and optimiser -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model() -> MambaVLM:
    torch.manual_seed(0)
    return build_model(TINY_MODEL)


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def names_under(model: nn.Module, prefix: str) -> set[str]:
    return {name for name, _ in model.named_parameters() if name.startswith(prefix)}


def test_freeze_presets_give_the_expected_trainable_sets(tiny_model):
    apply_freeze_policy(tiny_model, "align")
    assert trainable_names(tiny_model) == names_under(tiny_model, "projector.")
    apply_freeze_policy(tiny_model, "finetune")
    assert trainable_names(tiny_model) == names_under(tiny_model, "projector.") | names_under(tiny_model, "llm.")
    with pytest.raises(ValueError, match="unknown freeze preset 'all'"):
        apply_freeze_policy(tiny_model, "all")


def test_unfrozen_encoder_trains_with_the_preset():
    model = build_model(TINY_MODEL, ["vision.encoders.0.frozen=false"])
    apply_freeze_policy(model, "align")
    expected = names_under(model, "projector.") | names_under(model, "vision.encoders.0.")
    assert trainable_names(model) == expected


def test_parameter_groups_exempt_norms_and_biases_and_skip_frozen(tiny_model):
    apply_freeze_policy(tiny_model, "align")
    groups = parameter_groups(tiny_model, weight_decay=0.1)
    by_id = {id(p): name for name, p in tiny_model.named_parameters()}
    grouped = {g["weight_decay"]: {by_id[id(p)] for p in g["params"]} for g in groups}
    projector = dict(tiny_model.projector.named_parameters(prefix="projector"))
    # by name: biases, LayerNorm/RMSNorm parameters, and 1-D tensors such as the SSM's D
    no_decay = {n for n, p in projector.items() if n.endswith(".bias") or "norm" in n or p.ndim == 1}
    assert no_decay, "the projector has norm / bias / 1-D parameters"
    assert grouped[0.0] == no_decay
    assert grouped[0.1] == set(projector) - no_decay
    apply_freeze_policy(tiny_model, "finetune")
    groups = parameter_groups(tiny_model, weight_decay=0.1)
    zero = {by_id[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert "llm.backbone.norm_f.weight" in zero and "llm.backbone.layers.0.norm.weight" in zero
    assert "llm.backbone.layers.0.mixer.dt_proj.bias" in zero
    assert not any(n.startswith("vision.") for g in groups for n in map(by_id.get, map(id, g["params"])))


def test_schedule_is_linear_warmup_then_cosine():
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=0.5)
    total, warmup = 20, 2  # ceil(0.1 * 20)
    scheduler = build_scheduler(optimizer, total_steps=total, warmup_ratio=0.1)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.5 * k / warmup for k in range(warmup)] + [
        0.5 * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup))) for k in range(warmup, total)
    ]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert lrs[warmup] == pytest.approx(0.5)


# --- evaluation helpers and blind mode ------------------------------------------------------------


def test_answer_normalisation():
    assert normalize_answer("  Red.\n") == "red"
    assert normalize_answer("Two  Objects!") == "two objects"
    assert exact_match("Circle", "circle ")
    assert not exact_match("circles", "circle")


def test_blind_mode_blanks_the_images(tmp_path, tiny_model):
    train_json, _ = make_shapes_vqa(tmp_path, num_train=6, num_val=0, image_size=32)
    transforms = [e.preprocess for e in tiny_model.vision.encoders]

    def dataset(image_transforms):
        return LlavaDataset(
            train_json, tmp_path, tiny_model.tokenizer, tiny_model.template, image_transforms,
            tiny_model.num_visual_tokens, 256, tiny_model.add_bos,
        )

    seeing, blind = dataset(transforms), dataset([BlankImage(t) for t in transforms])
    grey = Image.new("RGB", (32, 32), BLANK_COLOR)
    for i in range(len(seeing)):
        for k, transform in enumerate(transforms):
            assert torch.equal(blind[i]["pixel_values"][k], transform(grey))
            assert not torch.equal(seeing[i]["pixel_values"][k], transform(grey))
        assert torch.equal(blind[i]["input_ids"], seeing[i]["input_ids"])


# --- checkpoints ----------------------------------------------------------------------------------


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


# --- the loop -------------------------------------------------------------------------------------


def test_short_run_learns_and_writes_its_outputs(micro_run):
    metrics = read_metrics(micro_run)
    losses = metrics["step_losses"]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) / 2 < 0.7 * sum(losses[:2]) / 2
    assert metrics["num_skipped"] == 0 and metrics["steps"] == 6
    assert metrics["val_num_items"] == 12 and 0.0 <= metrics["val_accuracy"] <= 1.0
    assert metrics["config"]["train"]["max_steps"] == 6
    assert [p.name for p in find_checkpoints(micro_run)] == ["checkpoint-3", "checkpoint-6"]
    state = json.loads((micro_run / "checkpoint-3" / TRAINER_STATE_FILE).read_text())
    assert (state["step"], state["global_step"], state["phase_losses"]) == (3, 3, [losses[:3]])
    reloaded = MambaVLM.from_pretrained(micro_run / "final")
    assert reloaded.config == micro_config(micro_run).model


def test_resume_repeats_the_uninterrupted_losses(micro_run, tmp_path):
    """Resume from the step-3 checkpoint of the 6-step run: steps 4-6 must log the same losses."""
    config = micro_config(tmp_path, f"train.resume_from={micro_run / 'checkpoint-3'}")
    run_finetune(config)
    resumed, uninterrupted = read_metrics(tmp_path)["step_losses"], read_metrics(micro_run)["step_losses"]
    assert resumed == uninterrupted  # bit-exact on CPU


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, monkeypatch):
    overrides = ["train.max_steps=3", "train.save_every=null", "data.synthetic.num_val=0"]
    run_finetune(micro_config(tmp_path / "plain", *overrides))
    calls = []
    checkpoint = transformers.modeling_utils.checkpoint

    def counted_checkpoint(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counted_checkpoint)
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
    """Same global batch (8) on 1 process x 2 accumulation steps and on 2 processes x 1."""
    common = [*MICRO_RUN, "train.max_steps=3", "train.save_every=null", "data.synthetic.num_val=0"]
    one = tmp_path / "one"
    run_finetune(load_train_config(TINY_TRAIN, [f"output_dir={one}", *common]))
    two = tmp_path / "two"
    accelerate = Path(sys.executable).with_name("accelerate")
    # `accelerate launch --cpu` starts one process unless given an MPI hostfile; the torchrun launcher
    # (--multi_gpu) with ACCELERATE_USE_CPU starts two CPU processes that talk through gloo.
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--main_process_port", str(free_port()),
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "train" / "finetune.py"), "--config", str(TINY_TRAIN), f"output_dir={two}", *common,
    ]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    m1, m2 = read_metrics(one), read_metrics(two)
    assert (m1["num_processes"], m1["gradient_accumulation_steps"]) == (1, 2)
    assert (m2["num_processes"], m2["gradient_accumulation_steps"]) == (2, 1)
    assert m2["step_losses"] == pytest.approx(m1["step_losses"], rel=1e-5)  # seen: <= 6e-8


# --- eval/evaluate.py -----------------------------------------------------------------------------


def test_evaluate_script_reproduces_the_trainers_val_answers(micro_run, tmp_path):
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "eval" / "evaluate.py")
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
