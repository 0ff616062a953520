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
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from mambavlm.data.llava import IMAGE_LOAD_ERRORS, load_records
from mambavlm.llm.templates import ASSISTANT_ROLES, HUMAN_ROLES
from mambavlm.processing import left_pad
from mambavlm.progress import Progress
from mambavlm.vision.image import image_path_problem, open_image

__all__ = [
    "BLANK_COLOR",
    "BlankImage",
    "VQAItem",
    "exact_match",
    "generate_answers",
    "iter_answers",
    "load_vqa_items",
    "normalize_answer",
    "read_vqa_items",
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
    records). An entry that is not a record, a record without a human turn followed by an assistant
    turn, or one whose assistant turn is empty (no reference), is a ValueError naming it (the question's own type is checked when it is answered:
    ``generate_answers``); ``read_vqa_items`` skips those instead.
    """
    items, skipped = _vqa_items(records, image_root)
    if skipped:
        record_id, reason = skipped[0]
        raise ValueError(f"record {record_id}: {reason}")
    return items


def read_vqa_items(
    records: Sequence[dict] | str | Path, image_root: str | Path | None
) -> tuple[list[VQAItem], list[tuple[str, str]]]:
    """``load_vqa_items`` that skips what it would refuse: ``(items, skipped)``, ``(id, reason)`` for each
    entry that is not a record, has no human turn followed by an assistant turn or an empty assistant turn
    (the entry's index for an id where it has none), each named in a warning. A file that is not a JSON list of records is still
    a ValueError naming it (``load_records``)."""
    items, skipped = _vqa_items(records, image_root)
    for record_id, reason in skipped:
        logger.warning("skipping %s: %s", record_id, reason)
    return items, skipped


def _vqa_items(
    records: Sequence[dict] | str | Path, image_root: str | Path | None
) -> tuple[list[VQAItem], list[tuple[str, str]]]:
    if image_root is None and isinstance(records, (str, Path)):
        image_root = Path(records).parent
    root = Path(image_root) if image_root is not None else Path()
    items: list[VQAItem] = []
    skipped: list[tuple[str, str]] = []
    for index, record in enumerate(load_records(records)):
        if not isinstance(record, dict):
            skipped.append((str(index), f"a {type(record).__name__}, not a record (a mapping with 'conversations')"))
            continue
        record_id = str(record.get("id", index))
        turns = record.get("conversations")
        if (
            not isinstance(turns, list)
            or len(turns) < 2
            or not all(isinstance(t, dict) for t in turns[:2])
            or not isinstance(turns[1].get("value"), str)
            or _role(turns[0]) not in HUMAN_ROLES
            or _role(turns[1]) not in ASSISTANT_ROLES
        ):
            skipped.append((record_id, "expected a human turn then an assistant turn"))
            continue
        if not turns[1]["value"].strip():  # scored against "", every answer but an empty one is wrong
            skipped.append((record_id, "the assistant turn is empty: no reference answer to score against"))
            continue
        image = record.get("image")
        if image and not isinstance(image, str):  # a list or a number: no path to join (was a TypeError)
            skipped.append((record_id, f"'image' must be a path string, got {image!r}"))
            continue
        items.append(
            VQAItem(
                id=record_id,
                image=root / image if image else None,
                question=turns[0]["value"],
                reference=turns[1]["value"].strip(),
            )
        )
    return items, skipped


def _role(turn: dict) -> str:
    """A turn's ``"from"``, or "" when it is not a string (a list would not hash in a role set)."""
    role = turn.get("from")
    return role if isinstance(role, str) else ""


def _open_image(path: Path, blind: bool) -> Image.Image | str:
    """The image as ``open_image`` decodes it for training (or a blank one of its size), or the reason
    it cannot be read."""
    if problem := image_path_problem(path):
        return problem
    try:
        image = open_image(path)
    except IMAGE_LOAD_ERRORS as err:
        return f"unreadable image {path}: {type(err).__name__}: {err}"
    return Image.new("RGB", image.size, BLANK_COLOR) if blind else image


@dataclass
class _PreparedBatch:
    """One evaluation batch with all its CPU work done: what ``iter_answers`` hands the model.

    ids: the items that can be answered, in order; skipped: (id, reason) of the others. input_ids,
    attention_mask: their prompts left-padded, (B, L), pixels: their images, one (N, 3, H_m, W_m)
    tensor per encoder or None (no item has an image); on CPU, pinned when the model is on CUDA (so the
    copy to the device is asynchronous). All None when nothing is answerable.
    """

    ids: list[str]
    skipped: list[tuple[str, str]]
    input_ids: Tensor | None
    attention_mask: Tensor | None
    pixels: list[Tensor] | None


def _prepare_item(
    model: Any, path: Path | None, prompt: object, blind: bool, max_new_tokens: int
) -> tuple[list[int], list[Tensor] | None] | str:
    """One item's CPU work: open its image and run every encoder's preprocessing, check and tokenise
    its prompt. Returns (prompt ids, pixel values: one (1, 3, H_m, W_m) per encoder, or None without an
    image), or the reason it cannot be answered (an unreadable image first, then ``checked_prompt_ids``)."""
    image = _open_image(path, blind) if path is not None else None
    if isinstance(image, str):
        return image
    try:
        ids = model.checked_prompt_ids(prompt, image is not None, max_new_tokens)
    except ValueError as err:
        return str(err)
    return ids, (model.preprocess_images([image]) if image is not None else None)


def _prepare_batch(
    pool: ThreadPoolExecutor,
    model: Any,
    batch: Sequence[tuple[str, Path | None, object]],
    blind: bool,
    max_new_tokens: int,
) -> Future[_PreparedBatch]:
    """Start a batch's CPU work on ``pool``: one task per item (``_prepare_item``), and one that
    gathers them into a ``_PreparedBatch`` (queued after its items, so it never waits on a task not
    yet started)."""
    futures = [pool.submit(_prepare_item, model, path, prompt, blind, max_new_tokens) for _, path, prompt in batch]
    pin = torch.device(model.device).type == "cuda"

    def gather() -> _PreparedBatch:
        ids, token_ids, pixels, skipped = [], [], [], []
        for (item_id, _, _), future in zip(batch, futures):
            result = future.result()
            if isinstance(result, str):
                logger.warning("skipping %s: %s", item_id, result)
                skipped.append((item_id, result))
                continue
            item_ids, item_pixels = result
            ids.append(item_id)
            token_ids.append(item_ids)
            if item_pixels is not None:
                pixels.append(item_pixels)
        if not ids:
            return _PreparedBatch(ids, skipped, None, None, None)
        input_ids, attention_mask = left_pad(token_ids, model.tokenizer.pad_token_id)
        gathered = [torch.cat(column) for column in zip(*pixels)] if pixels else None
        if pin:
            input_ids, attention_mask = input_ids.pin_memory(), attention_mask.pin_memory()
            gathered = [column.pin_memory() for column in gathered] if gathered is not None else None
        return _PreparedBatch(ids, skipped, input_ids, attention_mask, gathered)

    return pool.submit(gather)


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
    not match the image, a prompt too long for the model with ``max_new_tokens``). All of a batch's CPU
    work (opening and preprocessing its images, checking and tokenising its prompts, padding, pinning)
    runs on ``image_workers()`` threads while the batch before it generates, one item per task
    (decoding and resizing release the GIL): on a GPU the loop's main thread only copies a prepared
    batch over and launches the model, so the GPU does not wait for the CPU between batches (measured
    in ``benchmarks/eval_throughput.py --profile``). ``fast``: as in ``MambaVLM.generate_ids`` (None:
    the static decoder where it applies). ``options``: answer by likelihood instead
    (``MambaVLM.option_logprobs``): each answer is then {option: log-probability}. ``show_progress``: a
    bar on a terminal, a log line at each tenth of the batches in a log file (``mambavlm.progress``).
    Raises ValueError for a batch size below 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = [items[start : start + batch_size] for start in range(0, len(items), batch_size)]
    device = torch.device(model.device)
    with ExitStack() as stack:
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=image_workers(), thread_name_prefix="eval-batches"))
        pending = _prepare_batch(pool, model, batches[0], blind, max_new_tokens) if batches else None
        progress = stack.enter_context(Progress(len(batches), "generate", "batches", show_progress, logger))
        for index in range(len(batches)):
            prepared = pending.result()
            if index + 1 < len(batches):
                pending = _prepare_batch(pool, model, batches[index + 1], blind, max_new_tokens)
            answers: list[Any] = []
            if prepared.ids:
                pixels = [_to_device(p, device) for p in prepared.pixels] if prepared.pixels is not None else None
                input_ids = _to_device(prepared.input_ids, device)
                attention_mask = _to_device(prepared.attention_mask, device)
                if options is None:
                    new_ids = model.generate_ids(
                        input_ids, attention_mask, pixels, fast=fast, max_new_tokens=max_new_tokens, do_sample=False
                    )
                    answers = model.decode_answers(new_ids)
                else:
                    answers = model.option_logprobs_ids(input_ids, attention_mask, pixels, options)
            yield list(zip(prepared.ids, answers)), prepared.skipped
            progress.update()


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A copy on ``device``, asynchronous from pinned memory."""
    return tensor.to(device, non_blocking=tensor.is_pinned())


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
    Items sharing an id are kept apart (each answered against its own question and reference; logged
    as ``ID#n``).
    """
    keyed: dict[str, VQAItem] = {}
    seen: dict[str, int] = {}
    for item in items:
        seen[item.id] = seen.get(item.id, 0) + 1
        keyed[item.id if seen[item.id] == 1 else f"{item.id}#{seen[item.id]}"] = item
    rows: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    triples = [(key, item.image, item.question) for key, item in keyed.items()]
    for answers, batch_skipped in iter_answers(model, triples, batch_size, max_new_tokens, blind, show_progress):
        skipped += [(keyed[key].id, reason) for key, reason in batch_skipped]
        for key, answer in answers:
            item = keyed[key]
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
