"""MambaVLM's Mamba-1 training forward (mamba_ssm's block layout, LM head at scored positions only)
against transformers' ``MambaForCausalLM`` forward on the same weights: the same loss and the same
gradient for every parameter, with and without gradient checkpointing and ``num_items_in_batch``;
on CUDA, mamba_ssm's fused add + RMSNorm kernel against the PyTorch path."""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable

import pytest
import torch

from mambavlm.model import MambaVLM
from tests.conftest import fixed_batch, needs_cuda, needs_mamba_ssm, tiny_vlm


def padded_batch(model: MambaVLM) -> dict:
    """Two prompts + answers, right-padded as the collator pads: the second row is 3 tokens shorter,
    its last 3 positions masked and unlabelled."""
    batch = fixed_batch(model)
    batch["attention_mask"][1, -3:] = 0
    batch["labels"][1, -3:] = -100
    batch["labels"][0, -4:] = batch["input_ids"][0, -4:]  # more scored tokens in row 0
    return batch


def left_padded_batch(model: MambaVLM) -> dict:
    """The second row's first 3 positions masked (left padding, as generation pads): the mixers must
    mask them, they come before real tokens."""
    batch = fixed_batch(model)
    batch["attention_mask"][1, :3] = 0
    batch["labels"][1, :3] = -100
    return batch


def test_right_padded_tells_the_collators_padding_apart() -> None:
    from mambavlm.llm.mamba_training import right_padded

    assert right_padded(torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]]))
    assert right_padded(torch.ones(2, 4, dtype=torch.long))
    assert not right_padded(torch.tensor([[1, 1, 1], [0, 1, 1]]))
    assert not right_padded(torch.tensor([[1, 0, 1]]))


def test_left_padded_batch_keeps_the_mask_and_equals_transformers() -> None:
    """A right-padded batch runs without the mask (test above); a left-padded one keeps it: the same
    loss and gradients as transformers' forward, which masks the pads' inputs."""
    model = tiny_vlm(train=True)
    reference = copy.deepcopy(model)
    batch = left_padded_batch(model)
    ours, our_grads = loss_and_grads(model, batch, True)
    theirs, their_grads = loss_and_grads(reference, batch, False)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def loss_and_grads(model: MambaVLM, batch: dict, fused_layout: bool, **kwargs) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    if fused_layout:
        loss = model(**batch, **kwargs).loss
    else:  # transformers' own forward on the same embeddings
        embeds = model.embed(batch["input_ids"], batch["pixel_values"])
        loss = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"],
                         **kwargs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("reentrant", [None, False, True], ids=["no-checkpointing", "non-reentrant", "reentrant"])
@pytest.mark.parametrize("num_items", [None, 7.0])
def test_training_forward_equals_transformers_loss_and_gradients(reentrant: bool | None, num_items: float | None) -> None:
    """Against a copy whose blocks never got the two-mode forward: transformers' forward as shipped."""
    model = tiny_vlm(train=True)
    reference = copy.deepcopy(model)
    assert model.training
    for m in (model, reference):
        if reentrant is not None:
            m.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    batch = padded_batch(model)
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    output = model(**batch, **kwargs)
    assert output.logits is None  # the fused-loss layout returns the loss only
    assert all("forward" in block.__dict__ for block in model.llm.backbone.layers)
    assert not any("forward" in block.__dict__ for block in reference.llm.backbone.layers)
    ours, our_grads = loss_and_grads(model, batch, True, **kwargs)
    theirs, their_grads = loss_and_grads(reference, batch, False, **kwargs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert our_grads.keys() == their_grads.keys() and any(".mixer.in_proj." in n for n in our_grads)
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_blocks_with_the_two_mode_forward_keep_transformers_forward_bit_for_bit() -> None:
    from mambavlm.llm.mamba_training import install_fused_blocks

    model = tiny_vlm()
    batch = padded_batch(model)
    embeds = model.embed(batch["input_ids"], batch["pixel_values"])
    before = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    install_fused_blocks(model.llm)
    after = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    assert torch.equal(before, after)
    clone = copy.deepcopy(model)  # the bound forward follows the copy, not the original
    assert clone.llm.backbone.layers[0].forward.__self__ is clone.llm.backbone.layers[0]
    assert clone.llm.backbone.layers[0].mixer.forward.__self__ is clone.llm.backbone.layers[0].mixer


def test_eval_mode_other_arguments_and_zero3_parameters_keep_transformers_forward() -> None:
    model = tiny_vlm()
    batch = padded_batch(model)
    output = model(**batch)
    assert output.logits is not None and output.logits.shape[:2] == batch["input_ids"].shape
    model.train()
    output = model(**batch, output_hidden_states=True)
    assert output.logits is not None and output.hidden_states is not None
    # a ZeRO-3 partitioned parameter (DeepSpeed marks each with ds_id): the blocks must run their own forward
    model.llm.backbone.layers[0].mixer.in_proj.weight.ds_id = 0
    assert model(**batch).logits is not None


@needs_cuda
@needs_mamba_ssm
@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_kernel_path_matches_the_pytorch_path_on_cuda(autocast: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 parameters, or float32 master weights under bf16 autocast (the paper recipe): the fused
    add + RMSNorm kernel against the same layout with PyTorch norms, loss and gradients."""
    import mamba_ssm.ops.triton.layer_norm as triton_norm

    calls = []
    kernel = triton_norm.layer_norm_fn
    monkeypatch.setattr(triton_norm, "layer_norm_fn", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    model = tiny_vlm(train=True)
    batch = padded_batch(model)
    dtype = torch.float32 if autocast else torch.bfloat16
    model = model.to("cuda", dtype)
    batch = {k: (v.to("cuda") if torch.is_tensor(v) else [p.to("cuda", dtype) for p in v]) for k, v in batch.items()}

    def run() -> tuple[torch.Tensor, dict]:
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            return loss_and_grads(model, batch, True, num_items_in_batch=torch.tensor(7.0))

    fused_loss, fused_grads = run()
    assert len(calls) == model.llm.config.num_hidden_layers  # every block boundary ran the kernel
    import mambavlm.llm.mamba_training as training

    real = training.add_rms_norm
    monkeypatch.setattr(training, "add_rms_norm", lambda *a, **k: real(*a, **{**k, "fused": False}))
    plain_loss, plain_grads = run()
    assert fused_loss.isfinite()
    torch.testing.assert_close(fused_loss, plain_loss, rtol=2e-2, atol=1e-2)
    for name, grad in plain_grads.items():
        cosine = torch.nn.functional.cosine_similarity(fused_grads[name].flatten().float(), grad.flatten().float(), dim=0)
        assert cosine > 0.99, (name, float(cosine))


@needs_cuda
@needs_mamba_ssm
@pytest.mark.gpu
def test_mixer_in_mamba_ssm_layout_equals_transformers_mixer_call_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """float32, a padded batch: ``mamba_inner_fn`` on ``W @ h^T`` (mamba_ssm's layout) against
    transformers' mixer call (``in_proj(h).transpose(1, 2)``), loss and every gradient; the same
    kernel, so they agree to summation order."""
    import mambavlm.llm.mamba_training as training

    calls = []
    real = training._mixer_forward
    monkeypatch.setattr(training, "_mixer_forward",
                        lambda self, *a, **k: calls.append(k.get("mamba_ssm_layout")) or real(self, *a, **k))
    model = tiny_vlm(train=True)
    batch = {k: (v.to("cuda") if torch.is_tensor(v) else [p.to("cuda") for p in v])
             for k, v in padded_batch(model).items()}  # made on the CPU, as the collator makes it
    model.to("cuda")
    training.use_training_scan(model.llm, "mamba_ssm")
    reference = copy.deepcopy(model)
    ours, our_grads = loss_and_grads(model, batch, True)
    assert calls and all(calls)  # every mixer ran in mamba_ssm's layout
    monkeypatch.setattr(training, "_mixer_forward",
                        lambda self, *a, **k: real(self, *a, **{**k, "mamba_ssm_layout": False}))
    theirs, their_grads = loss_and_grads(reference, batch, True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_a_wrapped_in_proj_is_called_as_a_module_in_mamba_ssms_layout() -> None:
    """``in_proj`` as ``mamba_inner_fn`` gets it: ``W @ h^T`` for a plain linear layer, and for peft's
    LoRA layer (its adapter trained away from zero) the layer's own output, adapter included, not its
    base weight's product."""
    pytest.importorskip("peft")
    import mambavlm.llm.mamba_training as training
    from mambavlm.training.config import LoraSettings
    from mambavlm.training.lora import apply_lora

    model = tiny_vlm(train=True)
    mixer = next(m for m in model.llm.modules() if type(m).__name__ == "MambaMixer")
    h = torch.randn(2, 5, mixer.in_proj.in_features)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    masked = h * mask[:, :, None]
    want = torch.nn.functional.linear(masked, mixer.in_proj.weight, mixer.in_proj.bias).transpose(1, 2)
    torch.testing.assert_close(training._in_proj(mixer, h, mask), want, rtol=1e-5, atol=1e-6)
    apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    mixer = next(m for m in model.llm.modules() if type(m).__name__ == "MambaMixer")
    with torch.no_grad():
        for name, parameter in mixer.in_proj.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    got = training._in_proj(mixer, h, mask)
    torch.testing.assert_close(got, mixer.in_proj(masked).transpose(1, 2))
    base = torch.nn.functional.linear(masked, mixer.in_proj.weight, mixer.in_proj.bias).transpose(1, 2)
    assert (got - base).abs().max() > 1e-2  # the adapter counts


TRITON_SCAN_CHECKS = """
import copy
from collections.abc import Callable
import torch
from mambavlm.llm.mamba_training import use_training_scan
from tests.conftest import tiny_vlm
from tests.llm.test_mamba_training import left_padded_batch, loss_and_grads, padded_batch

# 24 px images (3 x 3 patches per encoder, 18 visual tokens): 26 positions, two chunks of the scan's
# default 16 steps with a partial last one, where 32 px gave 40 (three); the interpreter's time goes with them
for make_batch in (padded_batch, left_padded_batch):
    model = tiny_vlm("vision.encoders.0.image_size=24", "vision.encoders.1.image_size=24", train=True)
    reference = copy.deepcopy(model)
    use_training_scan(model.llm, "triton")
    calls = []
    import mambavlm.llm.mamba_training as training
    scan = training.selective_scan_triton
    # the scan is handed delta and z channel-contiguous, as the projections compute them (no transposes)
    training.selective_scan_triton = lambda *a, **k: calls.append((a[1].stride(1), k["z"].stride(1))) or scan(*a, **k)
    batch = make_batch(model)
    ours, our_grads = loss_and_grads(model, batch, True)
    training.selective_scan_triton = scan
    theirs, their_grads = loss_and_grads(reference, batch, False)
    assert calls == [(1, 1)] * model.llm.config.num_hidden_layers, calls
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert our_grads.keys() == their_grads.keys()
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
print("triton scan: equal")
"""


def test_training_with_the_triton_scan_equals_transformers_loss_and_gradients() -> None:
    """The mixers in mamba_ssm's layout with our Triton selective scan (``use_training_scan``), run by
    Triton's interpreter on the CPU: every layer calls it with channel-contiguous sequences, and the loss
    and every gradient equal transformers' forward, right- and left-padded."""
    from tests.conftest import run_under_triton_interpreter

    run_under_triton_interpreter(TRITON_SCAN_CHECKS, expect="triton scan: equal", timeout=600)


def test_an_unknown_training_scan_is_refused() -> None:
    from mambavlm.llm.mamba_training import use_training_scan

    with pytest.raises(ValueError, match="unknown training scan 'cuda'; expected 'auto', 'mamba_ssm' or 'triton'"):
        use_training_scan(tiny_vlm().llm, "cuda")


@pytest.mark.parametrize(
    ("scan", "cuda", "mamba_ssm", "triton", "fills", "expected"),
    [
        ("auto", True, True, True, True, "triton"),  # CUDA, a micro-batch that fills the GPU
        ("auto", True, True, True, False, "mamba_ssm"),  # too few sequences: mamba_ssm's fused mixer
        ("auto", True, False, True, False, "triton"),  # without mamba_ssm, the Triton scan at any batch
        ("auto", True, True, False, True, "mamba_ssm"),
        ("auto", True, False, False, True, None),
        ("auto", False, False, True, True, None),  # the CPU (even under Triton's interpreter): transformers' forward
        ("mamba_ssm", True, True, True, True, "mamba_ssm"),
        ("mamba_ssm", True, False, True, True, None),
        ("triton", True, True, True, False, "triton"),
        ("triton", False, False, True, False, "triton"),  # asked for: the interpreter runs it on the CPU
        ("triton", True, True, False, True, None),
    ],
)
def test_the_training_scan_resolves_by_what_is_installed_and_the_batch(
    scan: str, cuda: bool, mamba_ssm: bool, triton: bool, fills: bool, expected: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import types

    import mambavlm.llm.mamba_training as training

    monkeypatch.setattr(training, "use_kernels", lambda t, name: name == "mamba_ssm" and mamba_ssm and t.is_cuda)
    monkeypatch.setattr(training, "triton_runs_on", lambda t: triton)
    monkeypatch.setattr(training, "scan_fills_gpu", lambda t, channels: fills)
    assert training.resolve_training_scan(scan, types.SimpleNamespace(is_cuda=cuda), 64) == expected


@pytest.mark.parametrize(("batch", "channels", "sms", "expected"), [
    (8, 5120, 132, True),  # MambaVLM-2.8B at micro-batch 8 on an H200: 1280 warps, 9.7 per SM
    (4, 5120, 132, False),  # micro-batch 4: 4.8 per SM
    (33, 1024, 132, True),  # 1056 warps: exactly 8 per SM
    (32, 1024, 132, False),
])
def test_the_scan_fills_the_gpu_at_eight_warps_per_multiprocessor(
    batch: int, channels: int, sms: int, expected: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mambavlm.llm.mamba_training as training

    monkeypatch.setattr(training, "_multiprocessors", lambda device: sms)
    assert training.scan_fills_gpu(torch.zeros(batch, 3, 2), channels) is expected


def test_blocks_train_with_the_auto_scan_by_default() -> None:
    model = tiny_vlm(train=True)
    batch = padded_batch(model)
    loss_and_grads(model, batch, True)
    mixers = [m for m in model.llm.modules() if type(m).__name__ == "MambaMixer"]
    assert mixers and {m.training_scan for m in mixers} == {"auto"}


@needs_cuda
@needs_mamba_ssm
@pytest.mark.gpu
@pytest.mark.parametrize("chosen", ["asked-for", "auto"])
@pytest.mark.parametrize("batch_maker", [padded_batch, left_padded_batch], ids=["right-padded", "left-padded"])
def test_training_with_the_triton_scan_equals_mamba_inner_fn_on_cuda(
    batch_maker: Callable[[MambaVLM], dict], chosen: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """float32 on CUDA: the mixers with our Triton scan, asked for or by default (a batch that fills the
    GPU), against mamba_ssm's
    ``mamba_inner_fn`` (asked for), loss and every gradient (both sum in float32; atomics make the
    order differ); every layer called the Triton scan, u (a slice of in_proj's output through
    causal_conv1d), delta and z channel-contiguous."""
    import mambavlm.llm.mamba_training as training
    from mambavlm.llm.mamba_training import use_training_scan

    model = tiny_vlm(train=True)
    batch = {k: (v.to("cuda") if torch.is_tensor(v) else [p.to("cuda") for p in v])
             for k, v in batch_maker(model).items()}
    model.to("cuda")
    reference = copy.deepcopy(model)
    use_training_scan(reference.llm, "mamba_ssm")
    from mamba_ssm.ops import selective_scan_interface

    inner = []
    real_inner = selective_scan_interface.mamba_inner_fn
    monkeypatch.setattr(selective_scan_interface, "mamba_inner_fn", lambda *a, **k: inner.append(1) or real_inner(*a, **k))
    theirs, their_grads = loss_and_grads(reference, batch, True)
    assert len(inner) == model.llm.config.num_hidden_layers
    calls = []
    scan = training.selective_scan_triton
    monkeypatch.setattr(training, "selective_scan_triton",
                        lambda *a, **k: calls.append((a[0].stride(1), a[1].stride(1), k["z"].stride(1))) or scan(*a, **k))
    if chosen == "asked-for":
        use_training_scan(model.llm, "triton")
    else:  # the tiny batch does not fill a GPU: as if it did
        monkeypatch.setattr(training, "scan_fills_gpu", lambda hidden_states, channels: True)
    ours, our_grads = loss_and_grads(model, batch, True)
    assert len(calls) == model.llm.config.num_hidden_layers
    # delta and z reach the scan channel-contiguous, and u too where causal_conv1d's channel-last kernel runs
    assert all(delta == 1 and z == 1 for _, delta, z in calls), calls
    if importlib.util.find_spec("causal_conv1d") is not None:
        assert all(u == 1 for u, _, _ in calls), calls
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
