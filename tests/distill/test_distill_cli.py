"""A short run of train/distill.py with a MambaVLM teacher and with an HF LLaMA teacher: every stage's
loss falls and the student is saved."""

from __future__ import annotations

import importlib.util
import json
import typing
from pathlib import Path

import pytest

from mambavlm.llm.hybrid import HybridLlamaForCausalLM
from mambavlm.llm.tokenizer import build_tiny_tokenizer
from mambavlm.model import MambaVLM
from tests.conftest import DISTILL_LLAMA, ROOT, tiny_llama, tiny_llama_vlm


def load_distill_script():
    spec = importlib.util.spec_from_file_location("distill_script", ROOT / "train/distill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stage_overrides(*stages: tuple[str, float] | tuple[str, float, str]) -> list[str]:
    """Short stages on one fixed micro-batch (num_train = batch size), so each stage's loss curve is
    that of plain optimisation; a third item names the stage's variant."""
    listed = ", ".join(
        f"{{name: {stage[0]}, max_steps: 8, lr: {stage[1]}, global_batch_size: 4, micro_batch_size: 4"
        + (f", variant: {stage[2]}}}" if len(stage) > 2 else "}")
        for stage in stages
    )
    return [f"stages=[{listed}]", "eval_batch_size=4", "eval_max_new_tokens=3"]


def check_metrics(metrics: dict, out: Path, names: list[str]) -> None:
    assert json.loads((out / "metrics.json").read_text())["stages"] == metrics["stages"]
    assert [s["name"] for s in metrics["stages"]] == names
    for stage in metrics["stages"]:
        assert stage["steps"] == 8
        assert stage["last_loss"] < stage["first_loss"], stage["name"]
    for key in ("teacher_val_accuracy", "student_val_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0


def test_distill_cli_with_a_vlm_teacher(tmp_path: Path) -> None:
    tiny_llama_vlm(**DISTILL_LLAMA).save_pretrained(tmp_path / "teacher")
    out = tmp_path / "run"
    metrics = load_distill_script().main([
        "--config", str(ROOT / "configs/distill/tiny.yaml"),
        f"teacher={tmp_path / 'teacher'}", f"output_dir={out}", "layout=head-interleaved:2",
        "data.synthetic={num_train: 4, num_val: 4, image_size: 24}",
        *stage_overrides(("stage1", 1e-2), ("stage2", 5e-3), ("stage3", 3e-3)),
    ])
    check_metrics(metrics, out, ["stage1", "stage2", "stage3"])
    assert metrics["mamba_layers"] == [1, 3]
    student = MambaVLM.from_pretrained(out / "student")
    assert student.llm.mamba_layers == [1, 3] and student.num_visual_tokens == 32


def test_distill_cli_with_an_hf_llama_teacher(tmp_path: Path) -> None:
    from mambavlm.data.synthetic import make_shapes_vqa

    tiny_llama(**DISTILL_LLAMA).save_pretrained(tmp_path / "teacher")
    build_tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    train, val = make_shapes_vqa(tmp_path / "data", 4, 4, image_size=24)
    for path in (train, val):  # the questions as text-only records
        records = json.loads(path.read_text())
        for r in records:
            del r["image"]
            r["conversations"][0]["value"] = r["conversations"][0]["value"].replace("<image>\n", "")
        path.write_text(json.dumps(records))
    out = tmp_path / "run"
    metrics = load_distill_script().main([
        "--config", str(ROOT / "configs/distill/tiny.yaml"),
        f"teacher={tmp_path / 'teacher'}", f"output_dir={out}", "layout=linear",
        f"data={{train: {train}, val: {val}}}", *stage_overrides(("stage1", 1e-2), ("matvlm", 3e-3, "public_code")),
    ])
    check_metrics(metrics, out, ["stage1", "matvlm"])
    student = HybridLlamaForCausalLM.from_pretrained(out / "student")
    assert student.mamba_layers == [0, 1, 2, 3]


def test_help_names_every_key_layout_rule_seeding_and_stage(capsys: pytest.CaptureFixture) -> None:
    """--help said only that the config names the teacher, layout, seeding and stages: now it lists
    every top-level key of DistillConfig and the values of layout, seeding and stage names, so that it
    cannot fall behind the schema."""
    from mambavlm.distill.config import DistillConfig
    from mambavlm.distill.layouts import LAYOUT_RULES
    from mambavlm.distill.stages import StageName

    with pytest.raises(SystemExit) as exit_info:
        load_distill_script().main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    missing = [f"{key}=" for key in DistillConfig.model_fields if f"{key}=" not in text and f"{key}." not in text]
    missing += [rule for rule in LAYOUT_RULES if rule not in text]
    missing += [name for name in (*typing.get_args(DistillConfig.model_fields["seeding"].annotation),
                                  *typing.get_args(StageName)) if name not in text]
    assert not missing, missing
