"""Freezing presets, optimiser parameter groups (no decay on norms, biases, 1-D tensors) and the
warmup-then-cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mambavlm.model import build_model
from mambavlm.training import apply_freeze_policy, build_scheduler, parameter_groups
from tests.conftest import ROOT, TINY_MODEL


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
    # by name: biases, LayerNorm/RMSNorm parameters, and the SSM's A_log, D and dt bias (2-D and 3-D here)
    ssm = {n for n in projector if n.rsplit(".", 1)[-1] in ("A_log", "D", "dt_proj_bias")}
    assert len(ssm) == 3
    no_decay = {n for n, p in projector.items() if n.endswith(".bias") or "norm" in n or n in ssm}
    assert all(projector[n].ndim >= 2 for n in ssm)
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


def test_weight_decay_exempts_what_mamba_ssm_exempts_in_the_paper_model():
    """MambaVLM-2.8B on the meta device, fine-tuning preset: the exact names without weight decay."""
    with torch.device("meta"):
        model = build_model(ROOT / "configs/model/mambavlm-2.8b.yaml", load_weights=False, load_tokenizer=False)
    apply_freeze_policy(model, "finetune")
    groups = parameter_groups(model, weight_decay=0.1)
    by_id = {id(p): name for name, p in model.named_parameters()}
    exempt = {by_id[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    expected = {"llm.backbone.norm_f.weight"} | {
        f"projector.first.{name}"
        for name in ("A_log", "D", "dt_proj_bias", "conv2d.bias", "out_norm.weight", "out_norm.bias")
    }
    for i in range(64):
        layer = f"llm.backbone.layers.{i}"
        expected |= {f"{layer}.norm.weight"}
        expected |= {f"{layer}.mixer.{name}" for name in ("A_log", "D", "conv1d.bias", "dt_proj.bias")}
    assert exempt == expected
    assert model.llm.backbone.layers[0].mixer.A_log.ndim == 2 and model.projector.first.A_log.ndim == 3


def test_the_optimizer_is_fused_adamw_with_foreach_adamws_update(tiny_model):
    """build_optimizer(fused=True), the trainer's choice on CUDA (fewer passes over the weights): three
    steps from the same gradients give the default (foreach) implementation's weights to rounding; by
    default (the CPU's) it is the default implementation."""
    import copy

    from mambavlm.training.optim import build_optimizer

    twin = copy.deepcopy(tiny_model)
    start = copy.deepcopy(tiny_model.state_dict())
    fused = build_optimizer(tiny_model, lr=1e-2, weight_decay=0.1, fused=True)
    plain = torch.optim.AdamW(parameter_groups(twin, 0.1), lr=1e-2, foreach=True)
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    assert not build_optimizer(twin, lr=1e-2, weight_decay=0.1).defaults["fused"]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(tiny_model.parameters(), twin.parameters(), strict=True):
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=generator)
                q.grad = p.grad.clone()
        fused.step()
        plain.step()
    moved = 0
    for (name, p), q in zip(tiny_model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        moved += not torch.equal(p, start[name])
    assert moved == sum(p.requires_grad for p in tiny_model.parameters())
