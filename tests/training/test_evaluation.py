"""Evaluation helpers: answer normalisation and exact match, blind mode (blank images)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mambavlm.data.llava import LlavaDataset
from mambavlm.data.synthetic import make_shapes_vqa
from mambavlm.training import BlankImage, exact_match, normalize_answer
from mambavlm.training.evaluation import BLANK_COLOR


def test_answer_normalisation():
    assert normalize_answer("  Red.\n") == "red"
    assert normalize_answer("Two  Objects!") == "two objects"
    assert exact_match("Circle", "circle ")
    assert not exact_match("circles", "circle")


def test_blind_mode_blanks_the_images(tmp_path, tiny_model):
    train_json, _ = make_shapes_vqa(tmp_path, num_train=6, num_val=0, image_size=32)
    transforms = [e.preprocess for e in tiny_model.vision.encoders]

    def dataset(image_transforms):
        return LlavaDataset(
            train_json, tmp_path, tiny_model.tokenizer, tiny_model.template, image_transforms,
            tiny_model.num_visual_tokens, 256, tiny_model.add_bos,
        )

    seeing, blind = dataset(transforms), dataset([BlankImage(t) for t in transforms])
    grey = Image.new("RGB", (32, 32), BLANK_COLOR)
    for i in range(len(seeing)):
        for k, transform in enumerate(transforms):
            assert torch.equal(blind[i]["pixel_values"][k], transform(grey))
            assert not torch.equal(seeing[i]["pixel_values"][k], transform(grey))
        assert torch.equal(blind[i]["input_ids"], seeing[i]["input_ids"])


def test_records_that_cannot_be_answered_are_skipped_and_the_rest_answered(tmp_path, tiny_model):
    """A 300-word question, one that fits only without the new tokens, a question of the wrong type,
    two placeholders for one image, a placeholder without an image, a missing image: each is named with
    its reason; the good records are answered exactly as they are alone."""
    import json

    from mambavlm.training.evaluation import generate_answers, load_vqa_items

    _, val = make_shapes_vqa(tmp_path, num_train=0, num_val=3, image_size=32)
    records = json.loads(val.read_text())
    good = list(records)
    long_question = "<image>\n" + " ".join(["red"] * 300)
    prompt_tokens = len(tiny_model.build_prompt_ids("<image>\nred", True)) - 1  # all but the one word
    fits_alone = "<image>\n" + " ".join(["red"] * (256 - prompt_tokens - 4))
    bad = {
        "long": {"image": records[2]["image"], "q": long_question},
        "no_room": {"image": records[2]["image"], "q": fits_alone},
        "not_text": {"image": records[2]["image"], "q": 7},
        "two_images": {"image": records[2]["image"], "q": "<image> <image> what ?"},
        "no_image": {"q": "<image>\nwhat color ?"},
        "missing": {"image": "nowhere.png", "q": "what color ?"},
    }
    for name, spec in bad.items():
        record = {"id": name, "conversations": [{"from": "human", "value": spec["q"]}, {"from": "gpt", "value": "red"}]}
        if "image" in spec:
            record["image"] = spec["image"]
        records.append(record)
    items = load_vqa_items(records, tmp_path)
    rows, skipped = generate_answers(tiny_model, items, batch_size=4, max_new_tokens=8, show_progress=False)
    alone, _ = generate_answers(tiny_model, load_vqa_items(good, tmp_path), 1, 8, show_progress=False)
    assert [r["answer"] for r in rows] == [r["answer"] for r in alone]
    reasons = dict(skipped)
    assert sorted(reasons) == sorted(bad)
    assert "exceeds max_length=256" in reasons["long"] and "with 8 new tokens" in reasons["no_room"]
    assert "is a int, not a string" in reasons["not_text"]
    assert "holds 2 <image> placeholders" in reasons["two_images"]
    assert "has no image" in reasons["no_image"] and "image file not found" in reasons["missing"]


def test_an_entry_that_is_not_a_record_is_named_by_its_index() -> None:
    from mambavlm.training.evaluation import load_vqa_items

    good = {"id": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "x"}]}
    with pytest.raises(ValueError, match="record 1: a str, not a record"):
        load_vqa_items([good, "oops"], None)


def test_a_record_with_an_empty_reference_is_skipped_not_scored_against_nothing() -> None:
    """A val record whose assistant turn is empty or blank was scored against "": wrong for every answer
    but an empty one, and counted in the accuracy. It is named and skipped, as training skips it."""
    from mambavlm.training.evaluation import load_vqa_items, read_vqa_items

    def record(record_id: str, answer: str) -> dict:
        return {"id": record_id, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": answer}]}

    items, skipped = read_vqa_items([record("a", "red"), record("b", ""), record("c", " \n"), record("d", " x ")], None)
    assert [(i.id, i.reference) for i in items] == [("a", "red"), ("d", "x")]
    reason = "the assistant turn is empty: no reference answer to score against"
    assert skipped == [("b", reason), ("c", reason)]
    with pytest.raises(ValueError, match=f"record b: {reason}"):
        load_vqa_items([record("a", "red"), record("b", "")], None)


def test_records_sharing_an_id_are_each_answered_against_their_own_question(tmp_path, tiny_model) -> None:
    """Two val records with one id: both rows had taken the later record's question and reference."""
    import json

    from mambavlm.training.evaluation import generate_answers, load_vqa_items

    _, val = make_shapes_vqa(tmp_path, num_train=0, num_val=2, image_size=32)
    records = json.loads(val.read_text())
    records[1]["id"] = records[0]["id"]
    records[0]["conversations"][1]["value"] = "first reference"
    rows, skipped = generate_answers(tiny_model, load_vqa_items(records, tmp_path), 2, 4, show_progress=False)
    assert skipped == []
    assert [r["id"] for r in rows] == [records[0]["id"]] * 2
    assert [r["question"] for r in rows] == [r["conversations"][0]["value"] for r in records]
    assert [r["reference"] for r in rows] == ["first reference", records[1]["conversations"][1]["value"].strip()]
