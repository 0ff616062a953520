"""TallyQA / VSR scorers and the likelihood argmax, every expected number worked out by hand."""

from __future__ import annotations

import math

import pytest

from mambavlm.eval.scorers.closed_set import (
    TALLYQA_LETTERS,
    TallyQAItem,
    argmax_option,
    score_tallyqa,
    score_tallyqa_likelihood,
    score_vsr,
    score_vsr_likelihood,
    tallyqa_count,
    vsr_answer,
)


def test_argmax_option_picks_highest_and_first_on_ties() -> None:
    assert argmax_option({"True": -0.1, "False": -2.3}) == "True"
    assert argmax_option({"A": -3.0, "B": -0.5, "C": -0.7}) == "B"
    assert argmax_option({"B": -1.0, "A": -1.0}) == "B"  # tie: first in the given order
    assert argmax_option({"A": -1.0, "B": -1.0}) == "A"
    assert argmax_option({"x": -math.inf, "y": -math.inf}) == "x"
    with pytest.raises(ValueError):
        argmax_option({})
    with pytest.raises(ValueError):
        argmax_option({"A": math.nan, "B": 0.0})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("two", 2),
        ("2", 2),
        ("Two.", 2),
        ("the 2", 2),  # article dropped
        ("none", 0),  # the VQA map has "none" -> "0"
        ("zero", 0),
        ("Ten.", 10),
        (" 3\n", 3),
        ("There are 2.", None),  # exact match: more than a number
        ("2 dogs", None),
        ("eleven", None),  # the map stops at ten
        ("02", None),
        ("2.5", None),
    ],
)
def test_tallyqa_count(text: str, expected: int | None) -> None:
    assert tallyqa_count(text) == expected


def _tally_items() -> dict[str, TallyQAItem]:
    return {
        "q1": TallyQAItem(2, "simple"),
        "q2": TallyQAItem(2, "simple"),
        "q3": TallyQAItem(0, "simple"),
        "q4": TallyQAItem(3, "complex"),
        "q5": TallyQAItem(10, "complex"),
        "q6": TallyQAItem(4, "complex"),
    }


def test_score_tallyqa_text_by_hand() -> None:
    predictions = {"q1": "two", "q2": "2", "q3": "none", "q4": "There are 3.", "q5": "Ten.", "x": "1"}
    report = score_tallyqa(predictions, _tally_items())
    # simple: q1 q2 q3 right -> 3/3; complex: q4 wrong (unparsed), q5 right, q6 missing -> 1/2; final 4/5
    assert report.breakdowns == {"split": {"simple": 100.0, "complex": 50.0}}
    assert report.overall == 80.0
    assert report.counts == {"items": 6, "scored": 5, "missing": 1, "unparsed": 1, "simple": 3, "complex": 2}
    assert report.benchmark == "TallyQA"


def _letter_logprobs(best: str, runner_up: str | None = None) -> dict[str, float]:
    logprobs = {letter: -10.0 for letter in TALLYQA_LETTERS}
    logprobs[best] = -0.2
    if runner_up is not None:
        logprobs[runner_up] = -0.2  # a tie with `best`
    return logprobs


def test_score_tallyqa_likelihood_by_hand() -> None:
    option_logprobs = {
        "q1": _letter_logprobs("C"),  # C = 2: right
        "q2": _letter_logprobs("B", runner_up="C"),  # tie B/C -> B (first of A..P) = 1: wrong
        "q4": _letter_logprobs("D"),  # D = 3: right
        "q5": _letter_logprobs("K"),  # K = 10: right
    }
    report = score_tallyqa_likelihood(option_logprobs, _tally_items())
    # simple: 1/2 right; complex: 2/2 right; final 3/4; q3 and q6 missing
    assert report.breakdowns == {"split": {"simple": 50.0, "complex": 100.0}}
    assert report.overall == 75.0
    assert report.counts["missing"] == 2 and report.counts["unparsed"] == 0
    with pytest.raises(ValueError):
        score_tallyqa_likelihood({"q1": {"0": 0.0, "1": -1.0}}, _tally_items())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("True.", True),
        ("true", True),
        ("Yes, it is.", True),
        ("FALSE!", False),
        ("No, it is not.", False),
        ("It is false", None),  # only the first word counts
        ("Truly", None),
        ("", None),
    ],
)
def test_vsr_answer(text: str, expected: bool | None) -> None:
    assert vsr_answer(text) is expected


def test_score_vsr_text_by_hand() -> None:
    labels = {"v1": True, "v2": False, "v3": True, "v4": False, "v5": True, "v6": False}
    predictions = {
        "v1": "True.",  # right
        "v2": "false",  # right
        "v3": "No, it is not.",  # False: wrong
        "v4": "It is false",  # unparsed: wrong
        "v5": "Yes",  # right
        "v6": "FALSE!",  # right
    }
    report = score_vsr(predictions, labels)
    # 4/6 = 0.667 -> 66.7; always "True": 3/6 -> 50.0
    assert report.overall == 66.7
    assert report.breakdowns == {"baseline": {"always_true": 50.0}}
    assert report.counts == {"items": 6, "scored": 6, "missing": 0, "unparsed": 1}
    assert report.benchmark == "VSR"


def test_score_vsr_likelihood_by_hand() -> None:
    labels = {"v1": True, "v2": False, "v3": False}
    option_logprobs = {
        "v1": {"True": -0.1, "False": -2.3},  # True: right
        "v2": {"True": -0.7, "False": -0.7},  # tie -> True (first): wrong
        # v3 missing
    }
    report = score_vsr_likelihood(option_logprobs, labels)
    # 1/2 right -> 50.0; always True on the scored two: 1/2 -> 50.0
    assert report.overall == 50.0
    assert report.breakdowns == {"baseline": {"always_true": 50.0}}
    assert report.counts == {"items": 3, "scored": 2, "missing": 1, "unparsed": 0}
    with pytest.raises(ValueError):
        score_vsr_likelihood({"v1": {"yes": 0.0, "no": -1.0}}, labels)
