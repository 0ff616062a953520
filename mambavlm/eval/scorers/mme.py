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
answered questions, which would break the line pairing). An answer whose id is not a question of the release
directory is refused by ``score_answers`` (ValueError naming how many, the first ids and the folder), as
LLaVA's ``convert_answer_to_mme.py`` fails on it (``GT[category, file, prompt]``, a KeyError); called
directly, ``score_mme`` ignores predictions for ids not in ``questions``.

Files: ``read_mme`` reads the official release directory (``MME_Benchmark_release_version/``) and
``build_mme_questions`` writes the question JSONL our run answers. LLaVA-1.5's own ``llava_mme.jsonl`` cannot be
used as is: it gives both questions of an image the same ``question_id`` (the image path, e.g.
``"artwork/images/14777.jpg"``) and its ``convert_answer_to_mme.py`` tells them apart by the prompt text, while
our runner keys answers by ``question_id`` and refuses a repeated one. So the builder writes LLaVA's questions
and prompt with the ids made unique: LLaVA's id, ``#``, and the question's position (0 or 1) in its txt file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mambavlm.atomic import atomic_file
from mambavlm.eval.scorers.report import ScoreReport

__all__ = [
    "MME_COGNITION",
    "MME_PERCEPTION",
    "MME_PROMPT",
    "MMEQuestion",
    "build_mme_questions",
    "mme_answer",
    "read_mme",
    "score_mme",
]

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

MME_PROMPT = "Answer the question using a single word or phrase."
"""What LLaVA-1.5's ``llava_mme.jsonl`` puts, after a newline, in place of each MME question's trailing "Please
answer yes or no." ("Is a python code shown in the picture?\\nAnswer the question using a single word or
phrase.")."""
_MME_YES_NO = "Please answer yes or no."
_MME_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


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


@dataclass(frozen=True)
class _MMERecord:
    """One line of an MME txt file: our question id, the image path LLaVA uses as its id, and the line's fields."""

    question_id: str
    image: str
    category: str
    question: str
    answer: str


def _mme_questions(txt: Path) -> list[tuple[str, str]]:
    """The (question, answer) lines of one MME txt file, as ``get_gt`` splits them (``line.strip().split("\\t")``)."""
    try:
        lines = txt.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{txt}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    questions = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.strip().split("\t")
        if len(fields) != 2 or fields[1].lower() not in ("yes", "no"):
            raise ValueError(f"{txt} line {number}: expected 'question<TAB>Yes' or 'question<TAB>No', got {line!r}")
        questions.append((fields[0], fields[1]))
    return questions


def _mme_records(annotations: Path) -> list[_MMERecord]:
    """Every question of the release directory, category by category (``MME_PERCEPTION`` then ``MME_COGNITION``
    order), txt files by name, lines in file order."""
    if not annotations.is_dir():
        raise FileNotFoundError(f"MME release directory not found: {annotations}")
    records: list[_MMERecord] = []
    for category in MME_PERCEPTION + MME_COGNITION:
        category_dir = annotations / category
        if not category_dir.is_dir():
            continue
        image_dir = category_dir / "images"
        if image_dir.is_dir():
            qa_dir = category_dir / "questions_answers_YN"
            if not qa_dir.is_dir():
                raise FileNotFoundError(f"MME questions not found: {qa_dir} (expected beside {image_dir})")
        else:
            image_dir = qa_dir = category_dir
        images: dict[str, list[Path]] = {}
        for path in image_dir.iterdir():
            if path.suffix.lower() in _MME_IMAGE_SUFFIXES:
                images.setdefault(path.stem, []).append(path)
        for txt in sorted(qa_dir.glob("*.txt")):
            found = sorted(images.get(txt.stem, []))
            if not found:
                raise FileNotFoundError(f"MME image for {txt} not found: {image_dir / txt.stem}.jpg / .jpeg / .png")
            if len(found) > 1:
                raise ValueError(f"MME question file {txt} has {len(found)} images: {', '.join(map(str, found))}")
            image = found[0].relative_to(annotations).as_posix()
            questions = _mme_questions(txt)
            if len(questions) != 2:
                raise ValueError(f"{txt}: {len(questions)} questions, MME asks 2 per image")
            for number, (question, answer) in enumerate(questions):
                records.append(_MMERecord(f"{image}#{number}", image, category, question, answer))
    if not records:
        raise FileNotFoundError(f"no MME category folder with questions (e.g. {annotations / 'existence'}) found")
    return records


def read_mme(annotations: Path) -> dict[str, MMEQuestion]:
    """The MME questions of the official release directory, keyed by the ids ``build_mme_questions`` writes.

    annotations: ``MME_Benchmark_release_version/`` as the MME authors distribute it (download linked from
    the ``Evaluation`` branch of BradyFU/Awesome-Multimodal-Large-Language-Models; LLaVA's ``docs/Evaluation.md``
    puts it under ``playground/data/eval/MME``). Per category either ``category/images/<name>.jpg|png`` with
    ``category/questions_answers_YN/<name>.txt``, or ``category/<name>.jpg|png`` beside ``category/<name>.txt``;
    each txt holds the image's two lines ``question<TAB>Yes|No``. Read as LLaVA's ``convert_answer_to_mme.py``
    (``get_gt``) reads them, restricted to the 14 categories ``calculation.py`` scores (other folders are
    ignored; a category folder that is absent is absent from the result).

    Ids: ``"<LLaVA's question_id>#<n>"``, LLaVA's id being the image path relative to ``annotations``
    (``"artwork/images/10002.jpg"``, ``"code_reasoning/0020.png"``) and n the question's position (0, 1) among
    its txt file's non-blank lines (see the module docstring for why LLaVA's ids alone are not enough).
    ``image_id`` is LLaVA's id, which pairs the two questions.

    Raises FileNotFoundError naming the path for a missing release directory, a missing
    ``questions_answers_YN/`` folder, or a txt file without an image of its name (no category folder at all
    included); ValueError naming the file and line for a line that is not ``question<TAB>Yes|No``, or the file
    for one without exactly 2 questions or with two images of its name.
    """
    records = _mme_records(annotations)
    return {record.question_id: MMEQuestion(record.category, record.image, record.answer) for record in records}


def build_mme_questions(annotations: Path, out: Path, prompt: str = MME_PROMPT) -> Path:
    """Write MME's questions as the LLaVA-style question JSONL our run answers; returns ``out``.

    One line per question, in ``read_mme``'s order and with its ids: ``{"question_id", "image", "text",
    "category"}``, ``image`` relative to ``annotations`` (answer with ``image_root`` = the release directory).
    ``text`` is built as LLaVA-1.5's ``llava_mme.jsonl`` holds it: the question with its trailing "Please answer
    yes or no." (and the space(s) before it) removed, a newline, then ``prompt`` ("Is a python code shown in
    the picture?\\nAnswer the question using a single word or phrase."), the cut ``convert_answer_to_mme.py``
    undoes to find the ground truth. Raises as ``read_mme``.
    """
    rows = []
    for record in _mme_records(annotations):
        question = record.question
        if question.endswith(_MME_YES_NO):
            question = question[: -len(_MME_YES_NO)].rstrip()
        text = f"{question}\n{prompt}"
        rows.append(
            {"question_id": record.question_id, "image": record.image, "text": text, "category": record.category}
        )
    with atomic_file(out) as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return out
