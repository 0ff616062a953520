"""Shapes-VQA: a small synthetic visual question answering task that needs the image.

Each image is a plain grey square with 1-3 filled shapes (circle, square, triangle) in distinct cells
of a 3 x 3 grid; the objects of one image have distinct colours (red, green, blue, yellow) and
distinct shapes, so every question below has one answer, a single word of the tiny vocabulary:

=========  ===============================================  ============================  =========
type       question                                         answers                       blind
=========  ===============================================  ============================  =========
color      what color is the {shape} ?                      red green blue yellow         25 %
shape      what shape is the {color} object ?               circle square triangle        33.3 %
count      how many objects are there ?                     one two three                 33.3 %
relation   where is the {c1} {s1} compared to the {c2}      left right above below        25 %
           {s2} ?  (the two share a row or a column)
=========  ===============================================  ============================  =========

Scenes are drawn answer-first: question types cycle evenly and, within a type, answers cycle evenly,
and everything the question text names is sampled independently of the answer. So without the image
the best possible accuracy is the "blind" column: 7/24 = 29.2 % over the validation mix (types in
equal shares). With the image every answer is exact (the shapes are drawn without anti-aliasing).

Validation records hold one question. Training records hold 1-3 questions about one image, ordered
count -> color or shape -> relation and never both color and shape, so no earlier turn gives away a
later answer.

``python -m mambavlm.data.synthetic OUT_DIR --train N --val N`` writes the task to disk.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from mambavlm.llm.tokenizer import IMAGE_TOKEN

__all__ = [
    "ANSWERS",
    "BACKGROUND",
    "COLORS",
    "GRID",
    "QUESTION_TYPES",
    "SHAPES",
    "ShapeObject",
    "make_shapes_vqa",
    "render_scene",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 180, 30),
    "blue": (30, 60, 230),
    "yellow": (240, 220, 20),
}
BACKGROUND: tuple[int, int, int] = (128, 128, 128)
GRID = 3
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three")
DIRECTIONS: tuple[str, ...] = ("left", "right", "above", "below")
QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "relation")
ANSWERS: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "count": COUNT_WORDS,
    "relation": DIRECTIONS,
}
TURN_ORDER: tuple[str, ...] = ("count", "color", "shape", "relation")
MIN_CELL_PIXELS = 6


@dataclass(frozen=True)
class ShapeObject:
    """One filled shape in grid cell (row, col)."""

    color: str
    shape: str
    row: int
    col: int


def render_scene(objects: Sequence[ShapeObject], image_size: int) -> Image.Image:
    """Draw the objects on a plain background: an RGB image of ``image_size`` x ``image_size``."""
    cell = image_size // GRID
    if cell < MIN_CELL_PIXELS:
        raise ValueError(f"image_size must be >= {GRID * MIN_CELL_PIXELS}, got {image_size}")
    offset = (image_size - GRID * cell) // 2
    pad = max(1, cell // 8)
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        x0, y0 = offset + obj.col * cell + pad, offset + obj.row * cell + pad
        x1, y1 = offset + (obj.col + 1) * cell - pad - 1, offset + (obj.row + 1) * cell - pad - 1
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif obj.shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return image


def _random_objects(
    rng: random.Random,
    count: int,
    cells: list[tuple[int, int]],
    color: str | None = None,
    shape: str | None = None,
) -> list[ShapeObject]:
    """``count`` objects in ``cells`` with distinct colours and shapes; the first has the given ones."""
    colors = [color] if color else []
    colors += rng.sample([c for c in COLORS if c != color], count - len(colors))
    shapes = [shape] if shape else []
    shapes += rng.sample([s for s in SHAPES if s != shape], count - len(shapes))
    return [ShapeObject(c, s, r, k) for c, s, (r, k) in zip(colors, shapes, cells)]


def _all_cells() -> list[tuple[int, int]]:
    return [(r, c) for r in range(GRID) for c in range(GRID)]


def _relation(a: ShapeObject, b: ShapeObject) -> str | None:
    """Where ``a`` is compared to ``b`` when they share a row or a column, else None."""
    if a.row == b.row:
        return "left" if a.col < b.col else "right"
    if a.col == b.col:
        return "above" if a.row < b.row else "below"
    return None


def _scene_for_answer(rng: random.Random, qtype: str, answer: str) -> tuple[list[ShapeObject], str]:
    """A scene whose ``qtype`` question has ``answer``, and that question's text."""
    if qtype == "count":
        count = COUNT_WORDS.index(answer) + 1
        return _random_objects(rng, count, rng.sample(_all_cells(), count)), _question(qtype)
    if qtype == "relation":
        count = rng.randint(2, 3)
        line, (first, second) = rng.randrange(GRID), sorted(rng.sample(range(GRID), 2))
        a_pos, b_pos = (first, second) if answer in ("left", "above") else (second, first)
        if answer in ("left", "right"):
            cells = [(line, a_pos), (line, b_pos)]
        else:
            cells = [(a_pos, line), (b_pos, line)]
        cells += rng.sample([c for c in _all_cells() if c not in cells], count - 2)
        objects = _random_objects(rng, count, cells)
        return objects, _question(qtype, objects[0], objects[1])
    count = rng.randint(1, 3)
    cells = rng.sample(_all_cells(), count)
    if qtype == "color":
        objects = _random_objects(rng, count, cells, color=answer, shape=rng.choice(SHAPES))
    else:
        objects = _random_objects(rng, count, cells, color=rng.choice(list(COLORS)), shape=answer)
    return objects, _question(qtype, objects[0])


def _question(qtype: str, a: ShapeObject | None = None, b: ShapeObject | None = None) -> str:
    if qtype == "color":
        return f"what color is the {a.shape} ?"
    if qtype == "shape":
        return f"what shape is the {a.color} object ?"
    if qtype == "count":
        return "how many objects are there ?"
    return f"where is the {a.color} {a.shape} compared to the {b.color} {b.shape} ?"


def _extra_question(
    rng: random.Random, qtype: str, objects: list[ShapeObject]
) -> tuple[str, str] | None:
    """A ``qtype`` question about a given scene and its answer, or None if the scene has none."""
    if qtype == "count":
        return _question(qtype), COUNT_WORDS[len(objects) - 1]
    if qtype == "relation":
        pairs = [(a, b) for a in objects for b in objects if a != b and _relation(a, b)]
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        return _question(qtype, a, b), _relation(a, b)
    obj = rng.choice(objects)
    return _question(qtype, obj), obj.color if qtype == "color" else obj.shape


def _conversation(questions: list[tuple[str, str]]) -> list[dict[str, str]]:
    turns = []
    for i, (question, answer) in enumerate(questions):
        turns.append(
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{question}" if i == 0 else question}
        )
        turns.append({"from": "gpt", "value": answer})
    return turns


def _balanced_plan(rng: random.Random, size: int) -> list[tuple[str, str]]:
    """(question type, answer) pairs: types in equal shares, answers within a type too, shuffled."""
    seen = dict.fromkeys(QUESTION_TYPES, 0)
    plan = []
    for i in range(size):
        qtype = QUESTION_TYPES[i % len(QUESTION_TYPES)]
        plan.append((qtype, ANSWERS[qtype][seen[qtype] % len(ANSWERS[qtype])]))
        seen[qtype] += 1
    rng.shuffle(plan)
    return plan


def _make_split(
    out_dir: Path, split: str, size: int, image_size: int, seed: int, max_turns: int
) -> Path:
    rng = random.Random(f"shapes-vqa:{split}:{seed}")
    records = []
    for i, (qtype, answer) in enumerate(_balanced_plan(rng, size)):
        objects, question = _scene_for_answer(rng, qtype, answer)
        asked = {qtype: (question, answer)}
        num_turns = rng.randint(1, max_turns)
        for extra in rng.sample(QUESTION_TYPES, len(QUESTION_TYPES)):
            if len(asked) == num_turns:
                break
            if extra in asked or {"color", "shape"} <= asked.keys() | {extra}:
                continue
            qa = _extra_question(rng, extra, objects)
            if qa is not None:
                asked[extra] = qa
        order = [t for t in TURN_ORDER if t in asked]
        name = f"{split}_{i:06d}"
        image_path = f"images/{name}.png"
        render_scene(objects, image_size).save(out_dir / image_path)
        records.append(
            {
                "id": name,
                "image": image_path,
                "conversations": _conversation([asked[t] for t in order]),
                "question_types": order,
            }
        )
    path = out_dir / f"{split}.json"
    path.write_text(json.dumps(records, indent=1) + "\n")
    return path


def make_shapes_vqa(
    out_dir: str | Path, num_train: int, num_val: int, image_size: int = 32, seed: int = 0
) -> tuple[Path, Path]:
    """Write ``out_dir/images/*.png`` and LLaVA-format ``train.json`` / ``val.json``; returns their paths.

    Image paths in the records are relative to ``out_dir`` (the dataset's ``image_root``). The output
    depends only on the arguments; the validation split does not depend on ``num_train``.
    """
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0, got {num_train} and {num_val}")
    if image_size < GRID * MIN_CELL_PIXELS:
        raise ValueError(f"image_size must be >= {GRID * MIN_CELL_PIXELS}, got {image_size}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    train = _make_split(out_dir, "train", num_train, image_size, seed, max_turns=3)
    val = _make_split(out_dir, "val", num_val, image_size, seed, max_turns=1)
    return train, val


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: write the task under OUT_DIR and print where."""
    parser = argparse.ArgumentParser(
        description="Write the Shapes-VQA synthetic task (LLaVA format)."
    )
    parser.add_argument(
        "out_dir", type=Path, help="output directory (images/, train.json, val.json)"
    )
    parser.add_argument("--train", type=int, default=4000, help="number of training records")
    parser.add_argument("--val", type=int, default=400, help="number of validation records")
    parser.add_argument("--image-size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, val = make_shapes_vqa(args.out_dir, args.train, args.val, args.image_size, args.seed)
    print(f"wrote {args.train} training records to {train}")
    print(f"wrote {args.val} validation records to {val}")
    print(f"images under {args.out_dir / 'images'} (image_root = {args.out_dir})")


if __name__ == "__main__":
    main()
