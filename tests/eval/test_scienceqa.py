"""ScienceQA-IMG scorer: LLaVA-1.5's eval_science_qa.py letter rule and IMG accuracy, worked out by hand."""

from __future__ import annotations

import pytest

from mambavlm.eval.scorers.scienceqa import SQAProblem, score_scienceqa, sqa_letter


@pytest.mark.parametrize(
    ("text", "num_choices", "expected"),
    [
        ("B", 3, "B"),
        ("The answer is C.", 4, "C"),
        ("C. The answer is B.", 3, "C"),  # "X. " at the start is tried before the sentence
        ("A. Because plants need light", 2, "A"),
        ("C.", 3, None),  # shorter than 3 characters and no sentence
        ("B ", 3, None),  # the single-letter rule is an exact comparison
        ("b", 2, None),
        ("E", 3, None),  # a letter, but beyond the problem's 3 options
        ("The answer is D.", 3, None),
        ("The answer is A", 2, None),  # the regex's '.' needs one more character
        ("The answer is AB", 2, "A"),  # ... any character: here "B"
        ("The answer is B!", 3, "B"),
        ("The answer is A. The answer is B.", 2, None),  # two matches -> FAILED
        ("The answer is (A).", 2, None),
        ("I think it is the first one", 2, None),
    ],
)
def test_sqa_letter(text: str, num_choices: int, expected: str | None) -> None:
    assert sqa_letter(text, num_choices) == expected


def _problem(answer: int, subject: str, grade: str, context: str = "", has_image: bool = True) -> SQAProblem:
    return SQAProblem(
        answer=answer, num_choices=4, subject=subject, has_image=has_image, context=context, grade=grade
    )


def test_score_scienceqa_by_hand() -> None:
    problems = {
        "p1": _problem(1, "natural science", "grade2"),
        "p2": _problem(2, "social science", "grade8", context="A hint."),
        "p3": _problem(1, "language science", "grade5"),
        "p4": _problem(0, "natural science", "grade10", context="Another hint."),
        "p5": _problem(0, "social science", "grade1"),  # image, but no prediction
        "p6": _problem(0, "natural science", "grade3", has_image=False),  # not in the image subset
        "p7": _problem(0, "natural science", "grade3"),
    }
    predictions = {
        "p1": "B",  # right
        "p2": "The answer is C.",  # right
        "p3": "C. The answer is B.",  # reads C, truth B: wrong
        "p4": "I think it is the first one",  # unparsed: wrong
        "p6": "A",  # ignored: no image
        "p7": "A",  # right
    }
    report = score_scienceqa(predictions, problems)
    # Scored: p1 p2 p3 p4 p7 (p5 dropped as LLaVA drops it), right: p1 p2 p7 -> 3/5 = 60.00
    assert report.overall == 60.0
    # NAT: p1 right, p4 wrong, p7 right -> 2/3 = 66.67; SOC: p2 right -> 100; LAN: p3 wrong -> 0
    assert report.breakdowns["subject"] == {"NAT": 66.67, "SOC": 100.0, "LAN": 0.0}
    # TXT (has a hint): p2 right, p4 wrong -> 50; IMG: all five -> 60; NO: nobody on the image subset
    assert report.breakdowns["context"] == {"TXT": 50.0, "IMG": 60.0}
    # G1-6: p1 right, p3 wrong, p7 right -> 66.67; G7-12: p2 right, p4 wrong -> 50
    assert report.breakdowns["grade"] == {"G1-6": 66.67, "G7-12": 50.0}
    assert report.counts == {
        "problems": 7,
        "non_image": 1,
        "scored": 5,
        "correct": 3,
        "missing": 1,
        "unparsed": 1,
    }
    assert report.benchmark == "ScienceQA-IMG"


def test_score_scienceqa_rounds_to_two_decimals() -> None:
    problems = {f"p{i}": _problem(0, "natural science", "grade4") for i in range(3)}
    report = score_scienceqa({"p0": "A", "p1": "B", "p2": "C"}, problems)
    assert report.overall == 33.33  # 1/3 * 100 = 33.333... printed as 33.33


@pytest.mark.parametrize(
    "bad", [_problem(0, "science", "grade4"), _problem(0, "natural science", "grade13")]
)
def test_score_scienceqa_rejects_unknown_groups(bad: SQAProblem) -> None:
    with pytest.raises(ValueError):
        score_scienceqa({"p": "A"}, {"p": bad})
