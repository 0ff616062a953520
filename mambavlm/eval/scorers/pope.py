"""POPE (object-hallucination yes/no probing) scored as LLaVA's ``llava/eval/eval_pope.py`` scores it.

Reference: haotian-liu/LLaVA ``llava/eval/eval_pope.py`` (the scorer behind LLaVA-1.5's POPE numbers and the
baselines the papers quote). Its answer rule is the one of RUCAIBox/POPE ``evaluate.py``: both keep the text
before the first '.', delete commas, split on single spaces and answer "no" if one of the words is exactly
"No", "not" or "no", else "yes". The two scripts differ only in plumbing: POPE's reads ``answer['answer']``
from one answer file, LLaVA's reads ``answer['text']`` and splits the answers by the question file's
``category`` (random / popular / adversarial) before scoring each split; neither treats punctuation other than
commas, so "not!" or "no?" is not a negative word in either, and upper-case "NO" / "Not" are not either.

Departures (each named where it happens):
- predictions are matched to labels by question id; both references zip the answer list with the label list
  by position (a missing answer shifts every later pair). An id without a prediction is left out and counted
  under ``counts["missing"]``.
- an answer whose id has no label is refused: ``score_answers`` (``eval/score.py``, ``eval/run.py
  --annotations``) raises ValueError naming how many, the first ids and the label files, as LLaVA's script
  stops with a KeyError on an answer whose id its question file lacks (``questions[x['question_id']]``).
  LLaVA's script also passes over the answers of a split whose label file is not in ``--annotation-dir``;
  that is not reproduced: score against the folder of all three files, or answers of the splits given.
  ``score_pope`` called directly with such predictions still counts them under ``counts["extra"]``
  (always 0 through ``score_answers``).
- where the reference would divide by zero (no "yes" predictions, or no positive labels) the metric is 0.0.
- ``overall`` is the mean of the per-split F1 scores, the single POPE number LLaVA-1.5 reports; the reference
  itself prints only per-split numbers. The pooled metrics over all splits are under the group value "all".
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mambavlm.eval.scorers.files import field as _field
from mambavlm.eval.scorers.report import ScoreReport

__all__ = [
    "POPE_PROMPT",
    "POPE_QUESTION_ID_OFFSETS",
    "POPE_SPLITS",
    "POPELabel",
    "pope_answer",
    "read_pope_labels",
    "score_pope",
]

POPE_SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")

POPE_PROMPT = "Answer the question using a single word or phrase."
"""What LLaVA-1.5 appends, after a newline, to each POPE question (``llava_pope_test.jsonl``: "Is there a
snowboard in the image?\\nAnswer the question using a single word or phrase.")."""

POPE_QUESTION_ID_OFFSETS: dict[str, int] = {"adversarial": 0, "random": 10_000_000, "popular": 20_000_000}
"""What LLaVA's ``llava_pope_test.jsonl`` adds to a label file's ``question_id`` to make it unique over the
three splits, which each number their questions from 1: its adversarial questions are 1..3000, its random
ones 10000001, ..., its popular ones 20000001, ..., each with the image and question of the label file's
line of that number (e.g. random 10000017 and popular 20000011 are lines 17 and 11 of those files)."""

_LABEL_FILE_PREFIX, _LABEL_FILE_SUFFIX = "coco_pope_", ".json"
_NEGATIVE_WORDS = ("No", "not", "no")
_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
_TP, _FP, _TN, _FN = range(4)  # positions in a split's confusion counts


@dataclass(frozen=True)
class POPELabel:
    """One POPE question's ground truth: ``label`` "yes"/"no" and its ``split`` (one of ``POPE_SPLITS``)."""

    label: str
    split: str


def pope_answer(text: str) -> str:
    """Map a generated answer to "yes"/"no" as LLaVA's ``eval_pope.py`` (= RUCAIBox/POPE ``evaluate.py``) does.

    Keep what precedes the first '.', remove every ',', split on ' ' (single spaces, not any whitespace) and
    answer "no" if a word equals "No", "not" or "no" exactly; otherwise (including an empty answer) "yes".
    So "yes. But not sure" is "yes" (the "not" is after the cut), "Nope" / "NO" / "Not" / "isn't" / "not!"
    are "yes", and "No, there is not." is "no".
    """
    first_sentence = text.split(".", 1)[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if any(word in _NEGATIVE_WORDS for word in words) else "yes"


def _printed_percent(fraction: float) -> float:
    """The reference's ``'%.3f'`` print of a fraction, as a percent (0.5714... -> 57.1)."""
    return round(round(fraction, 3) * 100, 1)


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, 0.0 where the reference would raise ZeroDivisionError (a departure)."""
    return numerator / denominator if denominator else 0.0


def _metrics(tp: int, fp: int, tn: int, fn: int) -> dict[str, float]:
    """Unrounded fractions, computed in the reference's order of operations (F1 from precision and recall)."""
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return {
        "accuracy": (tp + tn) / (tp + tn + fp + fn),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": (tp + fp) / (tp + tn + fp + fn),
    }


def score_pope(predictions: Mapping[str, str], labels: Mapping[str, POPELabel]) -> ScoreReport:
    """Score POPE as LLaVA's ``llava/eval/eval_pope.py``, one confusion matrix per split.

    predictions: question id -> generated text. labels: question id -> ``POPELabel``. Labels must be "yes"
    or "no" and splits one of ``POPE_SPLITS`` (ValueError otherwise; the reference reads any label other than
    "no" as "yes"). Breakdowns: metric ("accuracy", "precision", "recall", "f1", "yes_ratio") -> split (and
    "all", pooled) -> percent, rounded as the reference's ``'%.3f'`` print of the fraction. ``overall``: the
    mean of the per-split F1 fractions, rounded the same way. A split with no scored question is left out.
    """
    confusion: dict[str, list[int]] = {}
    missing = 0
    for qid, truth in labels.items():
        if truth.label not in ("yes", "no"):
            raise ValueError(f"POPE label for {qid!r} must be 'yes' or 'no', got {truth.label!r}")
        if truth.split not in POPE_SPLITS:
            raise ValueError(f"POPE split for {qid!r} must be one of {POPE_SPLITS}, got {truth.split!r}")
        if qid not in predictions:
            missing += 1
            continue
        predicted_yes = pope_answer(predictions[qid]) == "yes"
        label_yes = truth.label == "yes"
        if predicted_yes:
            cell = _TP if label_yes else _FP
        else:
            cell = _FN if label_yes else _TN
        confusion.setdefault(truth.split, [0, 0, 0, 0])[cell] += 1

    splits = [split for split in POPE_SPLITS if split in confusion]
    per_split = {split: _metrics(*confusion[split]) for split in splits}
    if per_split:
        per_split["all"] = _metrics(*(sum(cells) for cells in zip(*(confusion[s] for s in splits))))
    breakdowns = {
        metric: {group: _printed_percent(values[metric]) for group, values in per_split.items()} for metric in _METRICS
    }
    mean_f1 = sum(per_split[split]["f1"] for split in splits) / len(splits) if splits else 0.0
    counts = {
        "labels": len(labels),
        "scored": sum(sum(cells) for cells in confusion.values()),
        "missing": missing,
        "extra": sum(1 for qid in predictions if qid not in labels),
    }
    counts.update({split: sum(confusion[split]) for split in splits})
    return ScoreReport(benchmark="POPE", overall=_printed_percent(mean_f1), breakdowns=breakdowns, counts=counts)


def _label_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob(f"{_LABEL_FILE_PREFIX}*{_LABEL_FILE_SUFFIX}"))
        if not files:
            raise FileNotFoundError(f"no {_LABEL_FILE_PREFIX}*{_LABEL_FILE_SUFFIX} POPE label file in {path}")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"POPE label file or directory not found: {path}")
    return [path]


def read_pope_labels(annotations: Path) -> dict[str, POPELabel]:
    """Question id -> :class:`POPELabel` for :func:`score_pope`, from POPE's COCO label files.

    ``annotations``: one ``coco_pope_{random,popular,adversarial}.json`` or a directory whose
    ``coco_pope_*.json`` files are all read (the folder LLaVA's ``docs/Evaluation.md`` points to:
    https://github.com/AoiDragon/POPE/tree/e3e39262c85a6a83f26cf5094022a782cb0df58d/output/coco). Each
    file holds one JSON object a line, ``{"question_id": int, "image", "text", "label": "yes" | "no"}``; the
    split is the file name between "coco_pope_" and ".json", as LLaVA's ``eval_pope.py`` takes it
    (``file[10:-5]``).

    Ids: every split numbers its questions from 1, so the key is ``str(POPE_QUESTION_ID_OFFSETS[split] +
    question_id)``, the id LLaVA's ``llava_pope_test.jsonl`` gives the same question ("3", "10000003",
    "20000003" for question 3 of the adversarial, random and popular files); keys cannot collide, since a
    label file's ``question_id`` must lie in 1..9999999. (``eval_pope.py`` itself pairs answers with labels
    by position within a split; the scorer pairs them by these ids.)

    Raises FileNotFoundError naming a missing file or a directory without label files, and ValueError naming
    the file and the line (and question id) of a record that is not JSON, lacks ``question_id`` or ``label``,
    has an id out of range or repeated, or a label other than "yes" / "no"; or a file name that names no split.
    """
    labels: dict[str, POPELabel] = {}
    for file in _label_files(Path(annotations)):
        split = file.name[len(_LABEL_FILE_PREFIX) : -len(_LABEL_FILE_SUFFIX)]
        named = file.name.startswith(_LABEL_FILE_PREFIX) and file.name.endswith(_LABEL_FILE_SUFFIX)
        if not named or split not in POPE_SPLITS:
            raise ValueError(f"{file}: a POPE label file is named coco_pope_<split>.json, <split> one of {POPE_SPLITS}")
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{file}: line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not JSON ({err.msg})") from err
            question_id = _field(record, "question_id", int, where)
            where = f"{where} (question_id {question_id})"
            if not 1 <= question_id < POPE_QUESTION_ID_OFFSETS["random"]:
                raise ValueError(f"{where}: question_id must lie in 1..{POPE_QUESTION_ID_OFFSETS['random'] - 1}")
            label = _field(record, "label", str, where)
            if label not in ("yes", "no"):
                raise ValueError(f"{where}: label must be 'yes' or 'no', got {label!r}")
            key = str(POPE_QUESTION_ID_OFFSETS[split] + question_id)
            if key in labels:
                raise ValueError(f"{where}: question_id repeated")
            labels[key] = POPELabel(label, split)
    return labels
