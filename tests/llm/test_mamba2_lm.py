"""The mamba2 family (``SSDForCausalLM`` on ``Mamba2Mixer``) against transformers' own ``Mamba2ForCausalLM``:
same logits, gradients, greedy tokens and initialisation, and checkpoints that load both ways."""

from __future__ import annotations

import importlib.util
import inspect
import math

import pytest
import torch
from transformers import Mamba2Config, Mamba2ForCausalLM
from transformers.models.mamba2.modeling_mamba2 import MambaRMSNormGated

from mambavlm.config import LLMConfig
from mambavlm.llm.cache import HybridCache
from mambavlm.llm.factory import build_llm
from mambavlm.llm.mamba2 import Mamba2Mixer, Mamba2MixerConfig
from mambavlm.llm.mamba2_lm import SSDForCausalLM
from mambavlm.ops.dispatch import kernels_available

VOCAB = 101
N_GROUPS = 2 if "group_size" in inspect.signature(MambaRMSNormGated.__init__).parameters else 1
"""transformers up to 5.17 normalises the gated RMSNorm over the whole width whatever n_groups is;
mamba_ssm (and this package) per group, which later transformers releases do too. Compared with
groups where transformers normalises per group (the GPU test compares groups with mamba_ssm itself)."""

# transformers routes its Mamba-2 ops to an installed mamba_ssm whatever the device, so its CPU
# reference cannot run where those CUDA kernels are installed.
hf_cpu_reference = pytest.mark.skipif(
    any(kernels_available().values()), reason="transformers sends CPU tensors to the installed CUDA kernels"
)


def config(**overrides: object) -> Mamba2Config:
    """2 layers, 8 heads of 16 in N_GROUPS groups, d_state 16, chunks of 8 (prompts span several)."""
    fields = dict(
        hidden_size=64, num_hidden_layers=2, vocab_size=VOCAB, state_size=16, expand=2, num_heads=8, head_dim=16,
        n_groups=N_GROUPS, chunk_size=8, use_conv_bias=True, tie_word_embeddings=False,
    )
    return Mamba2Config(**{**fields, **overrides})


def twin_models(seed: int = 0, **overrides: object) -> tuple[Mamba2ForCausalLM, SSDForCausalLM]:
    """transformers' model with perturbed weights (the conv bias and D non-trivial), and ours holding a copy."""
    torch.manual_seed(seed)
    reference = Mamba2ForCausalLM(config(**overrides)).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = SSDForCausalLM(config(**overrides)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def left_padded(lengths: tuple[int, ...], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths)
    ids = torch.randint(0, VOCAB, (len(lengths), width), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, width - length :] = 1
    return ids, mask


@hf_cpu_reference
def test_parameter_names_and_shapes_are_transformers() -> None:
    reference, ours = twin_models()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert all(isinstance(layer.mixer, Mamba2Mixer) for layer in ours.backbone.layers)


@hf_cpu_reference
@pytest.mark.parametrize("use_bias", [False, True])
def test_logits_and_gradients_equal_transformers(use_bias: bool) -> None:
    """Unpadded rows (and, without in_proj biases, left-padded ones) as transformers computes them.

    With in_proj biases transformers lets each pad's bias into the conv of the real tokens after it;
    this mixer skips a pad exactly, so a padded row equals the same row alone (checked instead).
    """
    reference, ours = twin_models(use_bias=use_bias)
    ids, mask = left_padded((21, 14, 3)) if not use_bias else (left_padded((21, 21))[0], None)
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    for model in (reference, ours):
        model.train()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        model.logits_ = out.logits.detach()
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(ours.logits_[real], reference.logits_[real], rtol=1e-5, atol=2e-5)
    ref_grads = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        scale = ref_grads[name].grad.abs().max().clamp(min=1e-6)
        assert (param.grad - ref_grads[name].grad).abs().max() / scale < 1e-4, name


def test_a_left_padded_row_equals_the_row_alone() -> None:
    """With in_proj and conv biases (pads would leak through the conv if they were not skipped)."""
    _, ours = twin_models(seed=2, use_bias=True)
    ids, mask = left_padded((15, 6))
    with torch.no_grad():
        batch = ours(ids, attention_mask=mask, use_cache=False).logits
        alone = ours(ids[1:, 9:], use_cache=False).logits
    torch.testing.assert_close(batch[1, 9:], alone[0], rtol=1e-5, atol=1e-5)


@hf_cpu_reference
def test_greedy_generation_equals_transformers_and_each_row_alone() -> None:
    reference, ours = twin_models(seed=3)
    ids, mask = left_padded((17, 9))
    with torch.no_grad():
        expected = reference.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        alone = ours.generate(ids[1:, 8:], max_new_tokens=12, do_sample=False)
    assert torch.equal(got, expected)
    assert torch.equal(alone[:, 9:], got[1:, 17:])


def test_cached_forward_in_pieces_equals_the_full_forward() -> None:
    _, ours = twin_models(seed=4)
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = ours(ids, use_cache=False).logits
        cache = ours.new_cache()
        pieces = [ours(ids[:, :11], cache=cache, use_cache=True).logits]
        pieces += [ours(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(11, 19)]
    assert isinstance(cache, HybridCache) and cache.get_seq_length() == 19
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@hf_cpu_reference
def test_checkpoints_load_both_ways(tmp_path) -> None:
    reference, ours = twin_models(seed=6)
    ids = torch.randint(0, VOCAB, (1, 13), generator=torch.Generator().manual_seed(7))
    reference.save_pretrained(tmp_path / "hf")
    loaded = build_llm(LLMConfig(family="mamba2", source=str(tmp_path / "hf")))
    assert type(loaded) is SSDForCausalLM
    ours.save_pretrained(tmp_path / "ours")
    back = Mamba2ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(back(ids).logits, expected, rtol=0, atol=1e-5)


@hf_cpu_reference
def test_initialisation_follows_transformers() -> None:
    """Fresh weights: the deterministic ones equal, the random ones with transformers' scale."""
    big = dict(hidden_size=128, vocab_size=2048, num_heads=16, head_dim=16, n_groups=1, rescale_prenorm_residual=True)
    torch.manual_seed(0)
    reference = Mamba2ForCausalLM(config(**big)).state_dict()
    torch.manual_seed(1)
    ours_model = SSDForCausalLM(config(**big))
    ours = ours_model.state_dict()
    for name, ref in reference.items():
        mine = ours[name]
        if name.endswith(("A_log", "D", "norm.weight", "norm_f.weight", "conv1d.bias")):
            torch.testing.assert_close(mine, ref, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
        elif name.endswith("dt_bias"):
            dt = torch.nn.functional.softplus(mine)
            assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6, name
        else:
            assert abs(mine.std().item() / ref.std().item() - 1) < 0.1, name
            assert abs(mine.mean().item()) < 3 * ref.std().item() / math.sqrt(ref.numel()), name


def test_inconsistent_config_is_an_error() -> None:
    inconsistent = config()
    inconsistent.num_heads = 4  # transformers >= 5.2x refuses this at construction; older ones do not
    with pytest.raises(ValueError, match="expand \\* hidden_size = 128 but num_heads \\* head_dim = 4 \\* 16"):
        SSDForCausalLM(inconsistent)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None, reason="needs mamba_ssm")
@pytest.mark.parametrize("kernels", [True, False])
def test_mixer_equals_mamba_ssms_mamba2_forward_gradients_and_steps(kernels: bool, monkeypatch) -> None:
    """mamba_ssm's own ``Mamba2`` module (its fused training kernel, its ``step``) with the same weights:
    our mixer on the kernel path and on the PyTorch path, float32 without TF32 in PyTorch. Gradients
    agree to 5e-3 of their largest entry: mamba_ssm's Triton SSD kernels multiply in TF32 whatever
    PyTorch's flags say (seen: 1.7e-3 on dt_bias against the PyTorch path)."""
    from mamba_ssm.modules.mamba2 import Mamba2

    from mambavlm.ops.dispatch import DISABLE_KERNELS_ENV

    if not kernels:
        monkeypatch.setenv(DISABLE_KERNELS_ENV, "1")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    reference = Mamba2(d_model=64, d_state=16, headdim=16, ngroups=2, chunk_size=16, device="cuda", dtype=torch.float32)
    config = Mamba2MixerConfig(hidden_size=64, num_heads=8, head_dim=16, d_state=16, n_groups=2, chunk_size=16)
    ours = Mamba2Mixer(config, device="cuda")
    ours.load_state_dict(reference.state_dict(), strict=True)
    u = torch.randn(2, 50, 64, device="cuda")
    expected, got = reference(u), ours(u)
    scale = expected.abs().max()
    assert (got - expected).abs().max() / scale < 1e-4
    expected.pow(2).sum().backward()
    got.pow(2).sum().backward()
    ref_params = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        ref_grad = ref_params[name].grad
        assert (param.grad - ref_grad).abs().max() / ref_grad.abs().max().clamp(min=1e-6) < 5e-3, name
    with torch.no_grad():
        conv_state, ssm_state = reference.allocate_inference_cache(2, 64, dtype=torch.float32)
        state = ours.allocate_state(2)
        for t in range(6):
            ref_out, conv_state, ssm_state = reference.step(u[:, t : t + 1], conv_state, ssm_state)
            out = ours.step(u[:, t], state)
            assert (out - ref_out[:, 0]).abs().max() / ref_out.abs().max() < 1e-4, t
