"""VQA soft accuracy (VQAv2, TextVQA, VizWiz): every expected number below is worked out by hand.

The leave-one-out rule, for n human answers of which k equal the (normalised) prediction: leaving out
one of the k leaves k - 1 agreeing humans, leaving out one of the other n - k leaves k; each subset
scores min(1, agreeing / 3) and the question scores the mean of the n subsets.
"""

from __future__ import annotations

import pytest

from mambavlm.eval.scorers.vqa import VQA_BENCHMARKS, VQAAnnotation, evalai_process_answer, score_vqa, vqa_accuracy

EXACT = 1e-12


def ten(*groups: tuple[str, int]) -> list[str]:
    """Ten human answers from (answer, how many) groups."""
    answers = [answer for answer, count in groups for _ in range(count)]
    assert len(answers) == 10
    return answers


# ---------------------------------------------------------------- leave-one-out arithmetic


@pytest.mark.parametrize("benchmark", VQA_BENCHMARKS)
@pytest.mark.parametrize(
    ("agreeing", "expected"),
    [
        # 0 of 10: every subset has 0 agreeing -> 0.
        (0, 0.0),
        # 1 of 10: leave it out (1 subset) -> 0 agreeing -> 0; leave out another (9) -> 1 -> 1/3.
        #   (1 * 0 + 9 * 1/3) / 10 = 3 / 10 = 0.3
        (1, 0.3),
        # 2 of 10: leave one of them out (2 subsets) -> 1 agreeing -> 1/3; the other 8 subsets -> 2 -> 2/3.
        #   (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6 / 10 = 0.6
        (2, 0.6),
        # 3 of 10: (3 subsets) -> 2 agreeing -> 2/3; (7 subsets) -> 3 -> 1.
        #   (3 * 2/3 + 7 * 1) / 10 = (2 + 7) / 10 = 0.9
        (3, 0.9),
        # 4 of 10: (4 subsets) -> 3 -> 1; (6 subsets) -> 4 -> min(1, 4/3) = 1.  -> 1.0
        (4, 1.0),
        # 10 of 10: every subset has 9 -> min(1, 3) = 1.  -> 1.0
        (10, 1.0),
    ],
)
def test_leave_one_out_over_ten_answers(benchmark: str, agreeing: int, expected: float) -> None:
    answers = ten(("yes", agreeing), ("no", 10 - agreeing))
    assert vqa_accuracy("yes", answers, benchmark) == pytest.approx(expected, abs=EXACT)


def test_leave_one_out_with_fewer_than_ten_answers() -> None:
    # 3 humans, all "yes": every subset keeps 2 -> 2/3; mean 2/3. Unanimity does not reach 1.
    assert vqa_accuracy("yes", ["yes", "yes", "yes"]) == pytest.approx(2 / 3, abs=EXACT)
    # 5 humans, 3 say "yes": leave out a "yes" (3 subsets) -> 2 -> 2/3; leave out a "no" (2) -> 3 -> 1.
    #   (3 * 2/3 + 2 * 1) / 5 = 4 / 5 = 0.8
    assert vqa_accuracy("yes", ["yes", "no", "yes", "no", "yes"], "vizwiz") == pytest.approx(0.8, abs=EXACT)


def test_textvqa_requires_ten_answers() -> None:
    with pytest.raises(ValueError, match="10 human answers"):
        vqa_accuracy("yes", ["yes"] * 9, "textvqa")


def test_unknown_benchmark_and_no_answers() -> None:
    with pytest.raises(ValueError, match="unknown VQA benchmark"):
        vqa_accuracy("yes", ["yes"] * 10, "okvqa")
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("yes", [])


# ---------------------------------------------------------------- VQAv2: the prediction's normalisation
# Ten identical human answers are compared as they are, so these isolate what happens to the prediction.


@pytest.mark.parametrize(
    ("prediction", "human"),
    [
        ("Yes.", "yes"),  # the period before no digit goes, then lower case
        ("YES", "yes"),  # lower case
        ("  yes \n", "yes"),  # strip
        ("yes\tsir", "yes sir"),  # tab -> space
        ("two", "2"),  # number words -> digits
        ("Two", "2"),  # lower case first, then the number map
        ("none", "0"),  # "none" is in the number map too
        ("ten", "10"),
        ("eleven", "eleven"),  # the map stops at ten
        ("a dog", "dog"),  # articles go
        ("The dog", "dog"),
        ("an apple", "apple"),
        ("dont", "don't"),  # contractions get their apostrophe
        ("isnt", "isn't"),
        ("Im", "im"),  # the key is "Im": never matches a lower-cased word
        ("somebody'd", "somebodyd"),  # the table's one backwards entry
        ("1,000", "1000"),  # digit-comma-digit: every punctuation mark is deleted, none spaced
        ("3.5", "3.5"),  # a period before a digit stays
        ("3.5.", "3.5"),  # ... the final one does not
        ("red,blue", "red blue"),  # a mark touching no space becomes a space
        ("red, blue", "red blue"),  # a mark touching a space is deleted
        ("t-shirt", "t shirt"),
        ("what?!", "what"),  # both marks -> spaces, then split/join drops them
        ("don't", "don't"),  # the apostrophe is not in the punctuation list
        ("e.g.", "eg"),
        ("x" + "." * 40, "x" + "." * 8),  # only 32 periods go: re.UNICODE (32) is passed as re.sub's count
    ],
)
def test_vqav2_prediction_normalisation(prediction: str, human: str) -> None:
    assert vqa_accuracy(prediction, [human] * 10) == 1.0


# ---------------------------------------------------------------- VQAv2: the human answers' treatment


def test_vqav2_humans_never_get_digits_articles_or_lower_case() -> None:
    # The prediction "two" becomes "2"; ten humans' "two" stay "two" -> 0 of 10 agree -> 0.
    assert vqa_accuracy("two", ["two"] * 10) == 0.0
    # The prediction "a dog" becomes "dog"; the humans' "a dog" stays -> 0.
    assert vqa_accuracy("a dog", ["a dog"] * 10) == 0.0
    # Humans disagree, so their answers go through processPunctuation only: "Yes" keeps its capital,
    # the prediction "yes" matches none of the 8 "Yes" -> 0 of 10 -> 0.
    assert vqa_accuracy("yes", ten(("Yes", 8), ("no", 2))) == 0.0
    # And a capitalised prediction is lower-cased, so it does not match them either.
    assert vqa_accuracy("Yes", ten(("Yes", 8), ("no", 2))) == 0.0


def test_vqav2_humans_punctuation_only_when_they_disagree() -> None:
    # All ten say "yes.": left as they are; the prediction "yes." becomes "yes" -> 0 agree -> 0.
    assert vqa_accuracy("yes.", ["yes."] * 10) == 0.0
    # Nine "yes." and one "no": they disagree, so "yes." -> "yes"; 9 agree -> 1.0.
    assert vqa_accuracy("yes.", ten(("yes.", 9), ("no", 1))) == 1.0
    # Same with the hyphen: ten "t-shirt" stay; the prediction becomes "t shirt" -> 0.
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0
    # Nine "t-shirt" + one "shirt": "t-shirt" -> "t shirt"; 9 agree -> 1.0.
    assert vqa_accuracy("t-shirt", ten(("t-shirt", 9), ("shirt", 1))) == 1.0
    # Two "1,000" (digit-comma-digit: comma deleted -> "1000") + one "1000" + seven "100": the prediction
    # "1,000" -> "1000"; 3 agree -> (3 * 2/3 + 7 * 1) / 10 = 0.9.
    assert vqa_accuracy("1,000", ten(("1,000", 2), ("1000", 1), ("100", 7))) == pytest.approx(0.9, abs=EXACT)


def test_leave_one_out_is_by_position_not_by_value() -> None:
    # Two humans say "cat": left out one at a time (not both at once), so the arithmetic is the 2-of-10
    # case, 0.6; removing every equal answer would give (2 * 0 + 8 * 2/3) / 10 = 0.5333...
    assert vqa_accuracy("cat", ten(("cat", 2), ("dog", 8))) == pytest.approx(0.6, abs=EXACT)


# ---------------------------------------------------------------- TextVQA (LLaVA's m4c_evaluator)


def test_evalai_processor() -> None:
    # lower -> "the poster shows a 10% discount."; no listed mark; the final period goes;
    # "the" and "a" go; "%" is not in the list.
    assert evalai_process_answer("The poster shows a 10% discount.") == "poster shows 10% discount"
    # Commas are deleted outright before anything else (VQAv2 would give "red blue").
    assert evalai_process_answer("red,blue") == "redblue"
    assert evalai_process_answer("1,000") == "1000"
    # "'s" is split off.
    assert evalai_process_answer("Man's hat") == "man 's hat"
    # "?" is deleted, "-" touching no space becomes a space, number word -> digit.
    assert evalai_process_answer("Two t-shirts?") == "2 t shirts"


def test_textvqa_normalises_the_humans_too() -> None:
    # Both sides go through the processor: "two" -> "2" everywhere -> 10 agree -> 1.0 (VQAv2 gave 0).
    assert vqa_accuracy("two", ["two"] * 10, "textvqa") == 1.0
    assert vqa_accuracy("a dog", ["a dog"] * 10, "textvqa") == 1.0
    assert vqa_accuracy("dont", ["don't"] * 10, "textvqa") == 1.0
    # "Coca-Cola." vs humans "coca cola" x 4 (the rest "pepsi"): both -> "coca cola"; 4 agree -> 1.0.
    assert vqa_accuracy("Coca-Cola.", ten(("coca cola", 4), ("pepsi", 6)), "textvqa") == 1.0
    # The comma difference: prediction "red,blue" -> "redblue", humans "red blue" -> 0.
    assert vqa_accuracy("red,blue", ["red blue"] * 10, "textvqa") == 0.0
    # The humans' "x........" lose their 8 periods (fewer than 32) -> "x"; the prediction's 40 periods
    # leave 8 -> "x........" -> 0 agree -> 0.
    assert vqa_accuracy("x" + "." * 40, ["x" + "." * 8] * 10, "textvqa") == 0.0


# ---------------------------------------------------------------- VizWiz (the VizWiz-VQA API)


def test_vizwiz_contractions_use_the_typographic_apostrophe() -> None:
    # "dont" -> "don\u2019t", which is not the humans' ASCII "don't" -> 0; it is their "don\u2019t" -> 1.
    assert vqa_accuracy("dont", ["don't"] * 10, "vizwiz") == 0.0
    assert vqa_accuracy("dont", ["don\u2019t"] * 10, "vizwiz") == 1.0
    # "weve" is one of the three entries whose value kept its ASCII apostrophe.
    assert vqa_accuracy("weve", ["we've"] * 10, "vizwiz") == 1.0
    # The first five entries are ASCII throughout.
    assert vqa_accuracy("cant", ["can't"] * 10, "vizwiz") == 1.0


def test_vizwiz_never_normalises_the_humans() -> None:
    # "Unanswerable." -> "unanswerable": 10 agree -> 1.0.
    assert vqa_accuracy("Unanswerable.", ["unanswerable"] * 10, "vizwiz") == 1.0
    # Nine "t-shirt" + one "shirt" stay as they are; the prediction becomes "t shirt" -> 0 (VQAv2: 1.0).
    assert vqa_accuracy("t-shirt", ten(("t-shirt", 9), ("shirt", 1)), "vizwiz") == 0.0
    # The prediction is normalised as in VQAv2: "two" -> "2", 3 of 10 humans say "2" -> 0.9.
    assert vqa_accuracy("two", ten(("2", 3), ("3", 7)), "vizwiz") == pytest.approx(0.9, abs=EXACT)


# ---------------------------------------------------------------- score_vqa: breakdowns, rounding, counts


def vqav2_set() -> tuple[dict[str, str], dict[str, VQAAnnotation]]:
    annotations = {
        # "yes" vs 10 x "yes" -> 1.0
        "q1": VQAAnnotation(("yes",) * 10, "yes/no", "is the"),
        # "no" vs 2 x "no", 8 x "yes" -> 0.6
        "q2": VQAAnnotation(tuple(ten(("no", 2), ("yes", 8))), "yes/no", "is the"),
        # "two" -> "2" vs 3 x "2", 7 x "3" -> 0.9
        "q3": VQAAnnotation(tuple(ten(("2", 3), ("3", 7))), "number", "how many"),
        # "red" vs 1 x "red", 9 x "blue" -> 0.3
        "q4": VQAAnnotation(tuple(ten(("red", 1), ("blue", 9))), "other", "what color"),
        # no prediction -> 0
        "q5": VQAAnnotation(("white",) * 10, "other", "what color"),
        # "a dog" -> "dog" vs 10 x "dog" -> 1.0
        "q6": VQAAnnotation(("dog",) * 10, "other", "what is"),
    }
    predictions = {"q1": "yes", "q2": "no", "q3": "two", "q4": "red", "q6": "a dog"}
    return predictions, annotations


def test_score_vqav2_overall_and_breakdowns() -> None:
    predictions, annotations = vqav2_set()
    report = score_vqa(predictions, annotations)
    assert report.benchmark == "vqav2"
    assert report.unit == "percent"
    # overall: (1 + 0.6 + 0.9 + 0.3 + 0 + 1) / 6 = 3.8 / 6 = 0.63333... -> 63.33
    assert report.overall == 63.33
    assert report.breakdowns == {
        "answer_type": {
            "number": 90.0,  # 0.9 / 1
            "other": 43.33,  # (0.3 + 0 + 1) / 3 = 0.43333...
            "yes/no": 80.0,  # (1 + 0.6) / 2
        },
        "question_type": {
            "how many": 90.0,
            "is the": 80.0,
            "what color": 15.0,  # (0.3 + 0) / 2
            "what is": 100.0,
        },
    }
    assert report.counts == {"questions": 6, "missing": 1}


def test_score_vqa_rounds_as_python_round() -> None:
    # 1 right of 32: 100 * 1 / 32 = 3.125 exactly in binary; round(3.125, 2) ties to even -> 3.12.
    annotations = {f"q{i}": VQAAnnotation(("yes",) * 10, "yes/no") for i in range(32)}
    report = score_vqa({"q0": "yes"}, annotations)
    assert report.overall == 3.12
    assert report.breakdowns == {"answer_type": {"yes/no": 3.12}}
    assert report.counts == {"questions": 32, "missing": 31}
    # 1 right of 3: 33.333... -> 33.33; 2 of 3: 66.666... -> 66.67.
    three = {f"q{i}": VQAAnnotation(("yes",) * 10) for i in range(3)}
    assert score_vqa({"q0": "yes"}, three).overall == 33.33
    assert score_vqa({"q0": "yes", "q1": "yes"}, three).overall == 66.67


def test_score_textvqa_reports_overall_only() -> None:
    annotations = {
        # "Two" -> "2"; humans "two" x 2 -> "2", rest "3": the 2-of-10 case -> 0.6
        "a": VQAAnnotation(tuple(ten(("two", 2), ("3", 8))), "number", "how many"),
        # "STOP" -> "stop" vs 10 x "stop" -> 1.0
        "b": VQAAnnotation(("stop",) * 10, "other", "what does"),
    }
    report = score_vqa({"a": "Two", "b": "STOP"}, annotations, "textvqa")
    # 100 * ((0.6 + 1.0) / 2) = 80.0
    assert report.overall == 80.0
    assert report.breakdowns == {}
    assert report.counts == {"questions": 2, "missing": 0}


def test_score_vizwiz_breakdown_by_answer_type() -> None:
    annotations = {
        # "Unanswerable" -> "unanswerable" vs 10 x "unanswerable" -> 1.0
        "u": VQAAnnotation(("unanswerable",) * 10, "unanswerable"),
        # "soup." -> "soup" vs 1 x "soup", 9 x "unanswerable" -> 0.3
        "o": VQAAnnotation(tuple(ten(("soup", 1), ("unanswerable", 9))), "other"),
        # "No" -> "no" vs 10 x "no" -> 1.0
        "y": VQAAnnotation(("no",) * 10, "yes/no"),
    }
    report = score_vqa({"u": "Unanswerable", "o": "soup.", "y": "No"}, annotations, "vizwiz")
    # (1 + 0.3 + 1) / 3 = 0.76666... -> 76.67
    assert report.overall == 76.67
    assert report.breakdowns == {"answer_type": {"other": 30.0, "unanswerable": 100.0, "yes/no": 100.0}}


def test_score_vqa_errors() -> None:
    predictions, annotations = vqav2_set()
    with pytest.raises(ValueError, match="2 questions not in the annotations: q8, q7$"):  # in the predictions' order
        score_vqa({**predictions, "q8": "yes", "q7": "no"}, annotations)
    with pytest.raises(ValueError, match="no annotations"):
        score_vqa({}, {})
    with pytest.raises(ValueError, match="unknown VQA benchmark"):
        score_vqa(predictions, annotations, "gqa")
    # A type on some annotations only is an error, not a silently partial breakdown.
    mixed = {"a": VQAAnnotation(("yes",) * 10, "yes/no"), "b": VQAAnnotation(("no",) * 10)}
    with pytest.raises(ValueError, match="1 of 2 annotations have no answer_type"):
        score_vqa({"a": "yes", "b": "no"}, mixed)


def test_score_vqa_without_types_has_no_breakdowns() -> None:
    annotations = {"a": VQAAnnotation(("yes",) * 10), "b": VQAAnnotation(("no",) * 10)}
    report = score_vqa({"a": "yes", "b": "yes"}, annotations)
    # (1 + 0) / 2 -> 50.0
    assert report.overall == 50.0
    assert report.breakdowns == {}
