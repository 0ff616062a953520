"""ScienceQA-IMG scored as LLaVA's ``llava/eval/eval_science_qa.py`` scores it (LLaVA-1.5 version).

Reference: haotian-liu/LLaVA ``llava/eval/eval_science_qa.py`` as LLaVA-1.5 runs it
(``scripts/v1_5/eval/sqa.sh``), with the breakdown groups of lupantech/ScienceQA ``tools/evaluate_acc.py``
(the paper's table: NAT / SOC / LAN, TXT / IMG / NO, G1-6 / G7-12).

The letter rule of the LLaVA-1.5 scorer, in order: the whole output equals one of "A".."E"; else it is at
least 3 characters long, starts with one of "A".."E" and then ". "; else the regex ``The answer is ([A-Z]).``
(unescaped '.', so any one character must follow the letter) matches exactly once. Anything else is
"FAILED". The letter then counts only if it is among the problem's first ``num_choices`` options; a FAILED
answer or an out-of-range letter gets index -1 and is always wrong (earlier LLaVA versions drew a random
option there instead; the LLaVA-1.5 version returns -1, the random draw being unreachable after it).

The image subset ("IMG-Accuracy") is the problems whose prompt holds ``<image>``, i.e. the problems with an
image. A problem without a prediction is written with the prompt 'Unknown' and so drops out of IMG-Accuracy
altogether (it only counts as wrong in the all-problem accuracy); that quirk is kept here: image problems
without a prediction are left out and counted under ``counts["missing"]``.

Answers whose id is not a problem of the scored split (the test split of ``pid_splits.json``) are refused by
``score_answers`` (ValueError naming how many, the first ids and the files). ``eval_science_qa.py`` loops
over the split's problems and so passes over such answers silently; that is no documented allowance, and
such answers (another split's, or another benchmark's) would only hide a wrong file, so refusing them changes
no number of a well-formed run: LLaVA's ``llava_test_CQM-A.json`` is exactly the test split. Answers to the
split's problems without an image are not unknown: they are skipped as the reference skips them.
Called directly, ``score_scienceqa`` ignores predictions for ids not in ``problems``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mambavlm.atomic import atomic_file
from mambavlm.eval.scorers.files import field as _field
from mambavlm.eval.scorers.files import load_json as _load_json
from mambavlm.eval.scorers.report import ScoreReport

__all__ = [
    "SCIENCEQA_PROMPT",
    "SQA_OPTIONS",
    "SQAProblem",
    "build_scienceqa_questions",
    "read_scienceqa_problems",
    "score_scienceqa",
    "sqa_letter",
]

SQA_OPTIONS: tuple[str, ...] = ("A", "B", "C", "D", "E")

SCIENCEQA_PROMPT = "Answer with the option's letter from the given choices directly."
"""What LLaVA-1.5 appends, after a newline, to each ScienceQA question (``model_vqa_science.py
--single-pred-prompt``, as ``scripts/v1_5/eval/sqa.sh`` runs it on ``llava_test_CQM-A.json``; LLaVA-1.5's
answers file shows it at the end of every ``prompt``)."""
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
_SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
_GRADE = re.compile(r"grade(\d+)")


@dataclass(frozen=True)
class SQAProblem:
    """One ScienceQA problem (fields of ``problems.json``).

    answer: index of the right choice. num_choices: ``len(choices)``. subject: "natural science",
    "social science" or "language science". has_image: the problem has an image. context: the text context
    (``hint``), "" if none. grade: "grade1".."grade12".
    """

    answer: int
    num_choices: int
    subject: str
    has_image: bool
    context: str
    grade: str


def sqa_letter(text: str, num_choices: int) -> str | None:
    """The option letter LLaVA-1.5's ``eval_science_qa.py`` reads from ``text``, or None where it scores -1.

    "B" -> "B"; "The answer is C." -> "C"; "C. The answer is B." -> "C" (the letter-period-space start is
    tried before the sentence); "C." -> None (too short for that rule, no sentence); "B " / "b" -> None; two
    "The answer is X." sentences -> None; a letter beyond the problem's ``num_choices`` options -> None.
    """
    if text in SQA_OPTIONS:
        letter: str | None = text
    elif len(text) >= 3 and text[0] in SQA_OPTIONS and text[1:3] == ". ":
        letter = text[0]
    else:
        found = _ANSWER_IS.findall(text)
        letter = found[0] if len(found) == 1 else None
    return letter if letter in SQA_OPTIONS[:num_choices] else None


def _grade_band(grade: str) -> str:
    match = _GRADE.fullmatch(grade)
    if match is None or not 1 <= int(match.group(1)) <= 12:
        raise ValueError(f"ScienceQA grade must be 'grade1'..'grade12', got {grade!r}")
    return "G1-6" if int(match.group(1)) <= 6 else "G7-12"


def _groups(problem: SQAProblem) -> dict[str, list[str]]:
    """The paper-table groups a problem falls in (``evaluate_acc.py``: TXT and IMG may both hold)."""
    if problem.subject not in _SUBJECTS:
        raise ValueError(f"ScienceQA subject must be one of {sorted(_SUBJECTS)}, got {problem.subject!r}")
    context = [name for name, present in (("TXT", bool(problem.context)), ("IMG", problem.has_image)) if present]
    return {
        "subject": [_SUBJECTS[problem.subject]],
        "context": context or ["NO"],
        "grade": [_grade_band(problem.grade)],
    }


def score_scienceqa(predictions: Mapping[str, str], problems: Mapping[str, SQAProblem]) -> ScoreReport:
    """ScienceQA-IMG accuracy as LLaVA-1.5's ``eval_science_qa.py`` prints it ("IMG-Accuracy").

    predictions: problem id -> generated text. problems: the 'test' split of ``pid_splits.json`` (problem id ->
    ``SQAProblem``); problems without an image are skipped (``counts["non_image"]``), image problems without
    a prediction are left out (the reference's quirk, ``counts["missing"]``). ``overall`` and the breakdowns
    (subject NAT/SOC/LAN, context TXT/IMG/NO, grade G1-6/G7-12, computed over the same scored image problems
    as ``evaluate_acc.py`` defines the groups) are percents rounded to 2 decimals as both references print
    them; a group with no scored problem is left out (on the image subset "NO" is always empty).
    """
    totals: dict[tuple[str, str], list[int]] = {}  # (group, value) -> [correct, total]
    correct = scored = missing = unparsed = non_image = 0
    for pid, problem in problems.items():
        groups = _groups(problem)
        if not problem.has_image:
            non_image += 1
            continue
        if pid not in predictions:
            missing += 1
            continue
        letter = sqa_letter(predictions[pid], problem.num_choices)
        unparsed += letter is None
        right = letter is not None and SQA_OPTIONS.index(letter) == problem.answer
        correct += right
        scored += 1
        for group, values in groups.items():
            for value in values:
                tally = totals.setdefault((group, value), [0, 0])
                tally[0] += right
                tally[1] += 1

    order = {"subject": ("NAT", "SOC", "LAN"), "context": ("TXT", "IMG", "NO"), "grade": ("G1-6", "G7-12")}
    breakdowns = {
        group: {
            value: round(totals[group, value][0] / totals[group, value][1] * 100, 2)
            for value in values
            if (group, value) in totals
        }
        for group, values in order.items()
    }
    counts = {
        "problems": len(problems),
        "non_image": non_image,
        "scored": scored,
        "correct": correct,
        "missing": missing,
        "unparsed": unparsed,
    }
    overall = round(correct / scored * 100, 2) if scored else 0.0
    return ScoreReport(benchmark="ScienceQA-IMG", overall=overall, breakdowns=breakdowns, counts=counts)


def _problem(record: object, where: str) -> SQAProblem:
    choices = _field(record, "choices", list, where)
    if not choices or not all(isinstance(choice, str) for choice in choices):
        raise ValueError(f"{where}: field 'choices' must be a non-empty list of strings")
    answer = _field(record, "answer", int, where)
    if not 0 <= answer < len(choices):
        raise ValueError(f"{where}: answer {answer} is not the index of one of its {len(choices)} choices")
    if "image" not in record:
        raise ValueError(f"{where}: missing field 'image'")
    image = record["image"]
    if image is not None and not (isinstance(image, str) and image):
        raise ValueError(f"{where}: field 'image' must be an image file name or null, got {image!r}")
    return SQAProblem(
        answer=answer,
        num_choices=len(choices),
        subject=_field(record, "subject", str, where),
        has_image=image is not None,
        context=_field(record, "hint", str, where),
        grade=_field(record, "grade", str, where),
    )


def read_scienceqa_problems(annotations: Path, split_file: Path, split: str = "test") -> dict[str, SQAProblem]:
    """Problem id -> :class:`SQAProblem` for :func:`score_scienceqa`: the problems of ``split`` in
    ``split_file``'s order, as LLaVA's ``llava/eval/eval_science_qa.py`` selects them
    (``{pid: problems[pid] for pid in pid_splits[split]}``).

    ``annotations``: ScienceQA's ``problems.json``, ``split_file``: its ``pid_splits.json`` (both in the
    ``data/scienceqa`` folder of https://github.com/lupantech/ScienceQA, as LLaVA's ``docs/Evaluation.md``
    says). ``problems.json`` is ``{pid: {"question", "choices": [str, ...], "answer": int, "hint": str,
    "image": "image.png" | null, "subject": str, "grade": "grade1".."grade12", "task", "topic", "lecture",
    "solution", "split", ...}}``, ``pid_splits.json`` ``{"train": [pid, ...], "val": [...], "test": [...],
    ...}``. Read: ``answer`` (the right choice's index), ``len(choices)``, ``subject``, ``hint`` (the text
    context), ``grade``, and whether ``image`` is not null (LLaVA's ``convert_sqa_to_llava.py`` gives exactly
    those problems an image and ``<image>`` in the prompt, which is how ``eval_science_qa.py`` picks the IMG
    subset). The keys are the pids, the ``id`` of LLaVA's ``llava_test_CQM-A.json`` and so the
    ``question_id`` of its answers ("4", "5", ...).

    Raises FileNotFoundError naming a missing file and ValueError naming the file and the pid for a problem
    that is missing from ``problems.json``, repeated in the split, not an object, lacks one of those fields or
    has it of the wrong type, or whose ``answer`` is not an index into ``choices``; and for a ``split`` that
    ``split_file`` does not have.
    """
    problems_path, split_path = Path(annotations), Path(split_file)
    problems = _load_json(problems_path, "ScienceQA file")
    if not isinstance(problems, dict):
        raise ValueError(f"{problems_path}: expected a JSON object of pid -> problem, got {type(problems).__name__}")
    splits = _load_json(split_path, "ScienceQA file")
    if not isinstance(splits, dict):
        raise ValueError(f"{split_path}: expected a JSON object of split -> pids, got {type(splits).__name__}")
    if split not in splits:
        raise ValueError(f"{split_path}: no split {split!r}; it has {', '.join(sorted(splits))}")
    pids = _field(splits, split, list, str(split_path))
    selected: dict[str, SQAProblem] = {}
    for index, pid in enumerate(pids):
        if not isinstance(pid, str):
            raise ValueError(f"{split_path}: {split}[{index}] must be a pid string, got {type(pid).__name__}")
        if pid in selected:
            raise ValueError(f"{split_path}: pid {pid} repeated in split {split!r}")
        if pid not in problems:
            raise ValueError(f"{split_path}: pid {pid} of split {split!r} is not in {problems_path}")
        selected[pid] = _problem(problems[pid], f"{problems_path}: problem {pid}")
    return selected


def build_scienceqa_questions(llava_questions: Path, out: Path, prompt: str = SCIENCEQA_PROMPT) -> Path:
    """LLaVA's ScienceQA test file (``llava_test_CQM-A.json``: a JSON list of ``{"id", "image"?,
    "conversations": [{"from": "human", "value"}, ...]}``) -> ``out``, a question JSONL for ``eval/run.py``.

    Each line is ``{"question_id": id, "image"?: image, "text": prompt}`` with the prompt LLaVA-1.5's
    ``model_vqa_science.py --single-pred-prompt`` builds: the first human turn without ``<image>``,
    stripped, then "\\n" and ``prompt`` (``<image>\\n`` goes in front when the question is answered with its
    image, as ``eval/run.py`` does for every question with one). Written atomically. Raises
    FileNotFoundError for a missing file, ValueError naming the record (its position and id) that is not
    an object with an ``id`` and a first human turn.
    """
    records = _load_json(Path(llava_questions), "LLaVA ScienceQA question file")
    if not isinstance(records, list):
        raise ValueError(f"{llava_questions}: expected a JSON list of questions, got {type(records).__name__}")
    lines = []
    for position, record in enumerate(records):
        where = f"{llava_questions}: record {position}"
        question_id = _field(record, "id", str, where)
        turns = _field(record, "conversations", list, f"{where} (id {question_id})")
        first = turns[0] if turns else None
        value = _field(first, "value", str, f"{where} (id {question_id}) turn 0")
        if first.get("from") != "human":
            raise ValueError(f"{where} (id {question_id}): the first turn must be the human's")
        line = {"question_id": question_id, "text": f"{value.replace('<image>', '').strip()}\n{prompt}"}
        if record.get("image"):
            line["image"] = _field(record, "image", str, f"{where} (id {question_id})")
        lines.append(line)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    return out
