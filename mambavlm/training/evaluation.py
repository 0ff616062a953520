"""Exact-match evaluation by greedy generation: shared by the trainer's val step and eval/evaluate.py.

Each LLaVA-format record contributes its first question and answer: the question is the first human
turn as written (``<image>`` included), the reference the first assistant turn. Answers are compared
after :func:`normalize_answer` (lowercase, punctuation removed, whitespace collapsed).
"""

from __future__ import annotations

import logging
import os
import string
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from mambavlm.data.llava import IMAGE_LOAD_ERRORS, load_records
from mambavlm.llm.templates import ASSISTANT_ROLES, HUMAN_ROLES
from mambavlm.vision.image import open_image

__all__ = [
    "BLANK_COLOR",
    "BlankImage",
    "VQAItem",
    "exact_match",
    "generate_answers",
    "iter_answers",
    "load_vqa_items",
    "normalize_answer",
]

logger = logging.getLogger(__name__)

MAX_IMAGE_WORKERS = 8
"""At most this many threads open and preprocess evaluation images (``image_workers``)."""

BLANK_COLOR: tuple[int, int, int] = (128, 128, 128)
"""The mid-grey every image becomes in a blind run."""

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation, collapse whitespace: ``" Red. "`` -> ``"red"``."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def exact_match(prediction: str, reference: str) -> bool:
    """Whether two answers are equal after :func:`normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(reference)


@dataclass(frozen=True)
class BlankImage:
    """Wrap an image transform so that it sees a blank grey image of the same size instead.

    Picklable, so it works in DataLoader workers.
    """

    transform: Callable[[Image.Image], Any]

    def __call__(self, image: Image.Image) -> Any:
        return self.transform(Image.new("RGB", image.size, BLANK_COLOR))


@dataclass(frozen=True)
class VQAItem:
    """One question to answer: ``image`` is a path (None for a text-only record)."""

    id: str
    image: Path | None
    question: str
    reference: str


def load_vqa_items(records: Sequence[dict] | str | Path, image_root: str | Path | None) -> list[VQAItem]:
    """The first question/answer pair of every LLaVA-format record.

    ``image_root`` None means the JSON file's directory (or the working directory for in-memory
    records). A record without a human turn followed by an assistant turn is a ValueError naming it
    (the question's own type is checked when it is answered: ``generate_answers``).
    """
    if image_root is None and isinstance(records, (str, Path)):
        image_root = Path(records).parent
    root = Path(image_root) if image_root is not None else Path()
    items = []
    for index, record in enumerate(load_records(records)):
        record_id = str(record.get("id", index))
        turns = record.get("conversations")
        if (
            not isinstance(turns, list)
            or len(turns) < 2
            or not all(isinstance(t, dict) for t in turns[:2])
            or not isinstance(turns[1].get("value"), str)
            or turns[0].get("from") not in HUMAN_ROLES
            or turns[1].get("from") not in ASSISTANT_ROLES
        ):
            raise ValueError(f"record {record_id}: expected a human turn then an assistant turn")
        image = record.get("image")
        items.append(
            VQAItem(
                id=record_id,
                image=root / image if image else None,
                question=turns[0]["value"],
                reference=turns[1]["value"].strip(),
            )
        )
    return items


def _open_image(path: Path, blind: bool) -> Image.Image | str:
    """The image as ``open_image`` decodes it for training (or a blank one of its size), or the reason
    it cannot be read."""
    if not path.is_file():
        return f"image file not found: {path}"
    try:
        image = open_image(path)
    except IMAGE_LOAD_ERRORS as err:
        return f"unreadable image {path}: {type(err).__name__}: {err}"
    return Image.new("RGB", image.size, BLANK_COLOR) if blind else image


def _load_item(model: Any, path: Path | None, blind: bool) -> tuple[Image.Image | str | None, list[Tensor] | None]:
    """Open one item's image and run it through the encoders' preprocessing (CPU work only).

    Returns its image, the reason it cannot be read, or None (no image); and its pixel values, one
    (1, 3, H_m, W_m) tensor per encoder (``model.preprocess_images``), or None.
    """
    image = _open_image(path, blind) if path is not None else None
    return image, (model.preprocess_images([image]) if isinstance(image, Image.Image) else None)


def _load_batch(
    pool: ThreadPoolExecutor, model: Any, batch: Sequence[tuple[str, Path | None, object]], blind: bool
) -> Future[tuple[list[Image.Image | str | None], list[Tensor] | None]]:
    """Start opening and preprocessing a batch's images on ``pool``, one task per item, and one that
    gathers them: (per item its image, the reason it cannot be read, or None; the readable images'
    pixel values in item order, one (N, 3, H_m, W_m) tensor per encoder, or None). For a model on
    CUDA the pixels are gathered into pinned memory, so that their copy to the GPU is asynchronous."""
    futures = [pool.submit(_load_item, model, path, blind) for _, path, _ in batch]
    pin = torch.device(model.device).type == "cuda"

    def gather() -> tuple[list[Image.Image | str | None], list[Tensor] | None]:
        loaded = [future.result() for future in futures]
        pixels = [item_pixels for _, item_pixels in loaded if item_pixels is not None]
        gathered = [torch.cat(column) for column in zip(*pixels)] if pixels else None
        if gathered is not None and pin:
            gathered = [column.pin_memory() for column in gathered]
        return [image for image, _ in loaded], gathered

    return pool.submit(gather)  # queued after its items, so it never waits on a task not yet started


def image_workers() -> int:
    """Threads that open and preprocess images during evaluation: the CPUs this process may use, at
    most ``MAX_IMAGE_WORKERS`` (decoding and resizing release the GIL, so they run in parallel)."""
    return max(1, min(MAX_IMAGE_WORKERS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))


def iter_answers(
    model: Any,
    items: Sequence[tuple[str, Path | None, object]],
    batch_size: int,
    max_new_tokens: int,
    blind: bool = False,
    show_progress: bool = True,
    fast: bool | None = None,
    options: Sequence[str] | None = None,
) -> Iterator[tuple[list[tuple[str, Any]], list[tuple[str, str]]]]:
    """Greedy answers of a MambaVLM to (id, image path or None, prompt) items, one batch at a time.

    Yields ``(answers, skipped)`` per batch: ``(id, answer)`` for each item answered, ``(id, reason)``
    for each that cannot be (an unreadable image, a prompt that is not a string, placeholders that do
    not match the image, a prompt too long for the model with ``max_new_tokens``). While one batch
    generates, ``image_workers()`` threads open and preprocess the next batch's images, one item per
    task (decoding and resizing release the GIL), so on a GPU the CPU work hides behind the model's. ``fast``: as in
    ``MambaVLM.generate_ids`` (None: the static decoder where it applies). ``options``: answer by
    likelihood instead (``MambaVLM.option_logprobs``): each answer is then {option: log-probability}.
    Raises ValueError for a batch size below 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = [items[start : start + batch_size] for start in range(0, len(items), batch_size)]
    with ThreadPoolExecutor(max_workers=image_workers(), thread_name_prefix="eval-images") as pool:
        pending = _load_batch(pool, model, batches[0], blind) if batches else None
        for index, batch in enumerate(tqdm(batches, desc="generate", disable=not show_progress)):
            images, pixels = pending.result()
            if index + 1 < len(batches):
                pending = _load_batch(pool, model, batches[index + 1], blind)
            ids, prompts, kept_images, kept_rows, skipped = [], [], [], [], []
            row = 0
            for (item_id, _, prompt), image in zip(batch, images):
                if isinstance(image, Image.Image):
                    row += 1
                problem = image if isinstance(image, str) else model.prompt_problem(prompt, image is not None, max_new_tokens)
                if problem is not None:
                    logger.warning("skipping %s: %s", item_id, problem)
                    skipped.append((item_id, problem))
                    continue
                ids.append(item_id)
                prompts.append(prompt)
                kept_images.append(image)
                if image is not None:
                    kept_rows.append(row - 1)
            answers = []
            if ids:
                kept_pixels = None
                if kept_rows == list(range(row)):
                    kept_pixels = pixels
                elif kept_rows:
                    index_tensor = torch.tensor(kept_rows)
                    kept_pixels = [p.index_select(0, index_tensor) for p in pixels]
                if options is None:
                    answers = model.answer(
                        kept_images, prompts, max_new_tokens=max_new_tokens, do_sample=False,
                        pixel_values=kept_pixels, fast=fast,
                    )
                else:
                    answers = model.option_logprobs(kept_images, prompts, options, pixel_values=kept_pixels)
            yield list(zip(ids, answers)), skipped


def generate_answers(
    model: Any,
    items: Sequence[VQAItem],
    batch_size: int,
    max_new_tokens: int,
    blind: bool = False,
    show_progress: bool = True,
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Greedy answers of a MambaVLM to ``items``, in batches (``iter_answers``).

    Returns ``(rows, skipped)``: one row ``{id, question, answer, reference, correct}`` per item that
    could be answered, and ``(id, reason)`` for each item that was skipped; the others are answered.
    """
    by_id = {item.id: item for item in items}
    rows: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    triples = [(item.id, item.image, item.question) for item in items]
    for answers, batch_skipped in iter_answers(model, triples, batch_size, max_new_tokens, blind, show_progress):
        skipped += batch_skipped
        for item_id, answer in answers:
            item = by_id[item_id]
            rows.append(
                {
                    "id": item.id,
                    "question": item.question,
                    "answer": answer,
                    "reference": item.reference,
                    "correct": exact_match(answer, item.reference),
                }
            )
    return rows, skipped
