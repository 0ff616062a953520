"""Benchmark questions as LLaVA-1.5's evaluation files hold them: one JSON object per line.

Each line is ``{"question_id": ..., "image": "relative/path.jpg" (optional), "text": "the prompt", ...}``
(LLaVA's ``llava_vqav2_mscoco_test-dev2015.jsonl``, ``llava_gqa_testdev_balanced.jsonl``,
``llava_pope_test.jsonl``, ...): the prompt is used as written, suffix included ("Answer the question
using a single word or phrase."). A line that is not a JSON object, or has no ``question_id``, is
reported with its line number and counted, not fatal; the fields' types are checked when the question
is answered. Some of LLaVA's files give one id to several questions (TextVQA's and MME's use the image
as the id, one per image for two questions): every occurrence of an id that occurs more than once
becomes ``ID#n``, n its position among them from 0 (``read_mme``'s ids; ``eval/score.py`` maps TextVQA
answers back through their prompts, as LLaVA's scorer does), so every question is answered and the
answers stay apart. Every other id is written back to the answers as the file gives it (an integer stays
an integer, as LLaVA's ``model_vqa_loader`` writes it and its submission scripts match it).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

__all__ = ["EvalQuestion", "read_questions"]


@dataclass(frozen=True)
class EvalQuestion:
    """One question to answer: ``question_id`` its key (the file's id as a string, ``ID#n`` for a repeated
    one), ``source_id`` the id the answers give it (the file's JSON value, or the key for a repeated
    id); ``image`` is a path (None for a text-only question); ``text`` as written in the file (any JSON
    type: a non-string is reported when it is answered)."""

    question_id: str
    image: Path | None
    text: object
    source_id: object


def read_questions(path: str | Path, image_root: str | Path | None = None) -> tuple[list[EvalQuestion], list[tuple[str, str]]]:
    """(questions in file order, [(line or id, reason)] for the lines that cannot be questions).

    ``image_root`` None: the file's directory. Raises FileNotFoundError for a missing file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"question file not found: {path}")
    root = Path(image_root) if image_root is not None else path.parent
    questions: list[EvalQuestion] = []
    problems: list[tuple[str, str]] = []
    records: list[tuple[int, str, dict]] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append((f"line {number}", f"not JSON: {err.msg}"))
            continue
        if not isinstance(record, dict) or "question_id" not in record:
            problems.append((f"line {number}", "not an object with a question_id"))
            continue
        records.append((number, str(record["question_id"]), record))
    occurrences = Counter(question_id for _, question_id, _ in records)
    position: Counter[str] = Counter()
    seen: set[str] = set()
    for number, question_id, record in records:
        source_id = record["question_id"]
        if occurrences[question_id] > 1:
            position[question_id] += 1
            question_id = source_id = f"{question_id}#{position[question_id] - 1}"
        if question_id in seen:
            problems.append((question_id, f"question_id repeated on line {number}"))
            continue
        seen.add(question_id)
        image = record.get("image")
        if image is not None and not (isinstance(image, str) and image):
            problems.append((question_id, f"'image' must be a non-empty path string, got {image!r}"))
            continue
        questions.append(EvalQuestion(question_id, root / image if image else None, record.get("text"), source_id))
    return questions, problems
