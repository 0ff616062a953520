"""MambaVLM as a transformers model: its config class, the Auto classes, transformers' save / load
layout (sharded safetensors, dtype, device_map) and transformers' ``generate`` (arguments, return
types, streamers), each checked against the model's own forward or decoding path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, MambaConfig
from transformers.generation.streamers import BaseStreamer

import mambavlm  # noqa: F401  (registers the Auto classes)
from mambavlm.config import ConfigError, ModelConfig, load_config
from mambavlm.configuration import MambaVLMConfig
from mambavlm.llm.factory import family_classes
from mambavlm.model import MambaVLM
from tests.conftest import TINY_MODEL, tiny_vlm


LLAMA_OVERRIDES = (
    "llm.family=llama",
    "llm.config={hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, "
    "num_key_value_heads: 2, vocab_size: 1024}",
    "llm.template=vicuna_v1",
)


def prompts_and_images() -> tuple[list[Image.Image | None], list[str]]:
    red = Image.new("RGB", (40, 30), (230, 30, 30))
    blue = Image.new("RGB", (30, 40), (30, 30, 230))
    return [red, None, blue], ["what colour is it ?", "say hello", "and this one ?"]


def test_config_round_trips_through_config_json_and_rejects_what_does_not_fit(tmp_path: Path) -> None:
    spec = load_config(ModelConfig, TINY_MODEL)
    text_config = family_classes(spec.llm.family)[0](**spec.llm.config)
    config = MambaVLMConfig.from_spec(spec, text_config)
    config.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["model_type"] == "mambavlm" and stored["max_sequence_length"] == spec.max_length
    assert stored["vision"] == spec.vision.model_dump(mode="json")
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is MambaVLMConfig and loaded.spec == spec
    assert type(loaded.text_config) is type(text_config) and loaded.text_config.hidden_size == text_config.hidden_size
    assert loaded.get_text_config() is loaded.text_config
    bad = stored["projector"] | {"scan_mode": "zigzag"}
    with pytest.raises(ConfigError, match="MambaVLMConfig.projector: scan_mode"):
        MambaVLMConfig(**{**stored, "projector": bad})
    with pytest.raises(ValueError, match="llm.family 'llama' needs a LlamaConfig"):
        MambaVLMConfig(vision=spec.vision, llm=spec.llm.model_copy(update={"family": "llama"}), text_config=MambaConfig())
    assert MambaVLMConfig().vision is None  # transformers default-constructs configs to diff them


def test_sharded_save_loads_through_the_auto_class_with_dtype_and_device_map(tmp_path: Path) -> None:
    model = tiny_vlm()
    model.save_pretrained(tmp_path / "saved", max_shard_size="100KB")
    files = {p.name for p in (tmp_path / "saved").iterdir()}
    shards = sorted(f for f in files if f.startswith("model-") and f.endswith(".safetensors"))
    assert len(shards) > 1 and "model.safetensors.index.json" in files
    assert {"config.json", "generation_config.json", "tokenizer_config.json"} <= files
    index = json.loads((tmp_path / "saved" / "model.safetensors.index.json").read_text())
    expected = set(model.state_dict()) - {"llm.lm_head.weight"}  # tied to the embeddings
    assert set(index["weight_map"]) == expected
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved", dtype=torch.bfloat16, device_map="cpu")
    assert type(loaded) is MambaVLM and loaded.tokenizer is not None
    assert loaded.tokenizer.chat_template == model.template.chat_template
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it ?"}]}]
    text = loaded.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == model.template.prompt("<image>\nwhat is it ?", model.tokenizer.eos_token)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.llm.lm_head.weight is loaded.llm.get_input_embeddings().weight
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value.to(loaded.state_dict()[key].dtype), rtol=0, atol=0)
    assert torch.equal(loaded.projector.first.orders, model.projector.first.orders)  # not saved: recomputed


@pytest.mark.parametrize("family", ["mamba", "llama"])
def test_generate_takes_transformers_arguments_and_equals_the_models_own_decoding(family: str) -> None:
    """transformers' generate on (input_ids, attention_mask, pixel_values): the prompt, then the new
    tokens of the model's own HF-generate path (``generate_ids``); the dict output and a streamer see
    the same tokens; sampling follows transformers' seeded sampling."""
    model = tiny_vlm() if family == "mamba" else tiny_vlm(*LLAMA_OVERRIDES)
    images, prompts = prompts_and_images()
    input_ids, attention_mask, pixel_values = model._prompt_batch(images, prompts)
    expected = model.generate_ids(input_ids, attention_mask, pixel_values, fast=False, max_new_tokens=5,
                                  do_sample=False, eos_token_id=None)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                         max_new_tokens=5, do_sample=False, eos_token_id=None)
    width = input_ids.shape[1]
    assert out.shape == (3, width + 5)
    torch.testing.assert_close(out[:, width:], expected, rtol=0, atol=0)
    placeholders = input_ids == model.config.image_token_index
    assert torch.equal(out[:, :width][~placeholders], input_ids[~placeholders])
    assert (out[:, :width][placeholders] == model.generation_config.pad_token_id).all()

    class Collect(BaseStreamer):
        def __init__(self) -> None:
            self.chunks: list[torch.Tensor] = []

        def put(self, value: torch.Tensor) -> None:
            self.chunks.append(value.reshape(-1))

        def end(self) -> None:
            self.chunks.append(torch.tensor([-1]))

    first = [input_ids[:1], attention_mask[:1], [p[:1] for p in pixel_values]]
    streamer = Collect()
    result = model.generate(input_ids=first[0], attention_mask=first[1], pixel_values=first[2], max_new_tokens=5,
                            do_sample=False, eos_token_id=None, streamer=streamer, return_dict_in_generate=True,
                            output_scores=True)
    assert torch.equal(result.sequences, out[:1])
    assert len(result.scores) == 5
    streamed = torch.cat(streamer.chunks)
    assert streamed[-1] == -1 and torch.equal(streamed[-6:-1], expected[0])

    torch.manual_seed(11)
    sampled = model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                             max_new_tokens=4, do_sample=True, temperature=1.5, eos_token_id=None)
    torch.manual_seed(11)
    again = model.generate_ids(input_ids, attention_mask, pixel_values, fast=False, max_new_tokens=4,
                               do_sample=True, temperature=1.5, eos_token_id=None)
    torch.testing.assert_close(sampled[:, width:], again, rtol=0, atol=0)


def test_generate_reports_bad_inputs() -> None:
    model = tiny_vlm()
    images, prompts = prompts_and_images()
    input_ids, attention_mask, pixel_values = model._prompt_batch(images, prompts)
    with pytest.raises(ValueError, match="needs input_ids"):
        model.generate(attention_mask=attention_mask)
    with pytest.raises(ValueError, match="but no pixel_values"):
        model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"sequence too long: \d+ tokens > max_length=256"):
        model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                       max_new_tokens=1000)
