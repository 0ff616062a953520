"""Closed-set tasks: TallyQA (counting) and VSR (true/false), by likelihood as Prismatic does, or from text.

Reference: TRI-ML/vlm-evaluation (the Prismatic VLMs evaluation harness), ``vlm_eval/tasks/harnesses/
tallyqa.py`` (``TallyQAScorer``) and ``vsr.py`` (``VSRScorer``), with the option probabilities from
``generate_batch(..., return_string_probabilities=...)`` of the Prismatic models (``vlm_eval/models/
prismatic.py``). That harness never parses generated text for these tasks: it asks a multiple-choice /
true-false prompt, takes the softmax of the *first generated token*, keeps the probabilities of the option
tokens (TallyQA: the 16 letters "A".."P" standing for the counts 0..15; VSR: "True", "False"), renormalises
them and predicts ``np.argmax`` (the first option on a tie). Accuracy is exact match of that option: TallyQA
per split ("simple", "complex") and pooled ("final"); VSR overall, with the always-"True" accuracy it logs
as its baseline. It divides by the number of results it has, so a question without a result is left out;
here that is ``counts["missing"]``. It prints fractions with ``:.3f``; the percents here are rounded the same
way (0.6667 -> 66.7). Its ROC-AUC / PR-AUC numbers are not reproduced.

An answer (generated or by likelihood) whose id is not a question of the test file is refused by
``score_answers`` (ValueError naming how many, the first ids and the file); the harness never meets one, as
it scores the results it wrote for its own dataset index, each carrying its ground truth. Called directly,
the four scorers ignore predictions for ids not among the items.

``score_tallyqa_likelihood`` / ``score_vsr_likelihood`` are that mode (argmax over per-option log-likelihoods
is the argmax over the renormalised probabilities). ``score_tallyqa`` / ``score_vsr`` score generated text
instead, which the Prismatic harness does not do; their parsing rules are ours and say so.

Files: ``read_tallyqa`` / ``read_vsr`` read the official test files, ``build_tallyqa_questions`` /
``build_vsr_questions`` write the LLaVA-style question JSONL our run answers (LLaVA-1.5 has no question file for
either), with the prompts of the harness's Prismatic model wrapper (``vlm_eval/models/prismatic.py``):
``get_mc_prompt_fn`` for TallyQA (the counts 0..15 as options A..P), ``get_true_false_chat_prompt_fn`` for VSR.
With the TallyQA prompt a model answers with a letter: score those answers with ``score_tallyqa_likelihood``
(option log-likelihoods of ``TALLYQA_LETTERS``), not ``score_tallyqa``, which reads a count.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mambavlm.atomic import atomic_file
from mambavlm.eval.scorers.files import field as _field
from mambavlm.eval.scorers.report import ScoreReport

__all__ = [
    "TALLYQA_LETTERS",
    "TALLYQA_PROMPT",
    "TALLYQA_SPLITS",
    "VSR_OPTIONS",
    "VSR_PROMPT",
    "TallyQAItem",
    "argmax_option",
    "build_tallyqa_questions",
    "build_vsr_questions",
    "read_tallyqa",
    "read_vsr",
    "score_tallyqa",
    "score_tallyqa_likelihood",
    "score_vsr",
    "score_vsr_likelihood",
    "tallyqa_count",
    "vsr_answer",
]

TALLYQA_LETTERS: tuple[str, ...] = tuple(chr(ord("A") + count) for count in range(16))  # letter i <-> count i
TALLYQA_SPLITS: tuple[str, ...] = ("simple", "complex")
VSR_OPTIONS: tuple[str, ...] = ("True", "False")

TALLYQA_PROMPT = "Answer with the option's letter from the given choices directly."
"""The last line of the harness's multiple-choice prompt (``get_mc_prompt_fn``), after the question and the
options "A. 0" .. "P. 15", each on its own line."""
VSR_PROMPT = 'Respond with "True" or "False" directly.'
"""The last line of the harness's true/false prompt (``get_true_false_chat_prompt_fn``), after
'Based on the image, is this statement "True" or "False"? <caption>'."""
_VSR_STATEMENT = 'Based on the image, is this statement "True" or "False"? '

# The official VQA answer normalisation (VQA eval ``processPunctuation`` / ``processDigitArticle``).
_VQA_PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip
_VQA_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: a mistyped look-behind, i.e. "a '.' not before a digit"
_VQA_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_VQA_PERIOD_STRIP_COUNT = int(re.UNICODE)  # sic: the VQA code passes re.UNICODE (32) as sub()'s count
_VQA_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_VQA_ARTICLES = ("a", "an", "the")
_CANONICAL_INTEGER = re.compile(r"0|[1-9][0-9]*")
_VSR_WORDS = {"true": True, "yes": True, "false": False, "no": False}


@dataclass(frozen=True)
class TallyQAItem:
    """One TallyQA test question: the true count ``answer`` and its ``split`` ("simple" or "complex")."""

    answer: int
    split: str


def argmax_option(option_logprobs: Mapping[str, float]) -> str:
    """The option with the highest log-likelihood; on a tie the first in the mapping's order.

    Reference: Prismatic's ``vlm-evaluation`` harness (TRI-ML/vlm-evaluation), which scores closed-set tasks
    by ``np.argmax`` over the option probabilities (first maximum wins). Pass the options in the harness's
    order (``TALLYQA_LETTERS``, ``VSR_OPTIONS``) to break ties as it does. Departure: a NaN log-likelihood
    raises ValueError (``np.argmax`` would pick the NaN).
    """
    best: tuple[str, float] | None = None
    for option, logprob in option_logprobs.items():
        if math.isnan(logprob):
            raise ValueError(f"log-likelihood of option {option!r} is NaN")
        if best is None or logprob > best[1]:
            best = (option, logprob)
    if best is None:
        raise ValueError("argmax_option needs at least one option")
    return best[0]


def tallyqa_count(text: str) -> int | None:
    """The count a generated answer states, or None if it is not a bare number after VQA normalisation.

    The answer goes through the official VQA normalisation (newlines/tabs to spaces, strip, punctuation rule,
    '.' not before a digit removed, lower-case, articles dropped, "none"/"zero".."ten" -> "0".."10"; the
    contraction table is skipped as it never yields or removes a number) and must then be exactly a
    non-negative integer: "two" / "2" / "Two." / "the 2" -> 2, "none" -> 0, "There are 2." / "2 dogs" /
    "eleven" -> None. This text mode is ours; Prismatic's harness scores TallyQA by likelihood only.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    processed = text
    for mark in _VQA_PUNCTUATION:
        if mark + " " in text or " " + mark in text or _VQA_COMMA_STRIP.search(text) is not None:
            processed = processed.replace(mark, "")
        else:
            processed = processed.replace(mark, " ")
    processed = _VQA_PERIOD_STRIP.sub("", processed, count=_VQA_PERIOD_STRIP_COUNT)
    words = [_VQA_NUMBER_WORDS.get(word, word) for word in processed.lower().split() if word not in _VQA_ARTICLES]
    answer = " ".join(words)
    return int(answer) if _CANONICAL_INTEGER.fullmatch(answer) else None


def vsr_answer(text: str) -> bool | None:
    """True/False from a generated VSR answer's first word, or None if that word is none of the four.

    The first whitespace-separated word, stripped of surrounding punctuation and lower-cased: "true"/"yes"
    -> True, "false"/"no" -> False ("True." -> True, "No, it is not." -> False, "It is false" -> None).
    This text mode is ours; Prismatic's harness scores VSR by likelihood only.
    """
    words = text.split()
    return _VSR_WORDS.get(words[0].strip(string.punctuation).lower()) if words else None


def _printed_percent(fraction: float) -> float:
    """The harness's ``:.3f`` print of a fraction, as a percent (0.6667 -> 66.7)."""
    return round(round(fraction, 3) * 100, 1)


def _score_counts(predicted: Mapping[str, int | None], items: Mapping[str, TallyQAItem], unparsed: int) -> ScoreReport:
    right = {split: 0 for split in TALLYQA_SPLITS}
    total = {split: 0 for split in TALLYQA_SPLITS}
    missing = 0
    for qid, item in items.items():
        if item.split not in TALLYQA_SPLITS:
            raise ValueError(f"TallyQA split for {qid!r} must be one of {TALLYQA_SPLITS}, got {item.split!r}")
        if qid not in predicted:
            missing += 1
            continue
        right[item.split] += predicted[qid] == item.answer
        total[item.split] += 1
    scored = sum(total.values())
    split_accuracy = {split: _printed_percent(right[split] / total[split]) for split in TALLYQA_SPLITS if total[split]}
    counts = {"items": len(items), "scored": scored, "missing": missing, "unparsed": unparsed}
    counts.update({split: total[split] for split in TALLYQA_SPLITS})
    overall = _printed_percent(sum(right.values()) / scored) if scored else 0.0
    return ScoreReport(benchmark="TallyQA", overall=overall, breakdowns={"split": split_accuracy}, counts=counts)


def score_tallyqa(predictions: Mapping[str, str], items: Mapping[str, TallyQAItem]) -> ScoreReport:
    """TallyQA exact-match accuracy of generated answers (``tallyqa_count`` == true count).

    ``overall``: pooled over both splits (the harness's "final"); breakdowns {"split": {"simple", "complex"}}
    in percent. Unparseable answers are wrong and counted under ``counts["unparsed"]``.
    """
    predicted = {qid: tallyqa_count(text) for qid, text in predictions.items() if qid in items}
    return _score_counts(predicted, items, unparsed=sum(count is None for count in predicted.values()))


def score_tallyqa_likelihood(
    option_logprobs: Mapping[str, Mapping[str, float]], items: Mapping[str, TallyQAItem]
) -> ScoreReport:
    """TallyQA as Prismatic's ``TallyQAScorer``: the argmax letter of "A".."P" is the predicted count 0..15.

    option_logprobs: question id -> {letter: log-likelihood} over exactly ``TALLYQA_LETTERS`` (ValueError
    otherwise), in that order for the harness's tie-break. Report as ``score_tallyqa``.
    """
    predicted: dict[str, int | None] = {}
    for qid, logprobs in option_logprobs.items():
        if qid not in items:
            continue
        if set(logprobs) != set(TALLYQA_LETTERS):
            raise ValueError(f"TallyQA options for {qid!r} must be the letters A..P, got {sorted(logprobs)}")
        predicted[qid] = TALLYQA_LETTERS.index(argmax_option(logprobs))
    return _score_counts(predicted, items, unparsed=0)


def _score_true_false(predicted: Mapping[str, bool | None], labels: Mapping[str, bool], unparsed: int) -> ScoreReport:
    scored = [qid for qid in labels if qid in predicted]
    n_right = sum(predicted[qid] == labels[qid] for qid in scored)
    n_true = sum(labels[qid] for qid in scored)
    counts = {"items": len(labels), "scored": len(scored), "missing": len(labels) - len(scored), "unparsed": unparsed}
    return ScoreReport(
        benchmark="VSR",
        overall=_printed_percent(n_right / len(scored)) if scored else 0.0,
        breakdowns={"baseline": {"always_true": _printed_percent(n_true / len(scored)) if scored else 0.0}},
        counts=counts,
    )


def score_vsr(predictions: Mapping[str, str], labels: Mapping[str, bool]) -> ScoreReport:
    """VSR (zero-shot test) accuracy of generated answers read by ``vsr_answer``.

    labels: example id -> whether the caption is true of the image. ``overall``: accuracy in percent;
    breakdowns {"baseline": {"always_true": ...}} as the harness logs. Unparseable answers are wrong and
    counted under ``counts["unparsed"]``.
    """
    predicted = {qid: vsr_answer(text) for qid, text in predictions.items() if qid in labels}
    return _score_true_false(predicted, labels, unparsed=sum(answer is None for answer in predicted.values()))


def score_vsr_likelihood(option_logprobs: Mapping[str, Mapping[str, float]], labels: Mapping[str, bool]) -> ScoreReport:
    """VSR as Prismatic's ``VSRScorer``: predict the argmax of {"True", "False"} (ValueError for other keys).

    Report as ``score_vsr``.
    """
    predicted: dict[str, bool | None] = {}
    for qid, logprobs in option_logprobs.items():
        if qid not in labels:
            continue
        if set(logprobs) != set(VSR_OPTIONS):
            raise ValueError(f"VSR options for {qid!r} must be 'True' and 'False', got {sorted(logprobs)}")
        predicted[qid] = argmax_option(logprobs) == "True"
    return _score_true_false(predicted, labels, unparsed=0)


@dataclass(frozen=True)
class _TallyQARecord:
    """One question of TallyQA's ``test.json``, its split already named."""

    question_id: int
    image: str
    question: str
    answer: int
    split: str


@dataclass(frozen=True)
class _VSRRecord:
    """One example of VSR's ``test.jsonl``, numbered by its position."""

    example_id: int
    image: str
    caption: str
    label: bool


def _tallyqa_records(annotations: Path) -> list[_TallyQARecord]:
    """The questions of TallyQA's ``test.json`` in file order, checked as ``build_tallyqa_indices`` reads them."""
    if not annotations.is_file():
        raise FileNotFoundError(f"TallyQA test file not found: {annotations}")
    try:
        examples = json.loads(annotations.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{annotations}: not a JSON file ({err})") from None
    if not isinstance(examples, list) or not examples:
        raise ValueError(f"{annotations}: expected a non-empty list of questions")
    records: list[_TallyQARecord] = []
    seen: set[int] = set()
    for number, example in enumerate(examples):
        where = f"{annotations} [{number}]"
        if not isinstance(example, dict):
            raise ValueError(f"{where}: expected an object, got {type(example).__name__}")
        question_id = _field(example, "question_id", int, where)
        where = f"{annotations} question {question_id}"
        if question_id in seen:
            raise ValueError(f"{where}: question_id repeated")
        seen.add(question_id)
        answer = _field(example, "answer", int, where)
        if answer < 0:
            raise ValueError(f"{where}: answer {answer} is not a count")
        split = "simple" if _field(example, "issimple", bool, where) else "complex"
        image, question = _field(example, "image", str, where), _field(example, "question", str, where)
        records.append(_TallyQARecord(question_id, image, question, answer, split))
    return records


def read_tallyqa(annotations: Path) -> dict[str, TallyQAItem]:
    """TallyQA's test questions, keyed by ``question_id`` as text, as the Prismatic harness's ``TallyQAScorer``
    scores them.

    annotations: TallyQA's ``test.json`` (``tallyqa.zip`` from manoja328/TallyQA_dataset, the file
    vlm-evaluation's registry downloads), a list of ``{"image", "answer", "data_source", "question", "image_id",
    "question_id", "issimple"}``. Fields read: ``question_id`` (the key, as the harness's ``int`` id in text),
    ``answer`` (the count) and ``issimple`` (split "simple" if true, else "complex", as ``build_tallyqa_indices``
    sets it); ``image`` and ``question`` are checked too (``build_tallyqa_questions`` writes them).

    Raises FileNotFoundError for a missing file; ValueError naming the file and question (its id, or its
    position before the id is read) for a missing field, a field of the wrong type, a negative answer or a
    repeated id.
    """
    return {str(r.question_id): TallyQAItem(r.answer, r.split) for r in _tallyqa_records(annotations)}


def build_tallyqa_questions(annotations: Path, out: Path, prompt: str = TALLYQA_PROMPT) -> Path:
    """Write TallyQA's test questions as the LLaVA-style question JSONL our run answers; returns ``out``.

    One line per question of ``test.json`` (see ``read_tallyqa``), in file order: ``{"question_id": int,
    "image", "text"}``. ``image`` is the file's own path (``"VG_100K_2/2410408.jpg"``), relative to the folder
    holding Visual Genome's ``VG_100K/`` and ``VG_100K_2/`` (and COCO's folders for any COCO path), which is the
    harness's image root. ``text`` is the harness's ``get_mc_prompt_fn(question, ["0", ..., "15"])`` message
    without its leading newline (our runner puts the image and a newline first, as LLaVA does): the question,
    the options "A. 0" .. "P. 15" (``TALLYQA_LETTERS``), and ``prompt``, one per line. (The harness's own
    ``TallyQAMapDataset`` calls its prompt function with the question alone, which that two-argument function
    cannot take; the 16 count options are what its module docstring and ``TallyQAScorer``, letter i = count
    i, describe.)

    Raises as ``read_tallyqa``.
    """
    options = "\n".join(f"{letter}. {count}" for count, letter in enumerate(TALLYQA_LETTERS))
    rows = [
        {"question_id": r.question_id, "image": r.image, "text": f"{r.question}\n{options}\n{prompt}"}
        for r in _tallyqa_records(annotations)
    ]
    _write_jsonl(out, rows)
    return out


def _vsr_records(annotations: Path) -> list[_VSRRecord]:
    """The examples of VSR's ``test.jsonl`` in file order, numbered as ``build_vsr_indices`` numbers them."""
    if not annotations.is_file():
        raise FileNotFoundError(f"VSR test file not found: {annotations}")
    try:
        lines = annotations.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{annotations}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    records: list[_VSRRecord] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{annotations} line {number}"
        try:
            example = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not JSON ({err.msg})") from None
        if not isinstance(example, dict):
            raise ValueError(f"{where}: expected an object, got {type(example).__name__}")
        label = _field(example, "label", int, where)
        if label not in (0, 1):
            raise ValueError(f"{where}: label must be 0 or 1, got {label}")
        image, caption = _field(example, "image", str, where), _field(example, "caption", str, where)
        records.append(_VSRRecord(len(records), image, caption, label == 1))
    if not records:
        raise ValueError(f"{annotations}: no examples")
    return records


def read_vsr(annotations: Path) -> dict[str, bool]:
    """VSR's zero-shot test labels, keyed by example id, as the Prismatic harness's ``VSRScorer`` scores them.

    annotations: VSR's zero-shot split ``test.jsonl`` (cambridgeltl/visual-spatial-reasoning; Hugging Face
    cambridgeltl/vsr_zeroshot, the file vlm-evaluation's registry downloads): one JSON object a line, ``{"image",
    "image_link", "caption", "label", "relation", ...}``. Fields read: ``label`` (1 -> True, 0 -> False; the
    harness maps ``label == 1`` to True), ``image`` and ``caption`` (checked; ``build_vsr_questions`` writes them).

    Ids: the example's 0-based position in the file (its line index; blank lines are not counted), as text: the
    ``example_id`` the harness's ``build_vsr_indices`` gives it (``enumerate`` over the file's objects). The file
    has no id of its own; the position is stable as long as the published file is.

    Raises FileNotFoundError for a missing file; ValueError naming the file and line for a line that is not a
    JSON object, a missing or mistyped field, a label other than 0/1, and for a file without examples.
    """
    return {str(r.example_id): r.label for r in _vsr_records(annotations)}


def build_vsr_questions(annotations: Path, out: Path, prompt: str = VSR_PROMPT) -> Path:
    """Write VSR's zero-shot test examples as the LLaVA-style question JSONL our run answers; returns ``out``.

    One line per example of ``test.jsonl`` (see ``read_vsr``, whose ids it uses), in file order:
    ``{"question_id": int, "image", "text"}``. ``image`` is the file's own name (``"000000085637.jpg"``),
    relative to the folder of VSR's images (``vsr_images.zip``, the COCO 2017 images by file name; the
    harness's image root). ``text`` is the harness's ``get_true_false_chat_prompt_fn`` message without its
    leading newline: 'Based on the image, is this statement "True" or "False"? <caption>', a newline, and
    ``prompt``.

    Raises as ``read_vsr``.
    """
    rows = [
        {"question_id": r.example_id, "image": r.image, "text": f"{_VSR_STATEMENT}{r.caption}\n{prompt}"}
        for r in _vsr_records(annotations)
    ]
    _write_jsonl(out, rows)
    return out


def _write_jsonl(out: Path, rows: list[dict[str, object]]) -> None:
    """One JSON object a line, written atomically (``out`` appears whole or not at all)."""
    with atomic_file(out) as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
