"""MME scored as its official ``eval_tool/calculation.py`` scores it (the tool LLaVA-1.5's ``mme.sh`` runs).

Reference: the MME_Benchmark ``eval_tool/calculation.py`` (``calculate_metrics``), fed by LLaVA's
``convert_answer_to_mme.py``, which writes each answer unchanged as the last tab-separated field of a line.
Rules reproduced:
- answer parsing (``parse_pred_ans``): lower-case the answer; exactly "yes"/"no" is itself; else look at its
  first 4 characters only: "yes" inside them -> "yes", else "no" inside them -> "no", else "other". So it is a
  substring test, not "starts with": "eyes" -> yes, "know" / "snow" / "not sure" / "nope" -> no, " yes" -> yes
  but "  yes" (two spaces) -> other. (The reference's answer keeps the line's trailing newline; that never
  changes the outcome, so it is not added here.)
- ground truth lower-cased, must be yes/no; "other" is wrong for either.
- per category: acc = right questions / questions, acc+ = images with both questions right / images;
  score = acc * 100 + acc+ * 100 (0-200), summed in the tool's category order: perception = the 10
  perception categories, cognition = the 4 cognition categories. No rounding (the tool prints raw floats).

Departures: the tool pairs the two questions of an image by consecutive lines; here they are grouped by
``image_id`` (the same pairing on the official, image-ordered files), and an image without exactly two
questions raises ValueError where the tool asserts. A question without a prediction is scored as an "other"
answer (wrong) and counted under ``counts["missing"]``; the tool has no such case (its converter writes only
answered questions, which would break the line pairing).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mambavlm.eval.scorers.report import ScoreReport

__all__ = ["MME_COGNITION", "MME_PERCEPTION", "MMEQuestion", "mme_answer", "score_mme"]

MME_PERCEPTION: tuple[str, ...] = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION: tuple[str, ...] = (
    "commonsense_reasoning",
    "numerical_calculation",
    "text_translation",
    "code_reasoning",
)


@dataclass(frozen=True)
class MMEQuestion:
    """One MME question: its ``category`` (a name from ``MME_PERCEPTION``/``MME_COGNITION``), the ``image_id``
    it shares with its paired question, and the ground-truth ``answer`` ("Yes"/"No", any case)."""

    category: str
    image_id: str
    answer: str


def mme_answer(text: str) -> str:
    """The answer as ``calculation.py``'s ``parse_pred_ans`` reads it: "yes", "no" or "other".

    The text is lower-cased first (as the tool does before calling ``parse_pred_ans``).
    """
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def score_mme(predictions: Mapping[str, str], questions: Mapping[str, MMEQuestion]) -> ScoreReport:
    """Score MME as ``eval_tool/calculation.py``: per-category acc + acc+, perception and cognition totals.

    predictions: question id -> generated text. questions: question id -> ``MMEQuestion``. ``overall`` is the
    perception total (the MME number LLaVA-1.5 reports), unit "points". Breakdowns: "score" (category ->
    acc + acc+, 0-200), "acc" and "acc_plus" (category -> percent), "total" ("perception", "cognition"), all
    unrounded; categories absent from ``questions`` are absent from the breakdowns and add nothing to a total.
    """
    known = MME_PERCEPTION + MME_COGNITION
    images: dict[str, dict[str, list[bool]]] = {}  # category -> image id -> right/wrong per question
    missing = other = 0
    for qid, question in questions.items():
        if question.category not in known:
            raise ValueError(f"unknown MME category {question.category!r} (question {qid!r})")
        truth = question.answer.lower()
        if truth not in ("yes", "no"):
            raise ValueError(f"MME answer for {qid!r} must be yes/no, got {question.answer!r}")
        if qid in predictions:
            parsed = mme_answer(predictions[qid])
            other += parsed == "other"
        else:
            parsed = "other"
            missing += 1
        images.setdefault(question.category, {}).setdefault(question.image_id, []).append(parsed == truth)

    score: dict[str, float] = {}
    acc: dict[str, float] = {}
    acc_plus: dict[str, float] = {}
    for category in known:
        if category not in images:
            continue
        per_image = images[category]
        for image_id, rights in per_image.items():
            if len(rights) != 2:
                raise ValueError(f"MME image {image_id!r} ({category}) has {len(rights)} questions, expected 2")
        n_right = sum(sum(rights) for rights in per_image.values())
        n_both = sum(all(rights) for rights in per_image.values())
        category_acc = n_right / (2 * len(per_image))
        category_acc_plus = n_both / len(per_image)
        acc[category] = category_acc * 100
        acc_plus[category] = category_acc_plus * 100
        score[category] = category_acc * 100 + category_acc_plus * 100

    perception = 0.0
    for category in MME_PERCEPTION:
        perception += score.get(category, 0.0)
    cognition = 0.0
    for category in MME_COGNITION:
        cognition += score.get(category, 0.0)
    counts = {
        "questions": len(questions),
        "images": sum(len(per_image) for per_image in images.values()),
        "categories": len(images),
        "missing": missing,
        "other": other,  # answered, but neither yes nor no
    }
    return ScoreReport(
        benchmark="MME",
        overall=perception,
        breakdowns={
            "score": score,
            "acc": acc,
            "acc_plus": acc_plus,
            "total": {"perception": perception, "cognition": cognition},
        },
        counts=counts,
        unit="points",
    )
