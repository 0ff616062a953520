"""Distillation stages: which student parameters train, and each stage's loss against the frozen teacher.

Stages (mmMamba sec. 4.2-4.4, MaTVLM sec. 3.3); "new" mixer parameters are the ones attention lacks:
W_gamma (``in_proj_dt``), a (``A_log``), ``dt_bias``, ``D``, the conv and the gate (``in_proj_z``, ``norm``).

=========  =====================================================  ===========================================
stage      trains                                                 loss
=========  =====================================================  ===========================================
stage1     new mixer parameters                                   sum_l MSE(Attn_l(X_l), Mamba2_l(X_l))
stage2     new + x/B/C projections (W_V, W_K, W_Q)                the same
stage3     every mixer parameter (out_proj = W_O too)             KL(P_teacher || P_student) on the logits
matvlm     every mixer parameter + the projector (connector)      alpha * sum_l mean_t ||Attn_l - Mamba2_l||_2
                                                                  + beta * T^2 * KL(P_t || P_s) + gamma * CE
=========  =====================================================  ===========================================

X_l is the TEACHER's input to its attention in layer l (collected with forward hooks), so each
student mixer is trained on exactly what the teacher's attention saw; Attn_l(X_l) is that attention's
output. Embeddings, norms, MLPs, kept attention layers, the LM head and the vision encoders never
train. For the logit losses student and teacher see the same input: the student embeds it with its
own (copied) vision + projector, which for stage 3 equal the teacher's, and for MaTVLM let the
connector learn. Token reductions average over real tokens (attention_mask = 1) — over the whole
optimiser step's real tokens under the training engine, so that micro-batching does not change them
(the CE term likewise over the step's answer tokens).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from mambavlm.llm.hybrid import mamba_mixers
from mambavlm.llm.mamba2 import Mamba2Mixer
from mambavlm.training.objectives import answer_tokens

__all__ = [
    "STAGES",
    "DistillationModule",
    "DistillationObjective",
    "LossWeights",
    "StageName",
    "StageTrainable",
    "Variant",
    "decoder_layer_loss",
    "tap_decoder_layers",
    "TeacherAttentionTaps",
    "distill_loss",
    "embed_inputs",
    "language_model",
    "layerwise_loss",
    "logit_kl",
    "set_trainable",
    "tap_attention",
    "trainable_parameters",
]

StageName = Literal["stage1", "stage2", "stage3", "matvlm"]
STAGES: tuple[str, ...] = get_args(StageName)

NEW_MIXER_PARAMETERS = frozenset({"in_proj_dt", "dt_bias", "A_log", "D", "conv1d", "in_proj_z", "norm"})
"""Top-level mixer attributes with no counterpart in attention (trained from stage 1 on)."""
INHERITED_XBC = frozenset({"in_proj_x", "in_proj_B", "in_proj_C"})
"""The projections seeded from W_V, W_K, W_Q (trained from stage 2 on)."""


MMMAMBA_CODE_STAGE3 = frozenset({"in_proj_z", "in_proj_dt", "conv1d", "D", "norm", "in_proj_C", "in_proj_B"})
"""What mmMamba's public stage-3 config trains (``trainable_weights``: g_proj, in_proj, conv, D, g_norm,
q_proj, k_proj): not W_V (x), W_O (out_proj), a (A_log) or dt_bias, which its paper's stage 3 trains."""

Variant = Literal["paper", "public_code"]
"""``paper``: the stage as the paper's equations define it; ``public_code``: as the authors' code runs it
(stage3: mmMamba's config's trainable set; matvlm: the layer loss at decoder-layer outputs with the
code's reductions). Stages 1 and 2 have one definition."""


def _check_stage(stage: str, variant: str = "paper") -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown distillation stage {stage!r}; expected one of {', '.join(STAGES)}")
    if variant not in ("paper", "public_code"):
        raise ValueError(f"unknown stage variant {variant!r}; expected 'paper' or 'public_code'")
    if variant == "public_code" and stage in ("stage1", "stage2"):
        raise ValueError(f"{stage} has no public_code variant: the paper and the code agree on it")


def _mixer_parameter_trains(stage: str, attribute: str, variant: str) -> bool:
    if stage == "stage1":
        return attribute in NEW_MIXER_PARAMETERS
    if stage == "stage2":
        return attribute in NEW_MIXER_PARAMETERS | INHERITED_XBC
    if stage == "stage3" and variant == "public_code":
        return attribute in MMMAMBA_CODE_STAGE3
    return True


def trainable_parameters(model: nn.Module, stage: str, variant: Variant = "paper") -> set[str]:
    """Names (as in ``model.named_parameters()``) of the parameters ``stage`` trains.

    ``model`` is the student: a hybrid LLM, or a MambaVLM holding one (whose ``projector.*``
    parameters train in the ``matvlm`` stage). ``variant``: see ``Variant``.
    """
    _check_stage(stage, variant)
    names: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, Mamba2Mixer):
            for name, _ in module.named_parameters():
                if _mixer_parameter_trains(stage, name.split(".")[0], variant):
                    names.add(f"{prefix}.{name}")
    if not names:
        raise ValueError(f"{type(model).__name__} has no Mamba-2 mixers: convert it to a hybrid first")
    if stage == "matvlm" and isinstance(getattr(model, "projector", None), nn.Module):
        names |= {f"projector.{name}" for name, _ in model.projector.named_parameters()}
    return names


def set_trainable(model: nn.Module, stage: str, variant: Variant = "paper") -> set[str]:
    """requires_grad = True exactly for ``trainable_parameters(model, stage, variant)``; returns those names."""
    names = trainable_parameters(model, stage, variant)
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    return names


def language_model(model: nn.Module) -> PreTrainedModel:
    """The causal LM of a MambaVLM (``.llm``) or the model itself."""
    llm = getattr(model, "llm", model)
    if not isinstance(llm, PreTrainedModel):
        raise TypeError(f"expected a MambaVLM or a transformers causal LM, got {type(model).__name__}")
    return llm


def embed_inputs(model: nn.Module, input_ids: Tensor, pixel_values: Sequence[Tensor] | None) -> Tensor:
    """input_ids (B, L) (+ images for a MambaVLM) -> inputs_embeds (B, L, D)."""
    if hasattr(model, "embed") and hasattr(model, "llm"):
        return model.embed(input_ids, pixel_values)
    if pixel_values is not None:
        raise ValueError(f"{type(model).__name__} is a text-only LM but the batch holds images")
    return model.get_input_embeddings()(input_ids)


def _decoder_layers(llm: PreTrainedModel) -> nn.ModuleList:
    layers = getattr(getattr(llm, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(llm).__name__} has no model.layers: a LLaMA-family decoder is needed")
    return layers


@dataclass
class TeacherAttentionTaps:
    """What the teacher's attention in each tapped layer saw and returned: (B, L, D) each."""

    inputs: dict[int, Tensor]
    outputs: dict[int, Tensor]


@contextmanager
def _tap(modules: dict[int, nn.Module]) -> Iterator[TeacherAttentionTaps]:
    """Forward hooks recording each module's input hidden states and output (detached), by layer index."""
    taps = TeacherAttentionTaps({}, {})
    handles = []

    def hook(index: int) -> Any:
        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            taps.inputs[index] = hidden.detach()
            taps.outputs[index] = (output[0] if isinstance(output, tuple) else output).detach()

        return record

    try:
        for index, module in modules.items():
            handles.append(module.register_forward_hook(hook(index), with_kwargs=True))
        yield taps
    finally:
        for handle in handles:
            handle.remove()


def tap_attention(llm: PreTrainedModel, layers: Sequence[int]) -> AbstractContextManager[TeacherAttentionTaps]:
    """Forward hooks on ``llm.model.layers[i].self_attn`` for i in ``layers`` that record its input
    hidden states and its output (detached) during the forwards run inside the ``with`` block."""
    decoder = _decoder_layers(llm)
    return _tap({i: decoder[i].self_attn for i in layers})


def tap_decoder_layers(llm: PreTrainedModel, layers: Sequence[int]) -> AbstractContextManager[TeacherAttentionTaps]:
    """As ``tap_attention``, on the whole decoder layers ``llm.model.layers[i]``: what enters the layer
    and what leaves it (after the MLP and both residual adds)."""
    decoder = _decoder_layers(llm)
    return _tap({i: decoder[i] for i in layers})


def decoder_layer_loss(student_llm: PreTrainedModel, taps: TeacherAttentionTaps, attention_mask: Tensor | None) -> Tensor:
    """MaTVLM's public code's layer loss: each Mamba-2 decoder layer l of the student, fed the teacher's
    input to layer l, against the teacher's output of layer l, as ``torch.norm(diff, p=2)`` over the
    whole micro-batch (batch, tokens and channels, padding included), summed over the layers."""
    decoder = _decoder_layers(student_llm)
    total = None
    for i in sorted(taps.inputs):
        out = decoder[i](taps.inputs[i], mamba_padding_mask=attention_mask)
        out = out[0] if isinstance(out, tuple) else out
        term = torch.norm(out.float() - taps.outputs[i].float(), p=2)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no Mamba-2 layers to distill")
    return total


def real_tokens(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """The number of real (unpadded) tokens of a batch: what the layer and KL losses average over."""
    if attention_mask is not None:
        return attention_mask.sum()
    return torch.tensor(input_ids.numel(), device=input_ids.device)


def _masked_token_mean(values: Tensor, mask: Tensor | None, num_tokens: Tensor | None = None) -> Tensor:
    """values (B, L) summed over the positions where mask (B, L) is nonzero (all when None), divided by
    ``num_tokens`` (the step's real tokens), or by this batch's real tokens when None."""
    weights = torch.ones_like(values) if mask is None else mask.to(values.dtype)
    total = (values * weights).sum()
    return total / (weights.sum().clamp(min=1.0) if num_tokens is None else num_tokens)


def layerwise_loss(
    mixers: dict[int, nn.Module],
    taps: TeacherAttentionTaps,
    attention_mask: Tensor | None,
    kind: Literal["mse", "l2"],
    num_tokens: Tensor | None = None,
) -> Tensor:
    """Sum over Mamba-2 layers l of the distance between mixer_l(X_l) and the teacher's Attn_l(X_l).

    ``mse``: mean squared error over real tokens and channels (mmMamba Eq. 3/4); ``l2``: the L2 norm
    over channels averaged over real tokens (MaTVLM Eq. 9). The token average divides by
    ``num_tokens`` (the optimiser step's real tokens) when given, else by this batch's.
    """
    total = None
    for i, mixer in sorted(mixers.items()):
        if i not in taps.inputs:
            raise KeyError(f"no teacher activations for layer {i}: tap it with tap_attention")
        predicted = mixer(taps.inputs[i]).float()
        diff = predicted - taps.outputs[i].float()
        per_token = diff.pow(2).mean(-1) if kind == "mse" else diff.norm(dim=-1)
        term = _masked_token_mean(per_token, attention_mask, num_tokens)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no Mamba-2 layers to distill")
    return total


def logit_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    attention_mask: Tensor | None,
    temperature: float = 1.0,
    num_tokens: Tensor | None = None,
) -> Tensor:
    """T^2 * KL(P_teacher || P_student) with P = softmax(logits / T), averaged over real tokens (divided
    by ``num_tokens``, the optimiser step's real tokens, when given).

    logits (B, L, V); at T = 1 this is mmMamba's stage-3 loss, otherwise MaTVLM's Eq. 7.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="none").sum(-1)
    return temperature**2 * _masked_token_mean(per_token, attention_mask, num_tokens)


@dataclass(frozen=True)
class LossWeights:
    """MaTVLM's weights (alpha: layer, beta: KL, gamma: CE) and the KL temperature T."""

    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 0.0
    temperature: float = 1.0


def distill_loss(
    stage: str,
    teacher: nn.Module,
    student: nn.Module,
    batch: dict[str, Any],
    weights: LossWeights = LossWeights(),
    num_items: Tensor | None = None,
    variant: Variant = "paper",
) -> tuple[Tensor, dict[str, float]]:
    """One batch's loss for ``stage`` and its unweighted parts ({"layer", "kl", "ce"}, those used).

    teacher / student: MambaVLMs or LLaMA-family causal LMs (the student a hybrid); batch: the
    collator's ``input_ids``, ``attention_mask``, ``labels`` (B, L) and ``pixel_values``. The teacher
    runs without gradients. ``num_items`` (real tokens, answer tokens, micro-batches) of the whole
    optimiser step: the layer and KL parts are sums over real tokens divided by the first, the CE part a
    sum over answer tokens divided by the second; None averages over this batch alone.

    ``variant="public_code"``: for matvlm, MaTVLM's loss as its public code computes it (for stage3 the
    loss is the paper's: the variant changes only what trains, ``trainable_parameters``): the layer
    term at decoder-layer outputs (``decoder_layer_loss``), the KL with ``reduction="batchmean"``
    (summed over tokens and vocabulary, divided by the batch size, padding included), the CE the
    micro-batch's mean; each divided by the step's micro-batches (the code's mean over accumulation).
    """
    _check_stage(stage, variant)
    teacher_llm, student_llm = language_model(teacher), language_model(student)
    mixers = mamba_mixers(student_llm)
    if not mixers:
        raise ValueError(f"the student {type(student_llm).__name__} has no Mamba-2 layers: convert it first")
    input_ids, mask = batch["input_ids"], batch.get("attention_mask")
    pixel_values = batch.get("pixel_values")
    matvlm = stage == "matvlm"
    use_layer = stage in ("stage1", "stage2") or (matvlm and weights.alpha != 0)
    use_kl = stage == "stage3" or (matvlm and weights.beta != 0)
    use_ce = matvlm and weights.gamma != 0
    if not (use_layer or use_kl or use_ce):
        raise ValueError("alpha, beta and gamma are all 0: the matvlm loss is empty")

    public = matvlm and variant == "public_code"  # stage 3's variant changes what trains, not its loss
    tap = tap_decoder_layers if public else tap_attention
    with torch.no_grad():
        teacher_embeds = embed_inputs(teacher, input_ids, pixel_values)
        with tap(teacher_llm, sorted(mixers) if use_layer else []) as taps:
            if use_kl:
                teacher_logits = teacher_llm(inputs_embeds=teacher_embeds, attention_mask=mask, use_cache=False).logits
            elif use_layer:
                teacher_llm.model(inputs_embeds=teacher_embeds, attention_mask=mask, use_cache=False)

    num_tokens, num_answers = (None, None) if num_items is None else (num_items[0], num_items[1])
    per_micro_batch = 1.0 if num_items is None else num_items[2]
    parts: dict[str, Tensor] = {}
    if use_layer:
        if public:
            parts["layer"] = decoder_layer_loss(student_llm, taps, mask) / per_micro_batch
        else:
            parts["layer"] = layerwise_loss(mixers, taps, mask, "l2" if matvlm else "mse", num_tokens)
    if use_kl or use_ce:
        student_embeds = embed_inputs(student, input_ids, pixel_values) if matvlm else teacher_embeds
        labels = batch["labels"] if use_ce else None
        extra = {"num_items_in_batch": num_answers} if use_ce and num_answers is not None and not public else {}
        out = student_llm(inputs_embeds=student_embeds, attention_mask=mask, labels=labels, use_cache=False, **extra)
        temperature = weights.temperature if matvlm else 1.0
        if use_kl and public:
            log_p_s = F.log_softmax(out.logits.float() / temperature, dim=-1).flatten(0, 1)
            p_t = F.softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, 1)
            batchmean = F.kl_div(log_p_s, p_t, reduction="sum") / out.logits.shape[0]
            parts["kl"] = temperature**2 * batchmean / per_micro_batch
        elif use_kl:
            parts["kl"] = logit_kl(out.logits, teacher_logits, mask, temperature, num_tokens)
        if use_ce:
            parts["ce"] = out.loss / per_micro_batch if public else out.loss
    scale = {"layer": weights.alpha, "kl": weights.beta, "ce": weights.gamma} if matvlm else {}
    loss = sum(scale.get(name, 1.0) * value for name, value in parts.items())
    return loss, {k: float(v.detach()) for k, v in parts.items()}


class DistillationModule(nn.Module):
    """The trainable student with the frozen teacher beside it; ``forward(batch, num_items, stage,
    weights, variant) -> (loss, parts)`` (``distill_loss``).

    Only the student is a submodule, so optimisers, ``accelerate.prepare`` (DDP, FSDP) and
    checkpoints see the student's parameters alone (``student.*``); the teacher is a plain attribute
    and stays in eval mode. The stage is an argument of the forward, not of the module, so every stage
    of a run trains one module: under FSDP it is wrapped once and each stage keeps that wrapping.

    Under FSDP the student's blocks (its ``_no_split_modules``) are units, and so is every Mamba-2
    mixer (``fsdp_standalone_modules``): the layer loss calls each mixer outside its decoder layer's
    forward (``training.engine.require_standalone_fsdp_units``).
    """

    fsdp_standalone_modules: ClassVar[tuple[str, ...]] = (Mamba2Mixer.__name__,)

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        self.student = student
        object.__setattr__(self, "teacher", teacher)

    @property
    def _no_split_modules(self) -> list[str]:
        """The student's blocks: what accelerate's FSDP wraps when its config names no layer class."""
        return list(getattr(self.student, "_no_split_modules", None) or [])

    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(
        self,
        batch: dict[str, Any],
        num_items: Tensor | None = None,
        stage: str = "stage1",
        weights: LossWeights = LossWeights(),
        variant: Variant = "paper",
    ) -> tuple[Tensor, dict[str, float]]:
        return distill_loss(stage, self.teacher, self.student, batch, weights, num_items, variant)


@dataclass(frozen=True)
class DistillationObjective:
    """One stage's objective for the training engine (``mambavlm.training.Objective``): the stage's loss
    of ``module`` (a ``DistillationModule`` that every stage of the run shares), computed through the
    prepared wrapper (DDP / FSDP need the forward to go through it)."""

    module: DistillationModule
    stage: str
    weights: LossWeights = LossWeights()
    variant: Variant = "paper"

    def __post_init__(self) -> None:
        _check_stage(self.stage, self.variant)

    def num_items(self, batch: dict[str, Any]) -> Tensor:
        """(real tokens, answer tokens, 1 micro-batch) of the batch: what the stage's losses average over."""
        real = real_tokens(batch["input_ids"], batch.get("attention_mask"))
        one = torch.ones((), dtype=torch.float64, device=real.device)
        return torch.stack([real.to(torch.float64), answer_tokens(batch["labels"]).to(torch.float64), one])

    def loss(self, prepared: nn.Module, batch: dict[str, Any], num_items: Tensor) -> Tensor:
        return prepared(batch, num_items, stage=self.stage, weights=self.weights, variant=self.variant)[0]


@dataclass(frozen=True)
class StageTrainable:
    """The trainable-parameter policy of a stage for the engine: ``set_trainable`` on the objective's
    student; returns the names (relative to the student) that train."""

    stage: str
    variant: Variant = "paper"

    def __call__(self, module: nn.Module) -> set[str]:
        student = getattr(module, "student", module)
        return set_trainable(student, self.stage, self.variant)
