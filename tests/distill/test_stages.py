"""Distillation stages: the trainable set of each stage, gradients reach exactly it, and the stage
losses (layer-wise MSE / L2, logit KL) against direct computations."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from mambavlm.distill.convert import convert_llama, convert_vlm
from mambavlm.distill.stages import (
    DistillationModule,
    DistillationObjective,
    LossWeights,
    distill_loss,
    logit_kl,
    set_trainable,
    tap_attention,
    trainable_parameters,
)
from mambavlm.llm.hybrid import mamba_mixers
from tests.conftest import DISTILL_LLAMA, tiny_llama, tiny_llama_vlm


def mixer_names(layers: list[int], attributes: list[str]) -> set[str]:
    return {f"model.layers.{i}.self_attn.mixer.{a}" for i in layers for a in attributes}


NEW = ["in_proj_dt.weight", "dt_bias", "A_log", "conv1d.weight", "conv1d.bias", "in_proj_z.weight", "norm.weight"]
XBC = ["in_proj_x.weight", "in_proj_B.weight", "in_proj_C.weight"]


def test_trainable_sets_per_stage() -> None:
    # Mamba-2 in layers 1, 3; no D
    hybrid = convert_llama(tiny_llama(**DISTILL_LLAMA), "head-interleaved:2", "mmmamba")
    expected = {
        "stage1": mixer_names([1, 3], NEW),
        "stage2": mixer_names([1, 3], NEW + XBC),
        "stage3": mixer_names([1, 3], NEW + XBC + ["out_proj.weight"]),
        "matvlm": mixer_names([1, 3], NEW + XBC + ["out_proj.weight"]),
    }
    for stage, names in expected.items():
        assert trainable_parameters(hybrid, stage) == names, stage
    # MaTVLM seeding adds the skip D, a new parameter (trained from stage 1 on).
    matvlm_seeded = convert_llama(tiny_llama(**DISTILL_LLAMA), "list:0", "matvlm")
    assert trainable_parameters(matvlm_seeded, "stage1") == mixer_names([0], NEW + ["D"])


def test_trainable_sets_of_a_vlm_student() -> None:
    student = convert_vlm(tiny_llama_vlm(**DISTILL_LLAMA), "list:2", "mmmamba")
    projector = {f"projector.{n}" for n, _ in student.projector.named_parameters()}
    llm_mixer = {f"llm.{n}" for n in mixer_names([2], NEW + XBC + ["out_proj.weight"])}
    assert trainable_parameters(student, "stage3") == llm_mixer
    assert trainable_parameters(student, "matvlm") == llm_mixer | projector
    names = set_trainable(student, "matvlm")
    assert {n for n, p in student.named_parameters() if p.requires_grad} == names
    with pytest.raises(ValueError, match="unknown distillation stage"):
        trainable_parameters(student, "stage4")
    with pytest.raises(ValueError, match="no Mamba-2 mixers"):
        trainable_parameters(tiny_llama(**DISTILL_LLAMA), "stage1")


def batch_of(ids: torch.Tensor, lengths: list[int]) -> dict:
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor(lengths)[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": None}


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3", "matvlm"])
def test_gradients_reach_exactly_the_trainable_set(stage: str) -> None:
    teacher = tiny_llama(**DISTILL_LLAMA).requires_grad_(False)
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

    teacher = tiny_llama_vlm(**DISTILL_LLAMA).requires_grad_(False)
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
    teacher = tiny_llama(**DISTILL_LLAMA)
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


def test_stage3_public_code_trains_what_mmmambas_config_lists() -> None:
    """mmMamba's public stage-3 config: gate, dt projection, conv, D, gate norm, W_Q (C) and W_K (B);
    not W_V (x), W_O (out_proj), a or dt_bias, which the paper's stage 3 trains."""
    hybrid = convert_llama(tiny_llama(**DISTILL_LLAMA), "list:1,3", "matvlm")
    public = ["in_proj_z.weight", "in_proj_dt.weight", "conv1d.weight", "conv1d.bias", "D", "norm.weight",
              "in_proj_C.weight", "in_proj_B.weight"]
    assert trainable_parameters(hybrid, "stage3", "public_code") == mixer_names([1, 3], public)
    paper = trainable_parameters(hybrid, "stage3")
    assert paper - trainable_parameters(hybrid, "stage3", "public_code") == mixer_names(
        [1, 3], ["in_proj_x.weight", "out_proj.weight", "A_log", "dt_bias"]
    )
    with pytest.raises(ValueError, match="stage1 has no public_code variant"):
        trainable_parameters(hybrid, "stage1", "public_code")


@torch.no_grad()
def test_matvlm_public_code_loss_matches_a_direct_computation() -> None:
    """MaTVLM's code: each Mamba-2 decoder layer fed the teacher's layer input, the Frobenius norm of its
    output minus the teacher's layer output (whole batch, padding included), summed; KL batchmean; CE."""
    teacher = tiny_llama(**DISTILL_LLAMA)
    student = convert_llama(teacher, "list:1,2", "matvlm", torch.Generator().manual_seed(0))
    ids = torch.randint(0, 1024, (2, 9), generator=torch.Generator().manual_seed(1))
    batch = batch_of(ids, [9, 6])
    weights = LossWeights(alpha=1.0, beta=0.5, gamma=0.25, temperature=2.0)
    loss, parts = distill_loss("matvlm", teacher, student, batch, weights, variant="public_code")

    mask = batch["attention_mask"]
    hidden = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    layer = 0.0
    for i in (1, 2):
        out = student.model.layers[i](hidden[i], mamba_padding_mask=mask)
        out = out[0] if isinstance(out, tuple) else out
        layer += ((out - hidden[i + 1]) ** 2).sum().sqrt().item()
    student_out = student(input_ids=ids, attention_mask=mask, labels=batch["labels"])
    teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits
    p_t = F.softmax(teacher_logits / 2.0, dim=-1)
    kl = (p_t * (p_t.log() - F.log_softmax(student_out.logits / 2.0, dim=-1))).sum() / 2 * 2.0**2
    assert parts["layer"] == pytest.approx(layer, rel=1e-5)
    assert parts["kl"] == pytest.approx(kl.item(), rel=1e-5)
    assert parts["ce"] == pytest.approx(student_out.loss.item(), rel=1e-5)
    assert loss.item() == pytest.approx(layer + 0.5 * kl.item() + 0.25 * student_out.loss.item(), rel=1e-5)


@torch.no_grad()
def test_stage3_public_code_keeps_the_papers_loss() -> None:
    """mmMamba's public stage-3 config changes only which parameters train: the loss and its parts equal
    the paper variant's (before the fix it took MaTVLM's batchmean KL, summed over tokens and the
    vocabulary: 55.2 against 0.43 on the tiny teacher)."""
    teacher, student, batch = _distill_case()
    num_items = torch.tensor([17.0, 5.0, 1.0])
    for items in (None, num_items):
        paper = distill_loss("stage3", teacher, student, batch, num_items=items)
        public = distill_loss("stage3", teacher, student, batch, num_items=items, variant="public_code")
        assert public[1] == paper[1] and torch.equal(public[0], paper[0])
    mask = batch["attention_mask"]
    kl = logit_kl(student(input_ids=batch["input_ids"], attention_mask=mask).logits,
                  teacher(input_ids=batch["input_ids"], attention_mask=mask).logits, mask, 1.0, None)
    assert paper[1]["kl"] != pytest.approx(0.0) and distill_loss("stage3", teacher, student, batch)[1]["kl"] \
        == pytest.approx(kl.item(), rel=1e-5)


@pytest.mark.parametrize("masked", [True, False])
def test_num_items_are_counted_on_the_batchs_device(masked: bool) -> None:
    """(real tokens, answer tokens, 1) by hand, on the device the batch is on: the meta device stands
    in for CUDA here (a count made on the CPU cannot be stacked with it; this failed on the GPUs)."""
    teacher = tiny_llama(**DISTILL_LLAMA).requires_grad_(False)
    objective = DistillationObjective(DistillationModule(convert_llama(teacher, "list:1", "matvlm"), teacher), "stage1")
    ids = torch.arange(20).reshape(2, 10)
    batch = batch_of(ids, [10, 7])
    batch["labels"][:, :4] = -100
    if not masked:
        batch["attention_mask"] = None
    expected = [17.0 if masked else 20.0, 6.0 + 3.0, 1.0]  # answers: positions 4..9 of row 0, 4..6 of row 1
    assert objective.num_items(batch).tolist() == expected
    meta = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    assert objective.num_items(meta).device.type == "meta"


def _distill_case() -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    teacher = tiny_llama(**DISTILL_LLAMA).requires_grad_(False)
    student = convert_llama(teacher, "list:1,2", "matvlm", torch.Generator().manual_seed(0))
    ids = torch.randint(0, 1024, (2, 10), generator=torch.Generator().manual_seed(0))
    return teacher, student, batch_of(ids, [10, 7])


def _stage_losses_and_gradients(module: torch.nn.Module, student: torch.nn.Module, batch: dict,
                                full_gradients: Callable[[], contextlib.AbstractContextManager]) -> dict:
    """stage 1 and MaTVLM's stage (its mixers run twice: layer loss and the student's forward): each
    stage's loss and the full gradient of every trainable student parameter."""
    results = {}
    for stage in ("stage1", "matvlm"):
        names = set_trainable(student, stage)
        module.zero_grad(set_to_none=True)
        loss, _ = module(batch, stage=stage, weights=LossWeights(gamma=0.5))
        loss.backward()
        with full_gradients():
            grads = {n.replace("_fsdp_wrapped_module.", ""): p.grad.clone()
                     for n, p in student.named_parameters() if n in names}
        results[stage] = {"loss": loss.detach(), "grads": grads}
    return results


def _fsdp_distillation(rank: int, world: int, init_file: str, out: str, layer_classes: list[str] | None,
                       standalone: bool) -> None:
    """One of 2 gloo processes: the student FSDP-wrapped as accelerate wraps it (transformer-based
    policy, use_orig_params, full shard), both processes on the whole batch."""
    import torch.distributed as dist
    from accelerate import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from mambavlm.training.engine import require_standalone_fsdp_units

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    PartialState()
    teacher, student, batch = _distill_case()
    module = DistillationModule(student, teacher)
    set_trainable(student, "stage1")
    plugin = FullyShardedDataParallelPlugin(auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=layer_classes)
    if standalone:
        require_standalone_fsdp_units(plugin, module)
    plugin.set_auto_wrap_policy(module)
    wrapped = FSDP(module, auto_wrap_policy=plugin.auto_wrap_policy, use_orig_params=True,
                   device_id=torch.device("cpu"))
    try:
        results = _stage_losses_and_gradients(
            wrapped, student, batch, lambda: FSDP.summon_full_params(wrapped, with_grads=True))
    except RuntimeError as error:
        results = {"error": str(error)}
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("layer_classes", [None, ["LlamaDecoderLayer"]], ids=["no_split_modules", "named"])
def test_distillation_under_fsdp_equals_unsharded(tmp_path, layer_classes: list[str] | None) -> None:
    """Under FSDP (2 CPU processes, gloo) the stage losses and the gathered gradients equal the unsharded
    ones, with the decoder layers the units (accelerate's default from ``_no_split_modules``, or named
    in the config). The layer loss calls each Mamba-2 mixer outside its decoder layer: without the mixers
    as units of their own (``require_standalone_fsdp_units``) their parameters are 1-D shards there
    (2 H200s failed so), and the loss cannot even be computed."""
    import torch.multiprocessing as mp

    teacher, student, batch = _distill_case()
    module = DistillationModule(student, teacher)
    want = _stage_losses_and_gradients(module, student, batch, contextlib.nullcontext)
    for standalone in (True, False):
        out = tmp_path / f"standalone{standalone}.pt"
        mp.spawn(_fsdp_distillation, args=(2, str(tmp_path / f"init{standalone}"), str(out), layer_classes, standalone),
                 nprocs=2)
        got = torch.load(out, weights_only=True)
        if not standalone:
            assert "size mismatch" in got.get("error", ""), got.keys()
            continue
        for stage, expected in want.items():
            torch.testing.assert_close(got[stage]["loss"], expected["loss"], rtol=1e-5, atol=0)
            assert got[stage]["grads"].keys() == expected["grads"].keys()
            for name, grad in expected["grads"].items():
                assert grad.abs().sum() > 0, name
                torch.testing.assert_close(got[stage]["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_standalone_fsdp_units_need_a_layer_based_wrap() -> None:
    """NO_WRAP (one unit) is left as it is; the class names (from ``_no_split_modules`` when the config
    names none) or an already resolved policy gain the mixer; a size-based wrap cannot promise them."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    from mambavlm.config import ConfigError
    from mambavlm.training.engine import require_standalone_fsdp_units

    teacher, student, _ = _distill_case()
    module = DistillationModule(student, teacher)
    plugin = FullyShardedDataParallelPlugin(auto_wrap_policy="no_wrap")
    require_standalone_fsdp_units(plugin, module)
    assert plugin.auto_wrap_policy is None
    plugin = FullyShardedDataParallelPlugin(auto_wrap_policy="transformer_based_wrap")
    require_standalone_fsdp_units(plugin, module)
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer", "Mamba2Mixer"]
    resolved = FullyShardedDataParallelPlugin(auto_wrap_policy="transformer_based_wrap",
                                              transformer_cls_names_to_wrap=["LlamaDecoderLayer"])
    resolved.set_auto_wrap_policy(module)  # as an earlier accelerate.prepare leaves it
    require_standalone_fsdp_units(resolved, module)
    layer_classes = resolved.auto_wrap_policy.keywords["transformer_layer_cls"]
    assert {cls.__name__ for cls in layer_classes} == {"LlamaDecoderLayer", "Mamba2Mixer"}
    with pytest.raises(ConfigError, match="calls its Mamba2Mixer modules on their own.*TRANSFORMER_BASED_WRAP"):
        require_standalone_fsdp_units(FullyShardedDataParallelPlugin(auto_wrap_policy="size_based_wrap"), module)
