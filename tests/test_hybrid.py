"""Hybrid Mamba-2 / attention LLaMA: conversion, one cache for generation, save/load, MambaVLM conversion."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from mambavlm.distill.convert import convert_llama, convert_vlm
from mambavlm.llm.cache import CACHE_ARG, HybridCache
from mambavlm.llm.hybrid import HybridLlamaConfig, HybridLlamaForCausalLM, Mamba2AttentionAdapter, mamba_mixers
from mambavlm.model import MambaVLM, build_model

TINY_LLAMA = {
    "vocab_size": 97,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(**TINY_LLAMA)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def perturb_mixers(model: torch.nn.Module, scale: float = 0.2, seed: int = 1) -> None:
    """Move every mixer parameter off its seeded value, as training would (non-identity conv, decays < 1)."""
    g = torch.Generator().manual_seed(seed)
    for mixer in mamba_mixers(model).values():
        for p in mixer.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


@torch.no_grad()
def greedy_by_recompute(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding that runs the whole sequence again for every new token (no cache)."""
    for _ in range(steps):
        logits = model(input_ids=ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("mode", ["mmmamba", "matvlm"])
@pytest.mark.parametrize("layout", ["ratio:0.75", "linear"])  # 25 % attention (1 of 4 layers) / none
def test_cached_greedy_equals_recompute(layout: str, mode: str) -> None:
    hybrid = convert_llama(tiny_llama(), layout, mode).eval()
    perturb_mixers(hybrid)
    prompt = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(3))
    steps = 8
    cache = hybrid.new_cache()
    cached = hybrid.generate(
        prompt, max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0, **{CACHE_ARG: cache}
    )
    assert torch.equal(cached, greedy_by_recompute(hybrid, prompt, steps))
    # The cache was used: every layer has seen prompt + all but the last generated token.
    seen = prompt.shape[1] + steps - 1
    assert sorted(cache.mamba_states) == hybrid.mamba_layers
    assert all(cache.get_seq_length(i) == seen for i in range(TINY_LLAMA["num_hidden_layers"]))


def test_step_by_step_logits_match_full_forward() -> None:
    """Feeding a sequence in pieces through one HybridCache gives the full forward's logits."""
    hybrid = convert_llama(tiny_llama(), "list:0,2,3", "matvlm").eval()
    perturb_mixers(hybrid)
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = hybrid(input_ids=ids, use_cache=False).logits
        cache = hybrid.new_cache()
        pieces = [hybrid(input_ids=ids[:, :6], **{CACHE_ARG: cache}, use_cache=True).logits]
        for t in range(6, 11):
            pieces.append(hybrid(input_ids=ids[:, t : t + 1], **{CACHE_ARG: cache}, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def reference_forward(llama: LlamaForCausalLM, mixers: dict[int, torch.nn.Module], embeds: torch.Tensor) -> torch.Tensor:
    """The teacher's own modules run layer by layer on embeds (B, L, D), ``mixers[i]`` in place of attention i."""
    model = llama.model
    h = embeds
    positions = torch.arange(embeds.shape[1])[None]
    rope = model.rotary_emb(h, positions)
    for i, layer in enumerate(model.layers):
        x = layer.input_layernorm(h)
        mixed = mixers[i](x) if i in mixers else layer.self_attn(x, position_embeddings=rope, attention_mask=None)[0]
        h = h + mixed
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return llama.lm_head(model.norm(h))


@pytest.mark.parametrize("layout", ["head-interleaved:2", "tail-stacked:1"])
def test_conversion_replaces_only_the_chosen_attention(layout: str) -> None:
    llama = tiny_llama()
    hybrid = convert_llama(llama, layout, "mmmamba").eval()
    expected_layers = {"head-interleaved:2": [1, 3], "tail-stacked:1": [0, 1, 2]}[layout]
    assert hybrid.mamba_layers == expected_layers
    for i, layer in enumerate(hybrid.model.layers):
        assert isinstance(layer.self_attn, Mamba2AttentionAdapter) == (i in expected_layers)
    teacher_state = llama.state_dict()
    for key, value in hybrid.state_dict().items():
        if ".mixer." not in key:
            assert torch.equal(value, teacher_state[key]), key
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = hybrid(input_ids=ids, use_cache=False).logits
    expected = reference_forward(llama, mamba_mixers(hybrid), llama.model.embed_tokens(ids))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    assert all(isinstance(layer.self_attn, torch.nn.Module) for layer in llama.model.layers)
    assert not any(isinstance(m, Mamba2AttentionAdapter) for m in llama.modules()), "the teacher was modified"


def test_converting_a_hybrid_again_keeps_its_mixers() -> None:
    hybrid = convert_llama(tiny_llama(), "list:1", "mmmamba")
    perturb_mixers(hybrid)
    linear = convert_llama(hybrid, "linear", "mmmamba")
    assert linear.mamba_layers == [0, 1, 2, 3]
    before, after = mamba_mixers(hybrid)[1].state_dict(), mamba_mixers(linear)[1].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_save_load_round_trip(tmp_path: Path) -> None:
    hybrid = convert_llama(tiny_llama(), "ratio:0.5", "matvlm").eval()
    perturb_mixers(hybrid)
    hybrid.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = HybridLlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.config, HybridLlamaConfig)
    assert loaded.config.mamba_layers == [0, 2]
    assert loaded.config.layout == "ratio:0.5" and loaded.config.seeding_mode == "matvlm"
    assert loaded.config.mixer_config == hybrid.config.mixer_config
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(hybrid(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_mamba_layer_rejects_other_caches() -> None:
    hybrid = convert_llama(tiny_llama(), "list:0", "mmmamba")
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="HybridCache"):
        hybrid(input_ids=ids, use_cache=True, **{CACHE_ARG: DynamicCache()})


def test_bad_conversions() -> None:
    llama = tiny_llama()
    with pytest.raises(ValueError, match="unknown seeding mode"):
        convert_llama(llama, "linear", "softmax")
    with pytest.raises(ValueError, match="unknown rule"):
        convert_llama(llama, "every-other", "mmmamba")
    with pytest.raises(ValueError, match="not layers of a 4-layer model"):
        convert_llama(llama, "list:7", "mmmamba")
    hybrid = convert_llama(llama, "list:2", "mmmamba")
    with pytest.raises(ValueError, match="converts no attention layer"):
        convert_llama(hybrid, "list:2", "mmmamba")
    with pytest.raises(ValueError, match="mamba_layers"):
        HybridLlamaConfig(**TINY_LLAMA, mamba_layers=[4], mamba2_mixer=hybrid.config.mamba2_mixer)


def tiny_llama_vlm() -> MambaVLM:
    torch.manual_seed(0)
    llm = "{" + ", ".join(f"{k}: {v}" for k, v in {**TINY_LLAMA, "vocab_size": 1024}.items()) + "}"
    return build_model("configs/model/tiny.yaml", ["llm.family=llama", f"llm.config={llm}"]).eval()


def test_convert_vlm_keeps_vision_and_projector(tmp_path: Path) -> None:
    from PIL import Image

    teacher = tiny_llama_vlm()
    student = convert_vlm(teacher, "ratio:0.75", "mmmamba").eval()
    assert isinstance(student.llm, HybridLlamaForCausalLM) and student.llm.mamba_layers == [0, 1, 2]
    for name in ("vision", "projector"):
        t_params = dict(getattr(teacher, name).named_parameters())
        for key, p in getattr(student, name).named_parameters():
            assert torch.equal(p, t_params[key]) and p.data_ptr() != t_params[key].data_ptr(), f"{name}.{key}"
    image = Image.new("RGB", (40, 30), (200, 30, 10))
    ids = torch.tensor([student.build_prompt_ids("what colour is it", with_image=True)])
    pixels = student.preprocess_images([image])
    with torch.no_grad():
        embeds = teacher.embed(ids, pixels)
        assert torch.equal(student.embed(ids, pixels), embeds)
        logits = student(ids, pixel_values=pixels).logits
        expected = reference_forward(teacher.llm, mamba_mixers(student), embeds)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    answers = student.generate([image, None], ["what colour", "say hello"], max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)

    student.save_pretrained(tmp_path / "student")
    loaded = MambaVLM.from_pretrained(tmp_path / "student").eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids, pixel_values=pixels).logits, logits)
    assert type(loaded.llm) is HybridLlamaForCausalLM and loaded.config.llm.family == "hybrid_llama"
    assert loaded.llm.config.mamba_layers == student.llm.config.mamba_layers


def test_left_padded_batch_generates_what_each_prompt_generates_alone() -> None:
    hybrid = convert_llama(tiny_llama(), "ratio:0.75", "matvlm").eval()
    perturb_mixers(hybrid)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, TINY_LLAMA["vocab_size"], (n,), generator=g) for n in (9, 5, 7)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :], mask[row, width - len(p) :] = p, 1
    kwargs = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    batched = hybrid.generate(ids, attention_mask=mask, **kwargs)[:, width:]
    for row, p in enumerate(prompts):
        alone = hybrid.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kwargs)
        assert torch.equal(batched[row], alone[0, len(p) :]), f"prompt {row}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None, reason="needs mamba_ssm")
def test_cached_generation_on_cuda_with_kernels() -> None:
    """The kernel path (SSD scan for prefill, state update for decoding) keeps cached = recomputed,
    and left-padded rows match their unpadded runs."""
    hybrid = convert_llama(tiny_llama(), "ratio:0.75", "matvlm").eval()
    perturb_mixers(hybrid)
    hybrid = hybrid.to("cuda")
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, TINY_LLAMA["vocab_size"], (n,), generator=g).cuda() for n in (80, 67)]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    ids = torch.zeros(2, 80, dtype=torch.long, device="cuda")
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, 80 - len(p) :], mask[row, 80 - len(p) :] = p, 1
    batched = hybrid.generate(ids, attention_mask=mask, **kwargs)[:, 80:]
    for row, p in enumerate(prompts):
        alone = hybrid.generate(p[None], **kwargs)
        recomputed = greedy_by_recompute(hybrid, p[None], 6)
        assert torch.equal(alone, recomputed), f"prompt {row}: cached vs recomputed"
        assert torch.equal(batched[row], alone[0, len(p) :]), f"prompt {row}: padded vs alone"
