"""Conversion of a LLaMA (or a MambaVLM on one) into a hybrid: only the chosen attention layers become
Mamba-2 mixers, everything else is the teacher's, and the VLM keeps its vision and projector."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from mambavlm.distill.convert import convert_llama, convert_vlm
from mambavlm.llm.hybrid import HybridLlamaConfig, HybridLlamaForCausalLM, Mamba2AttentionAdapter, mamba_mixers
from mambavlm.model import MambaVLM
from tests.conftest import TINY_LLAMA, perturb_mixers, tiny_llama, tiny_llama_vlm


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


def test_convert_vlm_keeps_vision_and_projector(tmp_path: Path) -> None:
    from PIL import Image

    teacher = tiny_llama_vlm(vocab_size=1024)
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
    answers = student.answer([image, None], ["what colour", "say hello"], max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)

    student.save_pretrained(tmp_path / "student")
    loaded = MambaVLM.from_pretrained(tmp_path / "student").eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids, pixel_values=pixels).logits, logits)
    assert type(loaded.llm) is HybridLlamaForCausalLM and loaded.config.llm.family == "hybrid_llama"
    assert loaded.llm.config.mamba_layers == student.llm.config.mamba_layers
    assert (teacher.config.name, loaded.config.name) == ("tiny", "tiny-hybrid")  # the teacher's + "-hybrid"


def test_a_text_only_student_loads_with_transformers_auto_classes(tmp_path: Path) -> None:
    """A student distilled from an HF Llama teacher is saved as ``hybrid_llama``: after ``import mambavlm``
    it loads through AutoConfig / AutoModelForCausalLM, as a MambaVLM student does through its Auto class."""
    from transformers import AutoConfig, AutoModelForCausalLM

    student = convert_llama(tiny_llama(), "head-interleaved:2", "mmmamba")
    student.save_pretrained(tmp_path / "student")
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "student"), HybridLlamaConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    assert isinstance(loaded, HybridLlamaForCausalLM) and loaded.mamba_layers == student.mamba_layers
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, student.eval()(input_ids=ids).logits)
