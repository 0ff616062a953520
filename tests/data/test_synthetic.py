"""The Shapes-VQA generator: answers that follow from the pixels, balance, determinism, the CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from mambavlm.data.llava import LlavaDataset
from mambavlm.data.synthetic import (
    ANSWERS,
    BACKGROUND,
    COLORS,
    GRID,
    QUESTION_TYPES,
    main,
    make_shapes_vqa,
)
from mambavlm.llm.templates import get_template
from mambavlm.llm.tokenizer import build_tiny_tokenizer
from tests.conftest import to_tensor_at


def solve_from_pixels(path: Path, image_size: int) -> dict:
    """Recover the objects from the PNG alone: colour -> (shape, row, col) by pixel masks."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    palette = {name: np.array(rgb) for name, rgb in COLORS.items()}
    known = np.zeros(pixels.shape[:2], dtype=bool) | (pixels == np.array(BACKGROUND)).all(-1)
    objects = {}
    for name, rgb in palette.items():
        mask = (pixels == rgb).all(-1)
        known |= mask
        if not mask.any():
            continue
        ys, xs = np.nonzero(mask)
        fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        shape = "square" if fill > 0.95 else "circle" if fill > 0.68 else "triangle"
        cell = image_size / GRID
        objects[name] = (shape, int(ys.mean() // cell), int(xs.mean() // cell))
    assert known.all(), f"{path}: pixels outside background and palette"
    return objects


def answer(objects: dict, question: str) -> str:
    words = question.replace("<image>", "").split()
    by_shape = {shape: color for color, (shape, _, _) in objects.items()}
    if words[:3] == ["what", "color", "is"]:
        return by_shape[words[4]]
    if words[:3] == ["what", "shape", "is"]:
        return objects[words[4]][0]
    if words[:2] == ["how", "many"]:
        return ["one", "two", "three"][len(objects) - 1]
    assert words[:2] == ["where", "is"], question
    (_, r1, c1), (_, r2, c2) = objects[words[3]], objects[words[8]]
    assert objects[words[3]][0] == words[4] and objects[words[8]][0] == words[9]
    if r1 == r2:
        return "left" if c1 < c2 else "right"
    assert c1 == c2, question
    return "above" if r1 < r2 else "below"


def test_synthetic_answers_follow_from_pixels(tmp_path):
    train, val = make_shapes_vqa(tmp_path, num_train=40, num_val=40, image_size=32, seed=1)
    for path in (train, val):
        for record in json.loads(path.read_text()):
            objects = solve_from_pixels(tmp_path / record["image"], 32)
            turns = record["conversations"]
            assert turns[0]["value"].startswith("<image>\n")
            for question, reply in zip(turns[0::2], turns[1::2]):
                assert reply["value"] == answer(objects, question["value"]), record["id"]


def test_synthetic_balance_and_turn_structure(tmp_path):
    train, val = make_shapes_vqa(tmp_path, num_train=120, num_val=96, seed=0)
    val_records = json.loads(val.read_text())
    assert all(len(r["conversations"]) == 2 for r in val_records)
    per_type = {t: Counter() for t in QUESTION_TYPES}
    for r in val_records:
        per_type[r["question_types"][0]][r["conversations"][1]["value"]] += 1
    for qtype, counts in per_type.items():
        assert sum(counts.values()) == 96 // len(QUESTION_TYPES)
        assert set(counts) == set(ANSWERS[qtype])
        assert max(counts.values()) - min(counts.values()) <= 1, (qtype, counts)

    order = ["count", "color", "shape", "relation"]
    lengths = Counter()
    for r in json.loads(train.read_text()):
        types = r["question_types"]
        lengths[len(types)] += 1
        assert len(r["conversations"]) == 2 * len(types)
        assert types == sorted(types, key=order.index) and not {"color", "shape"} <= set(types)
    assert set(lengths) == {1, 2, 3}


def test_synthetic_is_deterministic(tmp_path):
    paths_a = make_shapes_vqa(tmp_path / "a", 12, 6, seed=5)
    paths_b = make_shapes_vqa(tmp_path / "b", 12, 6, seed=5)
    paths_c = make_shapes_vqa(tmp_path / "c", 12, 6, seed=6)
    for pa, pb in zip(paths_a, paths_b):
        assert pa.read_text() == pb.read_text()
    images = sorted(p.name for p in (tmp_path / "a" / "images").iterdir())
    assert len(images) == 18
    for name in images:
        assert (tmp_path / "a" / "images" / name).read_bytes() == (
            tmp_path / "b" / "images" / name
        ).read_bytes()
    assert paths_a[0].read_text() != paths_c[0].read_text()
    make_shapes_vqa(tmp_path / "d", 30, 6, seed=5)
    assert (tmp_path / "d" / "val.json").read_text() == paths_a[1].read_text()


def test_synthetic_cli_and_dataset_load(tmp_path, capsys):
    main([str(tmp_path), "--train", "4", "--val", "2"])
    out = capsys.readouterr().out
    assert str(tmp_path / "train.json") in out and str(tmp_path / "val.json") in out
    ds = LlavaDataset(
        tmp_path / "val.json",
        tmp_path,
        build_tiny_tokenizer(),
        get_template("plain"),
        [to_tensor_at(32)],
        4,
        64,
        True,
    )
    items = [ds[i] for i in range(len(ds))]
    assert all(
        isinstance(item, dict) and item["input_ids"].tolist().count(-200) == 4 for item in items
    )
    assert all(3 not in item["input_ids"].tolist() for item in items)  # no <unk>
