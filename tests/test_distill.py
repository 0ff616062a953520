"""Distillation: trainable sets per stage, the stage losses against direct computations, configs, and a
short run of train/distill.py (MambaVLM and HF Llama teachers) whose stage losses fall."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from mambavlm.config import ConfigError
from mambavlm.distill.config import DistillConfig, DistillStageConfig, load_distill_config
from mambavlm.distill.convert import convert_llama, convert_vlm
from mambavlm.llm.hybrid import HybridLlamaForCausalLM, mamba_mixers
from mambavlm.distill.stages import (
    LossWeights,
    distill_loss,
    logit_kl,
    set_trainable,
    tap_attention,
    trainable_parameters,
)
from mambavlm.llm.tokenizer import build_tiny_tokenizer
from mambavlm.model import MambaVLM, build_model

ROOT = Path(__file__).resolve().parents[1]
TINY_LLAMA = {
    "vocab_size": 1024,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "initializer_range": 0.1,
}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(**TINY_LLAMA)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def tiny_vlm(seed: int = 0):
    torch.manual_seed(seed)
    llm = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_LLAMA.items()) + "}"
    return build_model(ROOT / "configs/model/tiny.yaml", ["llm.family=llama", f"llm.config={llm}"]).eval()


def mixer_names(layers: list[int], attributes: list[str]) -> set[str]:
    return {f"model.layers.{i}.self_attn.mixer.{a}" for i in layers for a in attributes}


NEW = ["in_proj_dt.weight", "dt_bias", "A_log", "conv1d.weight", "conv1d.bias", "in_proj_z.weight", "norm.weight"]
XBC = ["in_proj_x.weight", "in_proj_B.weight", "in_proj_C.weight"]


def test_trainable_sets_per_stage() -> None:
    hybrid = convert_llama(tiny_llama(), "head-interleaved:2", "mmmamba")  # Mamba-2 in layers 1, 3; no D
    expected = {
        "stage1": mixer_names([1, 3], NEW),
        "stage2": mixer_names([1, 3], NEW + XBC),
        "stage3": mixer_names([1, 3], NEW + XBC + ["out_proj.weight"]),
        "matvlm": mixer_names([1, 3], NEW + XBC + ["out_proj.weight"]),
    }
    for stage, names in expected.items():
        assert trainable_parameters(hybrid, stage) == names, stage
    # MaTVLM seeding adds the skip D, a new parameter (trained from stage 1 on).
    matvlm_seeded = convert_llama(tiny_llama(), "list:0", "matvlm")
    assert trainable_parameters(matvlm_seeded, "stage1") == mixer_names([0], NEW + ["D"])


def test_trainable_sets_of_a_vlm_student() -> None:
    student = convert_vlm(tiny_vlm(), "list:2", "mmmamba")
    projector = {f"projector.{n}" for n, _ in student.projector.named_parameters()}
    llm_mixer = {f"llm.{n}" for n in mixer_names([2], NEW + XBC + ["out_proj.weight"])}
    assert trainable_parameters(student, "stage3") == llm_mixer
    assert trainable_parameters(student, "matvlm") == llm_mixer | projector
    names = set_trainable(student, "matvlm")
    assert {n for n, p in student.named_parameters() if p.requires_grad} == names
    with pytest.raises(ValueError, match="unknown distillation stage"):
        trainable_parameters(student, "stage4")
    with pytest.raises(ValueError, match="no Mamba-2 mixers"):
        trainable_parameters(tiny_llama(), "stage1")


def batch_of(ids: torch.Tensor, lengths: list[int]) -> dict:
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor(lengths)[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": None}


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3", "matvlm"])
def test_gradients_reach_exactly_the_trainable_set(stage: str) -> None:
    teacher = tiny_llama().requires_grad_(False)
    student = convert_llama(teacher, "list:1,2", "matvlm")
    names = set_trainable(student, stage)
    ids = torch.randint(0, 1024, (2, 10), generator=torch.Generator().manual_seed(0))
    loss, parts = distill_loss(stage, teacher, student, batch_of(ids, [10, 7]), LossWeights(gamma=0.5))
    loss.backward()
    with_grad = {n for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == names
    assert set(parts) == {"stage1": {"layer"}, "stage2": {"layer"}, "stage3": {"kl"}, "matvlm": {"layer", "kl", "ce"}}[stage]


def test_matvlm_stage_trains_the_projector_of_a_vlm_student() -> None:
    """With images in the batch, MaTVLM's loss reaches the student's projector (its own embedding)."""
    from PIL import Image

    teacher = tiny_vlm().requires_grad_(False)
    student = convert_vlm(teacher, "list:0,3", "matvlm")
    names = set_trainable(student, "matvlm")
    ids = torch.tensor([student.build_prompt_ids("what color is the circle ?", with_image=True)] * 2)
    pixels = student.preprocess_images([Image.new("RGB", (24, 24), c) for c in ((200, 0, 0), (0, 0, 200))])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "pixel_values": pixels}
    loss, _ = distill_loss("matvlm", teacher, student, batch)
    loss.backward()
    assert {n for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0} == names
    assert any(n.startswith("projector.") for n in names)


@torch.no_grad()
def test_layerwise_losses_match_a_direct_computation() -> None:
    """Stage-1 MSE and MaTVLM's L2 term against the teacher's attention recomputed from its hidden states."""
    teacher = tiny_llama()
    student = convert_llama(teacher, "list:1,3", "mmmamba")
    for p in mamba_mixers(student)[3].parameters():
        p.add_(0.05)
    ids = torch.randint(0, 1024, (2, 9), generator=torch.Generator().manual_seed(1))
    batch = batch_of(ids, [9, 6])
    hidden = teacher(input_ids=ids, attention_mask=batch["attention_mask"], output_hidden_states=True).hidden_states
    rope = teacher.model.rotary_emb(hidden[0], torch.arange(9)[None])
    mask = batch["attention_mask"].bool()
    mse = l2 = 0.0
    for i, mixer in mamba_mixers(student).items():
        layer = teacher.model.layers[i]
        x = layer.input_layernorm(hidden[i])
        diff = mixer(x) - layer.self_attn(x, position_embeddings=rope, attention_mask=None)[0]
        mse += F.mse_loss(diff[mask], torch.zeros_like(diff[mask]))
        l2 += torch.linalg.vector_norm(diff[mask], dim=-1).mean()
    loss, _ = distill_loss("stage1", teacher, student, batch)
    torch.testing.assert_close(loss, mse, rtol=1e-4, atol=1e-9)
    _, parts = distill_loss("matvlm", teacher, student, batch)
    assert parts["layer"] == pytest.approx(float(l2), rel=1e-4)
    with tap_attention(teacher, [1]) as taps:
        teacher(input_ids=ids)
    torch.testing.assert_close(taps.inputs[1], teacher.model.layers[1].input_layernorm(
        teacher(input_ids=ids, output_hidden_states=True).hidden_states[1]))


def test_logit_kl_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    for temperature in (1.0, 2.0):
        kl = torch.distributions.kl_divergence(
            torch.distributions.Categorical(logits=teacher / temperature),
            torch.distributions.Categorical(logits=student / temperature),
        )
        expected = temperature**2 * kl[mask.bool()].mean()
        torch.testing.assert_close(logit_kl(student, teacher, mask, temperature), expected)
    assert float(logit_kl(teacher, teacher, mask)) == pytest.approx(0.0, abs=1e-6)


def test_stage_and_distill_configs() -> None:
    with pytest.raises(ValueError, match="alpha weigh the matvlm loss"):
        DistillStageConfig(name="stage1", max_steps=1, lr=1e-3, alpha=0.5)
    with pytest.raises(ValueError, match="warmup_ratio \\+ decay_ratio"):
        DistillStageConfig(name="stage2", max_steps=1, lr=1e-3, warmup_ratio=0.6, decay_ratio=0.5)
    with pytest.raises(ValueError, match="no loss"):
        DistillStageConfig(name="matvlm", max_steps=1, lr=1e-3, alpha=0, beta=0)
    data = ["data.train=x.json"]
    hovle = load_distill_config(ROOT / "configs/distill/hovle-interval4.yaml", data)
    assert [s.name for s in hovle.stages] == ["stage1", "stage2", "stage3"]
    assert [s.lr for s in hovle.stages] == [1e-3, 5e-4, 5e-5]
    assert hovle.layout.attention_layers(32) == [0, 4, 8, 12, 16, 20, 24, 28]
    matvlm = load_distill_config(ROOT / "configs/distill/matvlm-25.yaml", data)
    assert [s.name for s in matvlm.stages] == ["matvlm"] and matvlm.seeding == "matvlm"
    assert matvlm.layout.mamba_layers(32) == [0, 4, 8, 12, 16, 20, 24, 28]
    tiny = load_distill_config(ROOT / "configs/distill/tiny.yaml", ["layout=linear", "stages.2.lr=1e-4"])
    assert tiny.layout.mamba_layers(4) == [0, 1, 2, 3] and tiny.stages[2].lr == 1e-4
    assert DistillConfig.model_validate(tiny.model_dump(mode="json")) == tiny  # what runs write to config.yaml
    with pytest.raises(ConfigError, match="layout"):
        load_distill_config(ROOT / "configs/distill/tiny.yaml", ["layout=every-other:2"])


def load_distill_script():
    spec = importlib.util.spec_from_file_location("distill_script", ROOT / "train/distill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stage_overrides(*stages: tuple[str, float]) -> list[str]:
    """Short stages on one fixed micro-batch (num_train = batch size), so each stage's loss curve is
    that of plain optimisation."""
    listed = ", ".join(
        f"{{name: {name}, max_steps: 8, lr: {lr}, global_batch_size: 4, micro_batch_size: 4}}" for name, lr in stages
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
    tiny_vlm().save_pretrained(tmp_path / "teacher")
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

    tiny_llama().save_pretrained(tmp_path / "teacher")
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
        f"data={{train: {train}, val: {val}}}", *stage_overrides(("stage1", 1e-2), ("matvlm", 3e-3)),
    ])
    check_metrics(metrics, out, ["stage1", "matvlm"])
    student = HybridLlamaForCausalLM.from_pretrained(out / "student")
    assert student.mamba_layers == [0, 1, 2, 3]
