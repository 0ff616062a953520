"""MambaVLM end to end on the tiny config: splicing, loss, training, generation, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, LlamaForCausalLM, MambaForCausalLM

from mambavlm.data.collate import VLMCollator
from mambavlm.data.llava import LlavaDataset
from mambavlm.llm.tokenizer import IMAGE_TOKEN_INDEX
from mambavlm.model import (
    LEGACY_CONFIG_FILE,
    LEGACY_LLM_DIR,
    LEGACY_TOKENIZER_DIR,
    LEGACY_WEIGHTS_FILE,
    MambaVLM,
    build_model,
)
from tests.conftest import ROOT, TINY_MODEL, tiny_vlm

LLAMA_OVERRIDES = [
    "llm.family=llama",
    "llm.config={hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
    "num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 1024}",
    "llm.template=vicuna_v1",
]


def image(color: tuple[int, int, int], size: int = 32) -> Image.Image:
    img = Image.new("RGB", (size, size), (128, 128, 128))
    img.paste(color, (4, 4, 20, 20))
    return img


def batch_for(model: MambaVLM, tmp_path: Path, with_text_only: bool = True) -> dict:
    """Two image samples (red / blue square) and optionally one text-only sample, collated."""
    records = []
    for i, (name, color) in enumerate([("red", (230, 30, 30)), ("blue", (30, 30, 230))]):
        path = tmp_path / f"{name}.png"
        image(color).save(path)
        records.append(
            {
                "id": str(i),
                "image": path.name,
                "conversations": [
                    {"from": "human", "value": "what color is the square ?"},
                    {"from": "gpt", "value": name},
                ],
            }
        )
    if with_text_only:
        records.append(
            {
                "id": "text",
                "conversations": [
                    {"from": "human", "value": "how many objects are there ?"},
                    {"from": "gpt", "value": "two"},
                ],
            }
        )
    ds = LlavaDataset(
        records,
        tmp_path,
        model.tokenizer,
        model.template,
        [enc.preprocess for enc in model.vision.encoders],
        model.num_visual_tokens,
        model.config.max_sequence_length,
        model.add_bos,
    )
    return VLMCollator(model.tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])


def test_visual_tokens_are_spliced_at_the_placeholders(tmp_path: Path) -> None:
    model = tiny_vlm()
    batch = batch_for(model, tmp_path)
    ids, pixels = batch["input_ids"], batch["pixel_values"]
    embeds = model.embed(ids, pixels)
    visual = model.projector(model.vision(pixels))  # (2, 32, D)
    mask = ids == IMAGE_TOKEN_INDEX
    assert mask.sum(dim=1).tolist() == [32, 32, 0]
    torch.testing.assert_close(embeds[0][mask[0]], visual[0])
    torch.testing.assert_close(embeds[1][mask[1]], visual[1])
    text = model.llm.get_input_embeddings()(ids.clamp(min=0))
    torch.testing.assert_close(embeds[~mask], text[~mask])


def test_padded_batch_matches_each_sample_alone(tmp_path: Path) -> None:
    model = tiny_vlm()
    batch = batch_for(model, tmp_path)
    logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits
    for i in range(3):
        n = int(batch["attention_mask"][i].sum())
        ids = batch["input_ids"][i : i + 1, :n]
        pixels = [p[i : i + 1] for p in batch["pixel_values"]] if i < 2 else None
        alone = model(input_ids=ids, pixel_values=pixels).logits
        torch.testing.assert_close(logits[i, :n], alone[0], rtol=1e-4, atol=1e-5)


def test_loss_is_cross_entropy_on_answer_tokens_only(tmp_path: Path) -> None:
    model = tiny_vlm()
    batch = batch_for(model, tmp_path)
    out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")})
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)


def test_text_only_input_equals_the_plain_hf_language_model(tmp_path: Path) -> None:
    model = tiny_vlm()
    model.llm.save_pretrained(tmp_path / "lm")
    plain = MambaForCausalLM.from_pretrained(tmp_path / "lm").eval()
    vlm = build_model(TINY_MODEL, [f"llm.source={tmp_path / 'lm'}"]).eval()
    ids = torch.tensor([model.build_prompt_ids("how many objects are there ?", with_image=False)])
    torch.testing.assert_close(vlm(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_tiny_model_trains_and_loss_falls(tmp_path: Path) -> None:
    model = tiny_vlm().train()
    batch = batch_for(model, tmp_path, with_text_only=False)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")}
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(not p.requires_grad for p in model.vision.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model(**inputs).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses
    model.eval()
    answers = model.answer([image((230, 30, 30)), image((30, 30, 230))],
                             ["what color is the square ?"] * 2, max_new_tokens=3)
    assert answers == ["red", "blue"]


def _greedy_by_recomputation(model: MambaVLM, ids: list[int], pixels, steps: int) -> list[int]:
    """Greedy decoding that re-runs the whole sequence every step (no cache)."""
    seq = list(ids)
    out = []
    for _ in range(steps):
        logits = model(input_ids=torch.tensor([seq]), pixel_values=pixels).logits
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        seq.append(nxt)
        if nxt == model.tokenizer.eos_token_id:
            break
    return out


@pytest.mark.parametrize("overrides", [[], LLAMA_OVERRIDES], ids=["mamba", "llama"])
def test_cached_generation_equals_recomputation(overrides: list[str]) -> None:
    model = tiny_vlm(*overrides, seed=1)
    img = image((30, 200, 30))
    ids = model.build_prompt_ids("what shape is the green object ?", with_image=True)
    pixels = model.preprocess_images([img])
    expected = _greedy_by_recomputation(model, ids, pixels, steps=6)
    got = model.generate_ids(
        torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), pixels,
        max_new_tokens=6, do_sample=False, eos_token_id=model.tokenizer.eos_token_id,
    )[0].tolist()
    assert got[: len(expected)] == expected


def test_batched_generation_with_left_padding_and_sampling() -> None:
    model = tiny_vlm(seed=2)
    imgs = [image((230, 30, 30)), None]
    prompts = ["what color is the square ?", "how many objects are there ?"]
    greedy = model.answer(imgs, prompts, max_new_tokens=4)
    alone = [model.answer([imgs[0]], prompts[:1], max_new_tokens=4)[0],
             model.answer(None, prompts[1:], max_new_tokens=4)[0]]
    assert greedy == alone
    torch.manual_seed(0)
    s1 = model.answer(imgs, prompts, max_new_tokens=4, do_sample=True, temperature=1.5)
    torch.manual_seed(0)
    s2 = model.answer(imgs, prompts, max_new_tokens=4, do_sample=True, temperature=1.5)
    assert s1 == s2 and all(isinstance(s, str) for s in s1)


def test_generate_takes_images_preprocessed_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_vlm(seed=2)
    imgs = [image((230, 30, 30)), None, image((30, 60, 230))]
    prompts = ["what color is the square ?", "how many objects are there ?", "what shape is the blue object ?"]
    expected = model.answer(imgs, prompts, max_new_tokens=4)
    pixels = model.preprocess_images([imgs[0], imgs[2]])

    def fail(_images: object) -> None:
        raise AssertionError("preprocess_images called although pixel_values were given")

    monkeypatch.setattr(model, "preprocess_images", fail)
    assert model.answer(imgs, prompts, max_new_tokens=4, pixel_values=pixels) == expected
    with pytest.raises(ValueError, match=r"pixel_values hold \[1, 1\] images for 2 images"):
        model.answer(imgs, prompts, max_new_tokens=4, pixel_values=[p[:1] for p in pixels])


@pytest.mark.parametrize("overrides", [[], LLAMA_OVERRIDES], ids=["mamba", "llama"])
def test_option_logprobs_are_the_first_answer_tokens_probabilities(overrides: list[str]) -> None:
    # Independent: each prompt alone through forward(); log-softmax over the vocabulary at the last
    # position, read at each option's token, then renormalised over the options (Prismatic's rule).
    model = tiny_vlm(*overrides, seed=3)
    imgs = [image((230, 30, 30)), None, image((30, 60, 230))]
    prompts = ["what color is the square ?", "is the sky blue ?", "what shape is the blue object ?"]
    options = ["red", "blue", "yes", "True"]
    got = model.option_logprobs(imgs, prompts, options)
    token_ids = [model.tokenizer.convert_tokens_to_ids(o) for o in options]
    for row, img, prompt in zip(got, imgs, prompts):
        ids = torch.tensor([model.build_prompt_ids(prompt, img is not None)])
        pixels = model.preprocess_images([img]) if img is not None else None
        logits = model(input_ids=ids, pixel_values=pixels).logits[0, -1]
        expected = torch.log_softmax(torch.log_softmax(logits.float(), -1)[token_ids], -1)
        assert list(row) == options
        torch.testing.assert_close(torch.tensor(list(row.values())), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="option 'zebra-crossing' must be one known token"):
        model.option_logprobs(imgs, prompts, ["red", "zebra-crossing"])


@pytest.mark.parametrize("overrides", [[], LLAMA_OVERRIDES], ids=["mamba", "llama"])
def test_save_load_round_trip_gives_identical_logits(tmp_path: Path, overrides: list[str]) -> None:
    model = tiny_vlm(*overrides)
    with torch.no_grad():
        for p in model.projector.parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = batch_for(model, tmp_path)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    model.save_pretrained(tmp_path / "saved")
    loaded = MambaVLM.from_pretrained(tmp_path / "saved").eval()
    assert loaded.config.spec == model.config.spec
    assert loaded.config.text_config.to_diff_dict() | {"dtype": None} == model.config.text_config.to_diff_dict() | {"dtype": None}
    assert type(loaded.llm) is (LlamaForCausalLM if overrides else MambaForCausalLM)
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    assert loaded.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    assert not list(tmp_path.glob(".tmp-*")), "temporary directory left behind"


def test_load_errors_name_the_problem(tmp_path: Path) -> None:
    model = tiny_vlm()
    model.save_pretrained(tmp_path / "saved")
    key = "projector.first.out_proj.weight"
    (shard,) = [f for f in (tmp_path / "saved").glob("model*.safetensors") if key in load_file(str(f))]
    state = load_file(str(shard))
    state[key] = torch.zeros(3, 3)
    save_file(state, str(shard), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{key}: checkpoint has shape \(3, 3\), model expects \(64, 64\)"):
        MambaVLM.from_pretrained(tmp_path / "saved")
    with pytest.raises(FileNotFoundError, match="not a MambaVLM directory"):
        MambaVLM.from_pretrained(tmp_path)


def save_first_layout(model: MambaVLM, path: Path) -> None:
    """What mambavlm's save_pretrained wrote before it was a transformers model."""
    path.mkdir()
    (path / LEGACY_CONFIG_FILE).write_text(yaml.safe_dump(model.config.spec.model_dump(mode="json")))
    model.llm.save_pretrained(path / LEGACY_LLM_DIR)
    model.tokenizer.save_pretrained(path / LEGACY_TOKENIZER_DIR)
    own = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("llm.")}
    save_file(own, str(path / LEGACY_WEIGHTS_FILE), metadata={"format": "pt"})


def test_first_layout_checkpoints_load_and_convert(tmp_path: Path) -> None:
    """A directory in the first layout loads with the same logits (also through the Auto class, with
    dtype), refuses loading options it cannot honour with a message saying how to convert, and its
    save_pretrained is the transformers layout."""
    model = tiny_vlm()
    batch = batch_for(model, tmp_path)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    save_first_layout(model, tmp_path / "old")
    old = MambaVLM.from_pretrained(tmp_path / "old").eval()
    torch.testing.assert_close(old(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    assert old.config.spec == model.config.spec
    assert MambaVLM.from_pretrained(tmp_path / "old", dtype=torch.bfloat16).llm.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="save_pretrained it to convert it"):
        MambaVLM.from_pretrained(tmp_path / "old", low_cpu_mem_usage=True)
    old.save_pretrained(tmp_path / "new")
    assert (tmp_path / "new" / "config.json").is_file() and not (tmp_path / "new" / LEGACY_CONFIG_FILE).exists()
    new = AutoModelForImageTextToText.from_pretrained(tmp_path / "new").eval()
    assert type(new) is MambaVLM
    torch.testing.assert_close(new(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_bad_inputs_are_reported(tmp_path: Path) -> None:
    model = tiny_vlm()
    batch = batch_for(model, tmp_path)
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match="64 image placeholder tokens, but pixel_values give 1 images"):
        model(input_ids=batch["input_ids"], pixel_values=[p[:1] for p in batch["pixel_values"]])
    with pytest.raises(ValueError, match="sequence too long: 300 tokens > max_length=256"):
        model(input_ids=torch.zeros(1, 300, dtype=torch.long))
    with pytest.raises(ValueError, match="contains <image> but no image"):
        model.answer(None, ["<image> what ?"])


@pytest.mark.parametrize("scan_mode", ["cross-stitch", "cross-cat"])
def test_describe_shows_the_projector_scan_and_each_parts_parameters(scan_mode: str, capsys) -> None:
    """python -m mambavlm.describe: each part's parameters as the model counts them, the total their
    sum, and the projector's scan mode (an override of it showed nowhere: a fresh user's trial)."""
    from mambavlm.describe import main

    assert main([str(TINY_MODEL), f"projector.scan_mode={scan_mode}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines if line.startswith(("vision.", "projector", "llm", "total"))}
    model = tiny_vlm(f"projector.scan_mode={scan_mode}")
    assert f"mamba ({scan_mode}, d_state" in rows["projector"]
    parts = {"projector": model.projector, "llm": model.llm, "vision.encoders.0": model.vision.encoders[0]}
    for name, module in parts.items():
        assert int(rows[name].split()[-2].replace(",", "")) == sum(p.numel() for p in module.parameters()), name
    assert int(rows["total"].split()[-2].replace(",", "")) == sum(p.numel() for p in model.parameters())


def test_describe_shows_which_layers_of_a_hybrid_llm_are_mamba2(capsys) -> None:
    """describe of a distilled hybrid (``hybrid_llama``) did not say which layers were Mamba-2 and which
    attention: an ``llm layers:`` line above num_visual_tokens now gives the count of each and the Mamba-2
    indices as ranges. Worked by hand: 10 layers, Mamba-2 in all but 4 and 6 (listed out of order). A model
    whose LLM is not hybrid prints no such line."""
    from mambavlm.describe import main

    llm = ("{hidden_size: 64, intermediate_size: 128, num_hidden_layers: 10, num_attention_heads: 4, "
           "num_key_value_heads: 2, vocab_size: 1024, mamba_layers: [9, 0, 1, 2, 3, 5, 7, 8], "
           "mamba2_mixer: {hidden_size: 64, num_heads: 4, head_dim: 16, d_state: 8}}")
    assert main([str(TINY_MODEL), "llm.family=hybrid_llama", f"llm.config={llm}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2:] == ["llm layers: 8 Mamba-2 (0-3, 5, 7-9), 2 attention", "num_visual_tokens: 32"]
    assert main([str(TINY_MODEL)]) == 0
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("llm layers")]


def test_index_ranges_writes_runs_of_consecutive_layers_as_ranges() -> None:
    from mambavlm.llm.hybrid import index_ranges

    assert [index_ranges(x) for x in ([], [4], [3, 2], [0, 2, 4], [1, 1, 2])] == ["", "4", "2-3", "0, 2, 4", "1-2"]


def test_describe_takes_a_saved_model_directory_and_names_other_directories(tmp_path: Path, capsys) -> None:
    """A saved model's directory describes as the YAML it was built from (a fresh user pointed describe
    at a distilled student's folder and was told a 'config file' did not exist); another directory,
    or overrides with a saved model, get one error line."""
    from mambavlm.describe import main

    tiny_vlm().save_pretrained(tmp_path / "model")
    assert main([str(TINY_MODEL)]) == 0
    from_yaml = capsys.readouterr().out
    assert main([str(tmp_path / "model")]) == 0
    assert capsys.readouterr().out == from_yaml
    # a train config: its model section, as that section written out as a model YAML describes
    from mambavlm.training import load_train_config

    train_yaml = ROOT / "configs" / "train" / "tiny.yaml"
    section = tmp_path / "section.yaml"
    section.write_text(yaml.safe_dump(load_train_config(train_yaml).model.model_dump(mode="json")))
    assert main([str(section)]) == 0
    from_section = capsys.readouterr().out
    assert main([str(train_yaml)]) == 0
    assert capsys.readouterr().out == from_section != from_yaml
    assert main([str(train_yaml), "model.projector.d_state=4"]) == 0
    assert main([str(section), "projector.d_state=4"]) == 0
    with_override, same = capsys.readouterr().out.split("model: ", 2)[1:]
    assert with_override == same and "model: " + same != from_section
    (tmp_path / "run").mkdir()  # a run's output directory: its final/, as eval/ and chat take it
    (tmp_path / "run" / "final").symlink_to(tmp_path / "model", target_is_directory=True)
    assert main([str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out == from_yaml
    assert main([str(tmp_path)]) == 2
    assert f"error: {tmp_path} is a directory but not a saved MambaVLM" in capsys.readouterr().err
    assert main([str(tmp_path / "model"), "projector.d_state=4"]) == 2
    assert "overrides apply to a model YAML" in capsys.readouterr().err
