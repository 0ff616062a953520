"""Sampling and generation settings: seeded sampling through the static decoder, the sampler's
frequencies, top-k / top-p, and GenerationSettings from generate's keyword arguments."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from mambavlm.generation import GenerationSettings, StaticStateDecoder
from mambavlm.generation.sampling import TokenChooser, sample_from_probs
from tests.conftest import TINY_LMS, left_padded_prompt, tiny_vlm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", sorted(TINY_LMS))
def test_sampling_is_reproducible_with_a_seed(family: str) -> None:
    model = TINY_LMS[family]()
    embeds, mask = left_padded_prompt(model)
    decoder = StaticStateDecoder(model)
    kwargs = {"max_new_tokens": 12, "do_sample": True, "temperature": 1.5, "top_k": 0, "eos_token_id": None}
    first = decoder.generate(embeds, mask, torch.Generator().manual_seed(7), **kwargs)
    again = decoder.generate(embeds, mask, torch.Generator().manual_seed(7), **kwargs)
    other = decoder.generate(embeds, mask, torch.Generator().manual_seed(8), **kwargs)
    torch.testing.assert_close(first, again)
    assert not torch.equal(first, other)


def test_sample_from_probs_draws_with_the_given_probabilities() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    draws = sample_from_probs(probs.expand(40_000, -1).contiguous(), torch.Generator().manual_seed(0))
    frequencies = torch.bincount(draws, minlength=5).float() / draws.numel()
    torch.testing.assert_close(frequencies, probs, atol=0.01, rtol=0)


def test_top_k_and_top_p_sample_only_from_the_kept_tokens() -> None:
    """Hand-worked: top_k=3 keeps logits 3, 2, 1; then top_p=0.8 drops the last (cumulative 0.91)."""
    logits = torch.tensor([[1.0, 3.0, -2.0, 2.0, 0.0]]).expand(30_000, -1)
    chooser = TokenChooser(
        GenerationSettings(max_new_tokens=1, do_sample=True, top_k=3, top_p=0.8), torch.Generator().manual_seed(0)
    )
    draws = chooser(logits)
    kept = torch.softmax(torch.tensor([3.0, 2.0]), dim=0)
    frequencies = torch.bincount(draws, minlength=5).float() / draws.numel()
    torch.testing.assert_close(frequencies, torch.tensor([0.0, kept[0], 0.0, kept[1], 0.0]), atol=0.01, rtol=0)
    greedy = TokenChooser(GenerationSettings(max_new_tokens=1))
    assert greedy(logits[:2]).tolist() == [1, 1]


def test_settings_follow_hf_precedence_and_reject_what_they_cannot_do() -> None:
    config = GenerationConfig(eos_token_id=3, pad_token_id=4, top_k=7, max_new_tokens=9)
    settings = GenerationSettings.from_generate_kwargs({"do_sample": True, "temperature": 0.5}, config)
    assert settings == GenerationSettings(
        max_new_tokens=9, do_sample=True, temperature=0.5, top_k=7, top_p=1.0, eos_token_ids=(3,), pad_token_id=4
    )
    assert GenerationSettings.from_generate_kwargs({"eos_token_id": None}, config).eos_token_ids == ()
    assert GenerationSettings.from_generate_kwargs({"max_new_tokens": 2}).top_k == 50
    assert GenerationSettings(max_new_tokens=1, eos_token_ids=(2, 6)).fill_token_id == 2
    with pytest.raises(ValueError, match="'num_beams'"):
        GenerationSettings.from_generate_kwargs({"num_beams": 2, "max_new_tokens": 3})
    with pytest.raises(ValueError, match="repetition_penalty=1.2"):
        GenerationSettings.from_generate_kwargs({"max_new_tokens": 3}, GenerationConfig(repetition_penalty=1.2))
    with pytest.raises(ValueError, match="max_new_tokens is required"):
        GenerationSettings.from_generate_kwargs({})
    with pytest.raises(ValueError, match="top_p"):
        GenerationSettings(max_new_tokens=1, do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be > 0 when sampling"):
        GenerationSettings.from_generate_kwargs({"max_new_tokens": 3, "do_sample": True, "temperature": 0.0})
    # greedy decoding ignores the sampling settings, as HF generate does (LLaVA passes temperature=0)
    greedy = GenerationSettings.from_generate_kwargs({"max_new_tokens": 3, "temperature": 0.0, "top_p": 1.5})
    assert not greedy.do_sample and greedy.temperature == 0.0
    assert not GenerationSettings.accepts({"num_beams": 2})


def test_greedy_fast_path_takes_llavas_temperature_zero_as_hf_does() -> None:
    """``temperature=0, do_sample=False`` (LLaVA's evaluation scripts): the fast path decodes greedily, the
    tokens of HF generate with the same arguments (which ignores the temperature when not sampling)."""
    model = tiny_vlm()
    images, prompts = [None, None], ["what colour ?", "and this one ?"]
    input_ids, attention_mask, pixel_values = model._prompt_batch(images, prompts)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "temperature": 0.0, "top_p": None, "eos_token_id": None}
    fast = model.generate_ids(input_ids, attention_mask, pixel_values, fast=True, **kwargs)
    hf = model.generate_ids(input_ids, attention_mask, pixel_values, fast=False, **kwargs)
    assert torch.equal(fast, hf)
