"""Benchmark questions as LLaVA-1.5's evaluation files hold them: one JSON object per line.

Each line is ``{"question_id": ..., "image": "relative/path.jpg" (optional), "text": "the prompt", ...}``
(LLaVA's ``llava_vqav2_mscoco_test-dev2015.jsonl``, ``llava_gqa_testdev_balanced.jsonl``,
``llava_pope_test.jsonl``, ...): the prompt is used as written, suffix included ("Answer the question
using a single word or phrase."). A line that is not a JSON object, or has no ``question_id``, is
reported with its line number and counted, not fatal, as is one without a ``text`` (a file that is one JSON array or one object spread
over several lines, such as a LLaVA training JSON, is not JSONL at all: ``QuestionFileError``); the fields' types are checked when the question
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

__all__ = ["EvalQuestion", "QuestionFileError", "read_questions"]


class QuestionFileError(ValueError):
    """A question file that is not JSONL at all (one JSON array, or one object over several lines)."""


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

    ``image_root`` None: the file's directory. Raises FileNotFoundError for a missing file,
    QuestionFileError (a ValueError) naming the file where it is one JSON array (a LLaVA training or
    conversation JSON, say) or one JSON object spread over several lines rather than one question object
    per line, and for a file that is not UTF-8 text.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"question file not found: {path}")
    root = Path(image_root) if image_root is not None else path.parent
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Notepad and other editors) dropped
    except UnicodeDecodeError as err:
        raise QuestionFileError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}): expected a "
                                "question JSONL") from None
    _check_jsonl(path, text)
    questions: list[EvalQuestion] = []
    problems: list[tuple[str, str]] = []
    records: list[tuple[int, str, dict]] = []
    for number, line in enumerate(text.splitlines(), start=1):
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
        if "text" not in record:
            problems.append((question_id, f"no 'text' (the question to ask) on line {number}"))
            continue
        questions.append(EvalQuestion(question_id, root / image if image else None, record.get("text"), source_id))
    return questions, problems


_JSONL_EXPECTED = 'expected JSONL, one question object per line ({"question_id": ..., "image": ..., "text": ...})'


def _check_jsonl(path: Path, text: str) -> None:
    """QuestionFileError where ``text`` is one JSON array, or one JSON object whose first line is not
    JSON on its own (pretty-printed): a whole-file JSON given where the question JSONL belongs."""
    head = text.lstrip()
    if head.startswith("["):
        try:
            count = f" of {len(json.loads(text))} records"
        except (json.JSONDecodeError, TypeError):
            count = ""
        raise QuestionFileError(
            f"{path} is a JSON array{count} (a LLaVA training JSON?), not JSONL: {_JSONL_EXPECTED}; "
            "build the question file from it first"
        )
    lines = [line for line in text.splitlines() if line.strip()]
    if head.startswith("{") and len(lines) > 1:
        try:
            json.loads(lines[0])
        except json.JSONDecodeError:
            try:
                whole = json.loads(text)
            except json.JSONDecodeError:
                return  # a JSONL with a bad first line: that line is reported, the others answered
            if isinstance(whole, dict):
                raise QuestionFileError(
                    f"{path} is one JSON object over {len(lines)} lines, not JSONL: {_JSONL_EXPECTED}"
                ) from None
