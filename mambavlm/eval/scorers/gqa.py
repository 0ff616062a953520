"""GQA accuracy as LLaVA-1.5 reports it on the balanced test-dev questions.

Two reference files, applied in turn:

1. haotian-liu/LLaVA ``scripts/convert_gqa_for_eval.py``: each model answer becomes
   ``text.rstrip('.').lower()`` -- every trailing period goes ("yes.." -> "yes"), then lower case.
   Nothing else: no whitespace strip ("yes. " keeps its period and space and so scores 0), no article
   or punctuation handling ("the table" does not match "table").
2. The GQA ``eval.py`` (gqadataset.org, in the variant LLaVA's ``scripts/v1_5/eval/gqa.sh`` runs with
   ``--tier testdev_balanced``): for each balanced question, ``predicted == gold`` exact string match
   (the gold answer untouched), scored 1.0 or 0.0; each printed number is
   ``avg(scores) * 100 = float(sum) / len * 100`` formatted with ``{:.2f}`` (the same number as
   ``round(..., 2)``). It prints Binary and Open (questions whose ``types.structural`` is "query" are
   open, all others binary; an empty list averages to 0 there), Accuracy, and accuracy per structural
   type ("choose", "compare", "logical", "query", "verify") and per semantic type ("attr", "cat",
   "global", "obj", "rel"; the reference meant to print them as "Attribute", ... but its test looks at
   a stale loop variable, so the raw keys are what it prints, and what this module reports).

Deliberate departures, asked for by this package's contract: a question without a prediction is
scored 0 and counted in ``counts["missing"]`` (``eval.py`` refuses to run without a prediction for every
balanced question); predictions for questions not in ``questions`` raise ``ValueError`` naming them
(``score_answers`` checks first and names the file too); and an answer type without questions (no binary,
or no open question among those scored) is absent from the "answer_type" breakdown, as an empty structural
or semantic type is absent from the reference's output, rather than the reference's ``avg([]) = 0``
"0.00%" (which reads as a score of 0). Every number that is reported equals the reference's.

On the refused predictions: ``eval.py`` loops over its questions and passes over other predictions, which
lets its full (non-LLaVA) form take predictions for all of ``*_all_questions.json``, the unbalanced ones
feeding its consistency metric. LLaVA-1.5 scores the balanced file with balanced answers only, and neither
that metric nor the unbalanced questions are scored here, so an answer to an unbalanced question (of an
``*_all_questions.json`` file) is refused like any unknown id: score only such a run's balanced answers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mambavlm.eval.scorers.files import field as _field
from mambavlm.eval.scorers.report import ScoreReport, reject_unknown_ids

__all__ = ["GQA_PROMPT", "GQAQuestion", "llava_gqa_answer", "read_gqa_questions", "score_gqa"]

GQA_PROMPT = "Answer the question using a single word or phrase."
"""What LLaVA-1.5 appends, after a newline, to each GQA question (``llava_gqa_testdev_balanced.jsonl``: "Is it
overcast?\\nAnswer the question using a single word or phrase.")."""


@dataclass(frozen=True)
class GQAQuestion:
    """One balanced test-dev question: its gold ``answer``, ``types.structural`` and ``types.semantic``
    (None where the data has no semantic type; then there is no semantic breakdown)."""

    answer: str
    structural: str
    semantic: str | None = None


def llava_gqa_answer(text: str) -> str:
    """LLaVA's ``convert_gqa_for_eval.py``: ``text.rstrip('.').lower()``."""
    return text.rstrip(".").lower()


def _percent(scores: Sequence[float]) -> float:
    """``eval.py``'s ``avg(l) * 100`` (``avg([])`` is 0), as printed with ``{:.2f}``."""
    if not scores:
        return 0.0
    return round(float(sum(scores)) / len(scores) * 100, 2)


def _by_label(labels: Sequence[str], scores: Sequence[float]) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for label, score in zip(labels, scores, strict=True):
        groups.setdefault(label, []).append(score)
    return {label: _percent(groups[label]) for label in sorted(groups)}


def score_gqa(predictions: Mapping[str, str], questions: Mapping[str, GQAQuestion]) -> ScoreReport:
    """Score raw model answers (question id -> text) against the balanced ``questions``, as LLaVA-1.5's
    ``convert_gqa_for_eval.py`` + GQA ``eval.py`` do (module docstring).

    Breakdowns: "answer_type" ("binary", "open": each where there is at least one question of that type;
    an empty one is absent, not 0.0), "structural", and "semantic" when every question has a semantic
    type. Questions are averaged in the order of ``questions``.
    """
    if not questions:
        raise ValueError("no GQA questions to score against")
    reject_unknown_ids(predictions, questions, "the GQA questions")
    semantic_given = [question.semantic is not None for question in questions.values()]
    if any(semantic_given) and not all(semantic_given):
        untyped = semantic_given.count(False)
        raise ValueError(f"{untyped} of {len(questions)} questions have no semantic type; give it for all or none")

    scores = []
    missing = 0
    for question_id, question in questions.items():
        if question_id in predictions:
            scores.append(1.0 if llava_gqa_answer(predictions[question_id]) == question.answer else 0.0)
        else:
            missing += 1
            scores.append(0.0)

    structural = [question.structural for question in questions.values()]
    open_or_binary = ["open" if kind == "query" else "binary" for kind in structural]
    breakdowns = {
        "answer_type": {
            kind: _percent([score for label, score in zip(open_or_binary, scores, strict=True) if label == kind])
            for kind in ("binary", "open")
            if kind in open_or_binary
        },
        "structural": _by_label(structural, scores),
    }
    if all(semantic_given):
        breakdowns["semantic"] = _by_label([str(question.semantic) for question in questions.values()], scores)
    return ScoreReport(
        benchmark="gqa",
        overall=_percent(scores),
        breakdowns=breakdowns,
        counts={"questions": len(questions), "missing": missing},
    )


def read_gqa_questions(annotations: Path) -> dict[str, GQAQuestion]:
    """Question id -> :class:`GQAQuestion` for :func:`score_gqa`, from GQA's ``testdev_balanced_questions.json``
    (``questions1.2.zip`` from https://cs.stanford.edu/people/dorarad/gqa/download.html), in file order.

    The file is ``{question id: {"question", "imageId", "answer": str, "isBalanced": bool, "types":
    {"structural": str, "semantic": str, "detailed"}, "semantic", "groups", "fullAnswer", ...}}``; the ids
    are LLaVA's too (``llava_gqa_testdev_balanced.jsonl``: "201307251", ...). As GQA's ``eval.py`` does, only
    questions whose ``isBalanced`` is true are kept (all of them in the balanced file, so an
    ``*_all_questions.json`` file also gives the balanced subset), each with its ``answer``,
    ``types.structural`` and ``types.semantic``.

    Raises FileNotFoundError naming a missing file and ValueError naming the file and the question id of a
    record that is not an object or lacks one of those fields or has it of the wrong type.
    """
    path = Path(annotations)
    if not path.is_file():
        raise FileNotFoundError(f"GQA question file not found: {path}")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(records, dict):
        raise ValueError(f"{path}: expected a JSON object of question id -> question, got {type(records).__name__}")
    questions: dict[str, GQAQuestion] = {}
    for question_id, record in records.items():
        where = f"{path}: question {question_id}"
        if not _field(record, "isBalanced", bool, where):
            continue
        types = _field(record, "types", dict, where)
        questions[question_id] = GQAQuestion(
            answer=_field(record, "answer", str, where),
            structural=_field(types, "structural", str, f"{where}, types"),
            semantic=_field(types, "semantic", str, f"{where}, types"),
        )
    return questions
