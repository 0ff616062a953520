"""POPE scorer: LLaVA's eval_pope.py answer rule and metrics, every expected number worked out by hand."""

from __future__ import annotations

import pytest

from mambavlm.eval.scorers.pope import POPELabel, pope_answer, score_pope


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes.", "yes"),
        ("No, there is not.", "no"),  # "No there is not" -> "No" is a word
        ("There is not a dog.", "no"),
        ("Nope", "yes"),  # not one of the three words
        ("yes. But not sure", "yes"),  # the "not" is after the first '.', which is cut away
        ("Yes, there is a dog", "yes"),
        ("no, ", "no"),  # commas deleted: "no " -> ["no", ""]
        ("There is no dog!", "no"),
        ("NO", "yes"),  # case-sensitive: only "No", "not", "no"
        ("Not really", "yes"),  # "Not" is not in the list either
        ("There isn't", "yes"),
        ("not!", "yes"),  # only commas are removed, so "not!" is not "not"
        ("No\nthere is none", "yes"),  # split on ' ' only: "No\nthere" is one word
        ("", "yes"),
    ],
)
def test_pope_answer(text: str, expected: str) -> None:
    assert pope_answer(text) == expected


def _six_item_example() -> tuple[dict[str, str], dict[str, POPELabel]]:
    labels = {
        "q1": POPELabel("yes", "random"),
        "q2": POPELabel("yes", "random"),
        "q3": POPELabel("yes", "random"),
        "q4": POPELabel("no", "random"),
        "q5": POPELabel("no", "random"),
        "q6": POPELabel("no", "random"),
    }
    # Listed out of label order: matching is by id, not position.
    predictions = {
        "q6": "Nope",  # yes, label no  -> FP
        "q1": "Yes.",  # yes, label yes -> TP
        "q3": "No, there is not.",  # no, label yes -> FN
        "q2": "yes. But not sure",  # yes, label yes -> TP
        "q5": "Yes, there is a dog",  # yes, label no -> FP
        "q4": "There is not a dog.",  # no, label no -> TN
    }
    return predictions, labels


def test_score_pope_six_items_by_hand() -> None:
    predictions, labels = _six_item_example()
    report = score_pope(predictions, labels)
    # TP=2 FP=2 TN=1 FN=1, n=6.
    # accuracy = 3/6 = 0.500; precision = 2/4 = 0.500; recall = 2/3 = 0.667;
    # F1 = 2 * 0.5 * (2/3) / (0.5 + 2/3) = (2/3) / (7/6) = 4/7 = 0.571; yes ratio = 4/6 = 0.667.
    assert report.breakdowns["accuracy"]["random"] == 50.0
    assert report.breakdowns["precision"]["random"] == 50.0
    assert report.breakdowns["recall"]["random"] == 66.7
    assert report.breakdowns["f1"]["random"] == 57.1
    assert report.breakdowns["yes_ratio"]["random"] == 66.7
    assert report.overall == 57.1  # mean F1 over the one split present
    assert report.counts == {"labels": 6, "scored": 6, "missing": 0, "extra": 0, "random": 6}
    assert report.benchmark == "POPE" and report.unit == "percent"


def test_score_pope_two_splits_missing_and_extra() -> None:
    predictions, labels = _six_item_example()
    labels["q7"] = POPELabel("yes", "adversarial")
    labels["q8"] = POPELabel("no", "adversarial")
    predictions["q7"] = "Yes"  # TP
    predictions["q99"] = "No"  # no label: extra, ignored; q8 has no prediction: missing
    report = score_pope(predictions, labels)
    # adversarial: TP=1 only -> every metric 1.000 (yes ratio 1/1).
    assert {metric: values["adversarial"] for metric, values in report.breakdowns.items()} == {
        "accuracy": 100.0,
        "precision": 100.0,
        "recall": 100.0,
        "f1": 100.0,
        "yes_ratio": 100.0,
    }
    # pooled: TP=3 FP=2 TN=1 FN=1, n=7. accuracy 4/7 = 0.571; precision 3/5 = 0.600; recall 3/4 = 0.750;
    # F1 = 2 * 0.6 * 0.75 / 1.35 = 0.9 / 1.35 = 0.667; yes ratio 5/7 = 0.714.
    assert {metric: values["all"] for metric, values in report.breakdowns.items()} == {
        "accuracy": 57.1,
        "precision": 60.0,
        "recall": 75.0,
        "f1": 66.7,
        "yes_ratio": 71.4,
    }
    # overall = mean of split F1s = (4/7 + 1) / 2 = 11/14 = 0.7857 -> 0.786
    assert report.overall == 78.6
    assert list(report.breakdowns["f1"]) == ["random", "adversarial", "all"]
    assert report.counts == {"labels": 8, "scored": 7, "missing": 1, "extra": 1, "random": 6, "adversarial": 1}


def test_score_pope_no_yes_predictions_gives_zero_not_an_error() -> None:
    labels = {"a": POPELabel("yes", "popular"), "b": POPELabel("no", "popular")}
    report = score_pope({"a": "No.", "b": "no"}, labels)
    # TP=0 FP=0 TN=1 FN=1: precision 0/0 (reference: ZeroDivisionError) -> 0; recall 0/1 = 0; F1 -> 0.
    assert report.breakdowns["accuracy"]["popular"] == 50.0
    assert report.breakdowns["precision"]["popular"] == 0.0
    assert report.breakdowns["f1"]["popular"] == 0.0
    assert report.breakdowns["yes_ratio"]["popular"] == 0.0


@pytest.mark.parametrize("bad", [POPELabel("No", "random"), POPELabel("yes", "coco")])
def test_score_pope_rejects_bad_labels(bad: POPELabel) -> None:
    with pytest.raises(ValueError):
        score_pope({"a": "yes"}, {"a": bad})
