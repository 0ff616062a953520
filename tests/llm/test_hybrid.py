"""Hybrid Mamba-2 / attention LLaMA: one cache for generation (cached = recomputed, pieces = full
forward, left padding), save/load, the cache type it takes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from mambavlm.distill.convert import convert_llama
from mambavlm.llm.cache import CACHE_ARG
from mambavlm.llm.hybrid import HybridLlamaConfig, HybridLlamaForCausalLM
from tests.conftest import TINY_LLAMA, perturb_mixers, tiny_llama


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
