"""MME scorer: calculation.py's answer rule, acc, acc+ and totals, worked out by hand."""

from __future__ import annotations

import pytest

from mambavlm.eval.scorers.mme import MMEQuestion, mme_answer, score_mme


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("no", "no"),
        ("YES!", "yes"),
        ("No, there is not.", "no"),
        ("Nope", "no"),  # "no" inside the first 4 characters
        ("Not sure", "no"),
        ("know", "no"),  # substring, not a word: "know" holds "no"
        ("snow", "no"),
        ("eyes", "yes"),  # "eyes" holds "yes"
        (" yes", "yes"),
        ("  yes", "other"),  # first 4 characters are "  ye"
        ("I don't know", "other"),  # "i do"
        ("The answer is yes", "other"),
        ("", "other"),
    ],
)
def test_mme_answer(text: str, expected: str) -> None:
    assert mme_answer(text) == expected


def test_score_mme_acc_plus_three_images_by_hand() -> None:
    questions = {
        "e1a": MMEQuestion("existence", "img1", "Yes"),
        "e1b": MMEQuestion("existence", "img1", "No"),
        "e2a": MMEQuestion("existence", "img2", "Yes"),
        "e2b": MMEQuestion("existence", "img2", "No"),
        "e3a": MMEQuestion("existence", "img3", "Yes"),
        "e3b": MMEQuestion("existence", "img3", "No"),
        "c1a": MMEQuestion("code_reasoning", "code1", "Yes"),
        "c1b": MMEQuestion("code_reasoning", "code1", "No"),
    }
    predictions = {
        "e1a": "Yes",  # right
        "e1b": "No, there is not.",  # right       -> img1 both right
        "e2a": "yes",  # right
        "e2b": "Yes",  # wrong             -> img2 one right
        "e3a": "There is a dog.",  # other: wrong
        "e3b": "not really",  # "no" in "not ": right -> img3 one right
        "c1a": "eyes",  # "yes" in "eyes": right
        # c1b has no prediction: wrong          -> code1 one right
    }
    report = score_mme(predictions, questions)
    # existence: 4 of 6 questions right, 1 of 3 images with both right.
    assert report.breakdowns["acc"]["existence"] == 4 / 6 * 100
    assert report.breakdowns["acc_plus"]["existence"] == 1 / 3 * 100
    # score = 66.67 + 33.33, summed in floating point exactly as the tool does (prints 99.99999999999999)
    assert report.breakdowns["score"]["existence"] == 4 / 6 * 100 + 1 / 3 * 100
    assert report.breakdowns["score"]["existence"] == pytest.approx(100.0)
    # code_reasoning: 1 of 2 right, no image with both -> 50 + 0
    assert report.breakdowns["score"]["code_reasoning"] == 50.0
    assert report.breakdowns["total"] == {"perception": 4 / 6 * 100 + 1 / 3 * 100, "cognition": 50.0}
    assert report.overall == report.breakdowns["total"]["perception"]
    assert report.unit == "points" and report.benchmark == "MME"
    assert report.counts == {"questions": 8, "images": 4, "categories": 2, "missing": 1, "other": 1}


def test_score_mme_perception_sums_categories() -> None:
    questions = {
        "a1": MMEQuestion("color", "i1", "yes"),
        "a2": MMEQuestion("color", "i1", "no"),
        "b1": MMEQuestion("OCR", "j1", "yes"),
        "b2": MMEQuestion("OCR", "j1", "no"),
    }
    report = score_mme({"a1": "Yes", "a2": "No", "b1": "No", "b2": "No"}, questions)
    # color: 2/2 right, 1/1 image -> 100 + 100 = 200; OCR: 1/2, 0/1 -> 50 + 0 = 50; perception 250
    assert report.breakdowns["score"] == {"color": 200.0, "OCR": 50.0}
    assert report.overall == 250.0
    assert report.breakdowns["total"]["cognition"] == 0.0


def test_score_mme_requires_question_pairs() -> None:
    with pytest.raises(ValueError, match="expected 2"):
        score_mme({"a": "yes"}, {"a": MMEQuestion("count", "i", "yes")})
    with pytest.raises(ValueError, match="unknown MME category"):
        score_mme({}, {"a": MMEQuestion("counting", "i", "yes")})
