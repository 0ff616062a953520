"""MambaVLM as a transformers model: its config class, the Auto classes, transformers' save / load
layout (sharded safetensors, dtype, device_map) and transformers' ``generate`` (arguments, return
types, streamers), each checked against the model's own forward or decoding path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, GenerationConfig, MambaConfig
from transformers.generation.streamers import BaseStreamer

import mambavlm  # noqa: F401  (registers the Auto classes)
from mambavlm.config import ConfigError, ModelConfig, load_config
from mambavlm.configuration import MambaVLMConfig
from mambavlm.llm.factory import family_classes
from mambavlm.llm.tokenizer import TINY_VOCAB_FILE
from mambavlm.model import MambaVLM
from mambavlm.processing import MambaVLMImageProcessor, MambaVLMProcessor
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
    # right padding (the HF path cannot see it behind inputs_embeds: it decoded other tokens, silently), a mask of
    # another shape and a 1-D prompt are refused on both paths, before any model work
    right = attention_mask.flip(1)
    assert not bool(right[:, -1].all())
    for call in (lambda **kw: model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=2, **kw),
                 lambda **kw: model.generate_ids(input_ids, kw["attention_mask"], pixel_values, fast=False,
                                                 max_new_tokens=2),
                 lambda **kw: model.generate_ids(input_ids, kw["attention_mask"], pixel_values, fast=True,
                                                 max_new_tokens=2)):
        with pytest.raises(ValueError, match=r"prompts must be left-padded: attention_mask\[:, -1\] has zeros \(rows"):
            call(attention_mask=right)
        with pytest.raises(ValueError, match=r"attention_mask must be \(3, \d+\), got \(3, \d+\)"):
            call(attention_mask=attention_mask[:, 1:])
    with pytest.raises(ValueError, match=r"input_ids must be \(B, L\)"):
        model.generate_ids(input_ids[0], attention_mask[0], pixel_values, fast=False, max_new_tokens=2)


def test_processor_round_trips_and_prepares_what_the_model_prepares_itself(tmp_path: Path) -> None:
    """AutoProcessor of a saved model gives its image preprocessing, tokenizer and chat template; its
    output for chat-formatted prompts equals the model's own prompt batch (ids, mask, pixels), and
    ``generate(**processor(...))`` answers what ``answer`` does."""
    model = tiny_vlm()
    model.save_pretrained(tmp_path / "saved")
    processor = AutoProcessor.from_pretrained(tmp_path / "saved")
    assert type(processor) is MambaVLMProcessor and type(processor.image_processor) is MambaVLMImageProcessor
    assert processor.num_visual_tokens == model.num_visual_tokens and processor.add_bos == model.add_bos
    images, prompts = prompts_and_images()
    chats = [
        [{"role": "user", "content": ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": p}]}]
        for image, p in zip(images, prompts)
    ]
    texts = [processor.apply_chat_template(chat, add_generation_prompt=True) for chat in chats]
    inputs = processor(images=[i for i in images if i is not None], text=texts)
    input_ids, attention_mask, pixel_values = model._prompt_batch(images, prompts)
    assert torch.equal(inputs["input_ids"], input_ids) and torch.equal(inputs["attention_mask"], attention_mask)
    assert len(inputs["pixel_values"]) == len(pixel_values) == len(model.vision.encoders)
    for got, want in zip(inputs["pixel_values"], pixel_values, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    answers = processor.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)
    assert [a.strip() for a in answers] == model.answer(images, prompts, max_new_tokens=4, fast=False)
    with pytest.raises(ValueError, match="2 <image> placeholders for 1 images"):
        processor(images=images[:1], text=[texts[0], texts[2]])
    with pytest.raises(TypeError, match="image 0 is a str"):
        processor.image_processor(["not an image"])


@pytest.mark.parametrize("family", ["mamba", "llama"])
def test_static_cache_implementation_decodes_with_the_static_decoder_to_the_same_tokens(family: str) -> None:
    """``cache_implementation="static"`` (argument or generation config) gives the default path's greedy
    tokens through the static-state decoder, and names what that decoder does not implement."""
    model = tiny_vlm() if family == "mamba" else tiny_vlm(*LLAMA_OVERRIDES)
    images, prompts = prompts_and_images()
    input_ids, attention_mask, pixel_values = model._prompt_batch(images, prompts)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
    default = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    calls = []
    decoder = model.static_decoder()
    original = decoder.generate
    decoder.generate = lambda *a, **k: calls.append(k) or original(*a, **k)
    static = model.generate(**inputs, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert len(calls) == 1 and calls[0]["max_new_tokens"] == 6
    torch.testing.assert_close(static, default, rtol=0, atol=0)
    model.generation_config.cache_implementation = "static"
    torch.testing.assert_close(model.generate(**inputs, max_new_tokens=6, do_sample=False), default, rtol=0, atol=0)
    assert len(calls) == 2
    with pytest.raises(ValueError, match=r"does not implement generation_config.num_beams=2"):
        model.generate(**inputs, max_new_tokens=6, num_beams=2)
    with pytest.raises(ValueError, match=r"argument 'streamer'"):
        model.generate(**inputs, max_new_tokens=6, streamer=object())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_static_cache_implementation_on_cuda_replays_the_cuda_graph_to_the_default_tokens() -> None:
    """On CUDA the static path's step is a CUDA graph; float32 greedy tokens equal transformers'."""
    model = tiny_vlm().to("cuda")
    images, prompts = prompts_and_images()
    input_ids, attention_mask, pixel_values = model._prompt_batch(images, prompts)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
    default = model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=None)
    static = model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=None, cache_implementation="static")
    assert model.static_decoder().cuda_graph
    torch.testing.assert_close(static, default, rtol=0, atol=0)


def test_generation_defaults_take_the_tokenizers_special_ids_and_a_saved_config_keeps_its_own(tmp_path: Path) -> None:
    """The tiny LLM's config carries MambaConfig's defaults (0 for EOS, BOS and PAD); the tokenizer's
    ``</s>``, ``<s>`` and ``<pad>`` are lines 2, 1 and 0 of its vocabulary file. Generation (generate,
    generate_ids, the chat) must stop at the tokenizer's EOS, also after a save and reload; a
    generation_config.json written by hand keeps its ids."""
    words = TINY_VOCAB_FILE.read_text().split("\n")
    eos, bos, pad = words.index("</s>"), words.index("<s>"), words.index("<pad>")
    model = tiny_vlm()
    assert model.llm.config.eos_token_id == 0  # the default the generation configs must not keep
    for config in (model.generation_config, model.llm.generation_config):
        assert (config.eos_token_id, config.bos_token_id, config.pad_token_id) == (eos, bos, pad)
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved")
    assert (loaded.generation_config.eos_token_id, loaded.generation_config.pad_token_id) == (eos, pad)

    mine = GenerationConfig(eos_token_id=[5, 7], pad_token_id=3, bos_token_id=4)
    assert not getattr(mine, "_from_model_config", False)
    model.generation_config = mine
    model.attach_tokenizer(model.tokenizer)
    assert (mine.eos_token_id, mine.pad_token_id, mine.bos_token_id) == ([5, 7], 3, 4)
