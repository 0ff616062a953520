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

``score_tallyqa_likelihood`` / ``score_vsr_likelihood`` are that mode (argmax over per-option log-likelihoods
is the argmax over the renormalised probabilities). ``score_tallyqa`` / ``score_vsr`` score generated text
instead, which the Prismatic harness does not do; their parsing rules are ours and say so.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass

from mambavlm.eval.scorers.report import ScoreReport

__all__ = [
    "TALLYQA_LETTERS",
    "TALLYQA_SPLITS",
    "VSR_OPTIONS",
    "TallyQAItem",
    "argmax_option",
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
