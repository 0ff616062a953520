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
  under ``counts["missing"]``; a prediction whose id has no label is counted under ``counts["extra"]``.
- where the reference would divide by zero (no "yes" predictions, or no positive labels) the metric is 0.0.
- ``overall`` is the mean of the per-split F1 scores, the single POPE number LLaVA-1.5 reports; the reference
  itself prints only per-split numbers. The pooled metrics over all splits are under the group value "all".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mambavlm.eval.scorers.report import ScoreReport

__all__ = ["POPE_SPLITS", "POPELabel", "pope_answer", "score_pope"]

POPE_SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
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
