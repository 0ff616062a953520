"""LLaVA dataset (bad data -> SkippedSample, truncation, image placeholders) and the collator."""

from __future__ import annotations

import io
import json
import logging

import pytest
import torch
from PIL import Image

from mambavlm.data.collate import VLMCollator
from mambavlm.data.llava import SKIP_KINDS, LlavaDataset, SkippedSample
from mambavlm.llm.templates import get_template
from mambavlm.llm.tokenizer import build_tiny_tokenizer
from tests.conftest import to_tensor_at


NUM_IMAGE_TOKENS = 3
MAX_LENGTH = 24


def png_bytes(color: tuple[int, int, int], size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return buf.getvalue()


def qa(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture()
def dataset(tmp_path) -> LlavaDataset:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "red.png").write_bytes(png_bytes((255, 0, 0)))
    (tmp_path / "img" / "blue.png").write_bytes(png_bytes((0, 0, 255)))
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (tmp_path / "img" / "truncated.png").write_bytes(png_bytes((0, 255, 0), size=64)[:60])
    records = [
        {"id": "good", "image": "img/red.png", "conversations": qa("what color is it ?", "red")},
        {"id": "text", "conversations": qa("how many ?", "two")},
        {"id": "missing", "image": "img/nope.png", "conversations": qa("what color ?", "red")},
        {"id": "directory", "image": "img", "conversations": qa("what color ?", "red")},
        {"id": "corrupt", "image": "img/corrupt.png", "conversations": qa("what color ?", "red")},
        {
            "id": "truncated_png",
            "image": "img/truncated.png",
            "conversations": qa("what color ?", "green"),
        },
        {
            "id": "no_gpt",
            "image": "img/red.png",
            "conversations": [{"from": "human", "value": "hello"}],
        },
        {"id": "bad_order", "conversations": qa("a", "b") + qa("c", "d")[1:]},
        {
            "id": "image_cut",
            "image": "img/blue.png",
            "conversations": qa(
                "please describe this image in a few short words " * 2 + "now <image>", "blue"
            ),
        },
        {
            "id": "long_answer",
            "image": "img/blue.png",
            "conversations": qa("<image>\ncolor ?", " ".join(["blue"] * 30)),
        },
        {"id": "answer_cut", "conversations": qa(" ".join(["one"] * 30), "two")},
        {
            "id": "two_images",
            "image": "img/red.png",
            "conversations": qa("<image> <image> what ?", "red"),
        },
        {"id": "empty_answer", "image": "img/red.png", "conversations": qa("<image>\ncolor ?", "")},
        {"id": "blank_answer", "conversations": qa("how many ?", " \n\t ")},
        {"id": "later_blank", "conversations": qa("how many ?", "two") + qa("and now ?", "   ")},
        {"id": "image_in_answer", "image": "img/red.png", "conversations": qa("color ?", "<image> red")},
    ]
    json_path = tmp_path / "data.json"
    json_path.write_text(json.dumps(records))
    ds = LlavaDataset(
        json_path,
        image_root=tmp_path,
        tokenizer=build_tiny_tokenizer(),
        template=get_template("plain"),
        image_transforms=[to_tensor_at(8), to_tensor_at(4)],
        num_visual_tokens=NUM_IMAGE_TOKENS,
        max_length=MAX_LENGTH,
        add_bos=True,
    )
    json_path.unlink()  # records are read once, at construction
    return ds


def by_id(ds: LlavaDataset) -> dict[str, object]:
    return {ds.records[i]["id"]: ds[i] for i in range(len(ds))}


def test_good_samples_load(dataset):
    tok = dataset.tokenizer
    items = by_id(dataset)
    good = items["good"]
    expected_text = "<s> In : what color is it ? Out : red </s>"
    ids = good["input_ids"].tolist()
    assert ids[:3] == [
        tok.bos_token_id,
        tok.convert_tokens_to_ids("In"),
        tok.convert_tokens_to_ids(":"),
    ]
    assert ids[3:6] == [-200] * NUM_IMAGE_TOKENS  # "<image>\n" prepended to the first human turn
    assert tok.decode([i for i in ids if i >= 0]) == expected_text
    labels = good["labels"].tolist()
    assert tok.decode([i for i in labels if i != -100]) == "red </s>"
    assert labels[-2:] == ids[-2:] and set(labels[:-2]) == {-100}
    assert good["truncated"] is False
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    assert [p.shape for p in good["pixel_values"]] == [(3, 8, 8), (3, 4, 4)]
    assert all(torch.equal(p, red.expand_as(p)) for p in good["pixel_values"])

    text = items["text"]
    assert text["pixel_values"] is None
    assert -200 not in text["input_ids"].tolist()
    assert tok.decode(text["input_ids"].tolist()) == "<s> In : how many ? Out : two </s>"


@pytest.mark.parametrize(
    "record_id, reason",
    [
        ("missing", "image file not found"),
        ("directory", "image path is a directory, not a file"),
        ("corrupt", "unreadable image"),
        ("truncated_png", "unreadable image"),
        ("no_gpt", "no assistant turn"),
        ("bad_order", "malformed conversations"),
        ("image_cut", "would cut into the image tokens"),
        ("answer_cut", "leaves no answer tokens"),
        ("two_images", "holds 2 <image> placeholders"),
        ("empty_answer", "assistant turn 1 is empty"),
        ("blank_answer", "assistant turn 1 is empty"),
        ("later_blank", "assistant turn 3 is empty"),
        ("image_in_answer", "assistant turn 1 holds <image>"),
    ],
)
def test_bad_records_are_skipped_with_reason(dataset, caplog, record_id, reason):
    index = next(i for i, r in enumerate(dataset.records) if r["id"] == record_id)
    with caplog.at_level(logging.WARNING, logger="mambavlm.data.llava"):
        item = dataset[index]
    assert isinstance(item, SkippedSample)
    assert item.id == record_id
    assert reason in item.reason
    assert item.kind in SKIP_KINDS
    assert record_id in caplog.text and reason in caplog.text


def test_long_sequence_is_truncated_not_skipped(dataset):
    item = by_id(dataset)["long_answer"]
    assert item["truncated"] is True
    assert item["input_ids"].shape == item["labels"].shape == (MAX_LENGTH,)
    assert item["input_ids"].tolist().count(-200) == NUM_IMAGE_TOKENS
    blue = dataset.tokenizer.convert_tokens_to_ids("blue")
    assert item["labels"].tolist()[-1] == blue


def test_existing_placeholder_is_not_doubled(tmp_path):
    (tmp_path / "x.png").write_bytes(png_bytes((0, 0, 0)))
    records = [{"id": "a", "image": "x.png", "conversations": qa("what is <image> here ?", "dog")}]
    ds = LlavaDataset(
        records,
        tmp_path,
        build_tiny_tokenizer(),
        get_template("plain"),
        [to_tensor_at(4)],
        2,
        64,
        add_bos=False,
    )
    ids = ds[0]["input_ids"].tolist()
    tok = ds.tokenizer
    assert ids.count(-200) == 2
    assert ids[:5] == tok.convert_tokens_to_ids(["In", ":", "what", "is"]) + [-200]
    assert records[0]["conversations"][0]["value"] == "what is <image> here ?"


def test_collator_pads_masks_and_stacks_images(dataset):
    items = by_id(dataset)
    batch_items = [items["good"], items["missing"], items["text"], items["long_answer"]]
    batch = VLMCollator(pad_token_id=0)(batch_items)
    assert batch["ids"] == ["good", "text", "long_answer"]
    assert batch["skipped"] == [items["missing"]] and items["missing"].kind == "image file not found"
    assert batch["num_truncated"] == 1

    kept = [items["good"], items["text"], items["long_answer"]]
    lengths = [len(s["input_ids"]) for s in kept]
    assert batch["num_tokens"] == sum(lengths) == int(batch["attention_mask"].sum())  # host-side, as the mask counts
    assert (
        batch["input_ids"].shape
        == batch["labels"].shape
        == batch["attention_mask"].shape
        == (3, max(lengths))
    )
    assert batch["attention_mask"].dtype == torch.long
    for row, sample in enumerate(kept):
        n = lengths[row]
        assert torch.equal(batch["input_ids"][row, :n], sample["input_ids"])
        assert torch.equal(batch["labels"][row, :n], sample["labels"])
        assert batch["input_ids"][row, n:].eq(0).all() and batch["labels"][row, n:].eq(-100).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)

    pixels = batch["pixel_values"]
    assert [p.shape for p in pixels] == [(2, 3, 8, 8), (2, 3, 4, 4)]
    for k in range(2):
        assert torch.equal(pixels[k][0], items["good"]["pixel_values"][k])
        assert torch.equal(pixels[k][1], items["long_answer"]["pixel_values"][k])
    assert not torch.equal(pixels[0][0], pixels[0][1])  # red image first, blue second


def test_collator_text_only_and_all_skipped(dataset):
    items = by_id(dataset)
    collate = VLMCollator(pad_token_id=0)
    text_only = collate([items["text"]])
    assert text_only["pixel_values"] is None and text_only["input_ids"].shape[0] == 1
    empty = collate([items["missing"], items["corrupt"]])
    assert empty["input_ids"] is None
    assert [(s.id, s.kind) for s in empty["skipped"]] == [("missing", "image file not found"), ("corrupt", "unreadable image")]


def test_an_entry_that_is_not_a_record_is_skipped_and_a_bad_file_is_named(tmp_path, caplog):
    """One stray list entry (a string, a list) no longer aborts the data: it is skipped, counted as
    "not a record" and named by its index; a file that is not JSON names the file."""
    (tmp_path / "x.png").write_bytes(png_bytes((0, 0, 0)))
    good = {"id": "a", "image": "x.png", "conversations": qa("<image>\nwhat ?", "dog")}
    data = tmp_path / "train.json"
    data.write_text(json.dumps([good, "oops", [1, 2]]))
    ds = LlavaDataset(data, tmp_path, build_tiny_tokenizer(), get_template("plain"), [to_tensor_at(4)], 2, 64, add_bos=False)
    assert not isinstance(ds[0], SkippedSample)
    with caplog.at_level(logging.WARNING, logger="mambavlm.data.llava"):
        skipped = [ds[1], ds[2]]
    assert [(s.id, s.kind) for s in skipped] == [("1", "not a record"), ("2", "not a record")]
    assert "entry 1 is a str" in caplog.text and "entry 2 is a list" in caplog.text
    png = tmp_path / "x.png"
    with pytest.raises(ValueError, match=r"x\.png: not a JSON file of LLaVA records"):
        LlavaDataset(png, tmp_path, build_tiny_tokenizer(), get_template("plain"), [to_tensor_at(4)], 2, 64, add_bos=False)
    data.write_text(json.dumps({"id": "a"}))
    with pytest.raises(ValueError, match="expected a list of record dicts, got a JSON dict"):
        LlavaDataset(data, tmp_path, build_tiny_tokenizer(), get_template("plain"), [to_tensor_at(4)], 2, 64, add_bos=False)


@pytest.mark.parametrize(
    "turns, reason",
    [
        # a human turn without its value, in an image record: was "holds 0 <image> placeholders, expected 1"
        ([{"from": "human"}, {"from": "gpt", "value": "red"}], "turn 0 has no 'value'"),
        ([{"from": "human", "value": None}, {"from": "gpt", "value": "red"}], "turn 0: 'value' must be a string, got NoneType"),
        # roles the templates do not know: was "no assistant turn"
        ([{"from": "USER", "value": "color ?"}, {"from": "ASSISTANT", "value": "red"}], "turn 0 has role 'USER'"),
        ([{"from": "human", "value": "color ?"}, {"from": "bot", "value": "red"}], "turn 1 has role 'bot'"),
        ([{"value": "color ?"}, {"from": "gpt", "value": "red"}], "turn 0 has no 'from'"),
        ([{"from": ["human"], "value": "color ?"}, {"from": "gpt", "value": "red"}], "turn 0 has role ['human']"),
    ],
)
def test_a_malformed_turn_is_named_as_such(tmp_path, turns, reason):
    """The reason names the turn at fault, not a consequence of it (a missing placeholder, no answer)."""
    (tmp_path / "x.png").write_bytes(png_bytes((0, 0, 0)))
    record = {"id": "r", "image": "x.png", "conversations": turns}
    ds = LlavaDataset([record], tmp_path, build_tiny_tokenizer(), get_template("plain"), [to_tensor_at(4)], 2, 64, add_bos=False)
    item = ds[0]
    assert isinstance(item, SkippedSample)
    assert (item.kind, item.reason) == ("malformed conversations", f"malformed conversations: {reason}" + (
        "; expected one of assistant, gpt, human, user" if "role" in reason or "'from'" in reason else ""))
