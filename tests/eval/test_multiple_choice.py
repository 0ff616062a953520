"""Hand-worked cases for the multiple-choice scorers (MMBench CircularEval, SEED-Bench, MMMU).

Every expected value is worked out in the comments from the reference rules, not computed by the code.
"""

from __future__ import annotations

import random

import pytest

from mambavlm.eval.scorers.multiple_choice import (
    MMBenchQuestion,
    MMMUQuestion,
    SEEDQuestion,
    mmbench_letter,
    mmmu_eval_open,
    mmmu_guess,
    mmmu_letter,
    mmmu_parse_open_response,
    score_mmbench,
    score_mmmu,
    score_seedbench,
)

# ------------------------------------------------------------------------------------------------
# MMBench: the rule-based letter matcher (VLMEvalKit can_infer)
# ------------------------------------------------------------------------------------------------

ANIMALS = {"A": "dog", "B": "cat", "C": "bird", "D": "fish"}  # total option length 3+3+4+4 = 14


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A", "A"),  # tokens [A]: one letter, index 0 > 1-5
        ("(B) cat", "B"),  # "(", ")" -> spaces: tokens [B, cat]; index 0 > 2-5
        ("The answer is C", "C"),  # tokens [The, answer, is, C]: index 3 > 4-5
        ("D.", "D"),  # "." -> space: tokens [D]
        ("cat", "B"),  # no letter token; text rule: 3 <= 2*14, only "cat" occurs in "cat"
        ("A cat", "A"),  # the article is a letter token: [A, cat], index 0 > -3
        ("I am not sure", None),  # "I" is no option; no option text occurs in "i am not sure"
        ("A or B", None),  # two letters -> text rule: "a or b" holds no option text
        ("Cannot determine the answer", "Z"),  # a refusal phrase
        ("Z", "Z"),  # no option letter, a "Z" token
    ],
)
def test_mmbench_letter_rules(text: str, expected: str | None) -> None:
    assert mmbench_letter(text, ANIMALS) == expected


def test_mmbench_letter_only_trusts_a_letter_near_the_end() -> None:
    # "C is correct because the cat sits on a mat": 10 tokens, C first at index 0; 0 > 10-5 fails.
    # Text rule: 42 characters > 2*14 = 28 -> gives up.
    assert mmbench_letter("C is correct because the cat sits on a mat", ANIMALS) is None
    # "A is right so the answer is A": 8 tokens, one distinct letter, first occurrence index 0,
    # 0 > 8-5 fails although the last token is A. Text rule: 29 characters > 28 -> gives up.
    assert mmbench_letter("A is right so the answer is A", ANIMALS) is None
    # 5 tokens [so, the, answer, is, B]: index 4 > 0 -> B.
    assert mmbench_letter("So the answer is B", ANIMALS) == "B"


def test_mmbench_letter_text_rule_edges() -> None:
    # "a dog or a cat": no letter token (lower-case "a"); 14 <= 28; "dog" and "cat" both occur -> None.
    assert mmbench_letter("a dog or a cat", ANIMALS) is None
    # "A fish!" -> tokens [A, fish]: A is a letter token at index 0 > -3 -> A (not D).
    assert mmbench_letter("A fish!", ANIMALS) == "A"
    # An API-failure answer skips the letter rule; the text rule then sees
    # "failed to obtain answer via api: fish", 37 characters > 2*14 = 28 -> None.
    assert mmbench_letter("Failed to obtain answer via API: fish", ANIMALS) is None
    # With longer options the text rule can still match it: 27 + 3 = 30 -> limit 60;
    # "failed to obtain answer via api cat" is 35 <= 60 and holds only "cat" -> B.
    long_options = {"A": "a very long dog description", "B": "cat"}
    assert mmbench_letter("Failed to obtain answer via API cat", long_options) == "B"


# ------------------------------------------------------------------------------------------------
# MMBench: CircularEval scoring
# ------------------------------------------------------------------------------------------------


def _circular(base: int, answer_text: str, category: str, l2: str) -> dict[str, MMBenchQuestion]:
    """The four circular passes of a dog/cat/bird/fish question, rotated left once per pass.

    pass 0 (id base):           A dog  B cat  C bird D fish
    pass 1 (id base+1000000):   A cat  B bird C fish D dog
    pass 2 (id base+2000000):   A bird B fish C dog  D cat
    pass 3 (id base+3000000):   A fish B dog  C cat  D bird
    """
    texts = ["dog", "cat", "bird", "fish"]
    passes = {}
    for shift in range(4):
        rotated = texts[shift:] + texts[:shift]
        options = dict(zip("ABCD", rotated))
        answer = "ABCD"[rotated.index(answer_text)]
        passes[str(base + shift * 1_000_000)] = MMBenchQuestion(base, answer, options, category, l2)
    return passes


def test_mmbench_circular_rotation_answers() -> None:
    # The correct answer "cat" sits at B, A, D, C in passes 0-3.
    passes = _circular(7, "cat", "c", "l")
    assert [passes[i].answer for i in ("7", "1000007", "2000007", "3000007")] == ["B", "A", "D", "C"]


def test_mmbench_circular_eval() -> None:
    loc, fine = "object_localization", "finegrained_perception (instance-level)"
    scene, coarse = "image_scene", "coarse_perception"
    questions = {
        **_circular(7, "cat", loc, fine),
        **_circular(8, "cat", loc, fine),
        **_circular(9, "cat", scene, coarse),
        **_circular(10, "cat", scene, coarse),
    }
    predictions = {
        # Q7: every pass right -> right. "B" (B); "(A) cat" (A); "The answer is D" (D); "cat" -> pass 3's
        # option C is "cat" -> C.
        "7": "B",
        "1000007": "(A) cat",
        "2000007": "The answer is D",
        "3000007": "cat",
        # Q8: passes 0-2 right, pass 3 says A (fish) but the answer is C -> the question is wrong.
        "8": "B",
        "1000008": "A",
        "2000008": "D",
        "3000008": "A",
        # Q9: three right, pass 2 unmatched ("I am not sure") -> wrong, and it rests on that answer.
        "9": "  B\n",  # stripped first, as LLaVA's model_vqa_mmbench writes it
        "1000009": "A",
        "2000009": "I am not sure",
        "3000009": "C",
        # Q10: pass 0 matched wrong (C), pass 1 unmatched -> wrong whatever a judge would say.
        "10": "C",
        "1000010": "I am not sure",
        "2000010": "D",
        "3000010": "C",
        "999": "A",  # not a question: ignored
    }
    report = score_mmbench(predictions, questions)
    # 1 right of 4 questions -> 25 %.
    assert report.benchmark == "MMBench"
    assert report.overall == 25.0
    # object_localization: Q7 right, Q8 wrong -> 50 %; image_scene: Q9, Q10 wrong -> 0 %.
    assert report.breakdowns == {
        "category": {"image_scene": 0.0, "object_localization": 50.0},
        "l2-category": {"coarse_perception": 0.0, "finegrained_perception (instance-level)": 50.0},
    }
    # 16 passes; unmatched: Q9 pass 2 and Q10 pass 1 = 2; only Q9 has no wrong or missing pass.
    assert report.counts == {
        "questions": 4,
        "passes": 16,
        "unmatched": 2,
        "unmatched_questions": 1,
        "missing": 0,
        "no_base_row": 0,
    }


def test_mmbench_missing_prediction_and_orphan_passes() -> None:
    questions = {**_circular(1, "dog", "cat1", "l2a"), **_circular(2, "dog", "cat1", "l2a")}
    # Question 2's own row "2" is absent: its three other passes are not scored (no_base_row = 3).
    del questions["2"]
    # Question 1: "dog" is at A, D, C, B in passes 0-3. Pass 3 has no prediction -> wrong.
    predictions = {"1": "A", "1000001": "D", "2000001": "C"}
    report = score_mmbench(predictions, questions)
    assert report.overall == 0.0
    assert report.counts == {
        "questions": 1,
        "passes": 4,
        "unmatched": 0,
        "unmatched_questions": 0,
        "missing": 1,
        "no_base_row": 3,
    }


def test_mmbench_unrounded_percent() -> None:
    # Three single-pass questions (no circular copies), two right: 200/3 %, left unrounded.
    opts = {"A": "yes", "B": "no"}
    questions = {str(i): MMBenchQuestion(i, "A", opts, "c", "l") for i in (1, 2, 3)}
    report = score_mmbench({"1": "A", "2": "A", "3": "B"}, questions)
    assert report.overall == pytest.approx(200 / 3)


def test_mmbench_rejects_non_integer_ids() -> None:
    with pytest.raises(ValueError, match="integer index"):
        score_mmbench({}, {"q1": MMBenchQuestion(1, "A", {"A": "x"}, "c", "l")})


# ------------------------------------------------------------------------------------------------
# SEED-Bench
# ------------------------------------------------------------------------------------------------


def test_seedbench_exact_letter_match() -> None:
    questions = {
        "1": SEEDQuestion("B", 1, "Scene Understanding"),
        "2": SEEDQuestion("B", 1, "Scene Understanding"),
        "3": SEEDQuestion("A", 2, "Instance Identity"),
        "4": SEEDQuestion("C", 2, "Instance Identity"),
        "5": SEEDQuestion("D", 2, "Instance Identity"),
        "6": SEEDQuestion("B", 9, "Text Understanding"),
        "v1": SEEDQuestion("A", 10, "Action Recognition", data_type="video"),
    }
    predictions = {
        "1": "B",  # right
        "2": "B. A red car",  # not exactly "B" -> wrong
        "3": " A\n",  # stripped as model_vqa_loader strips -> "A": right
        # "4" missing -> wrong
        "5": "D",  # right
        "6": "b",  # lower case -> wrong
        "v1": "A",  # video: not scored
    }
    report = score_seedbench(predictions, questions)
    # Scene Understanding 1/2 = 50.00; Instance Identity 2/3 = 66.666.. -> 66.67; Text Understanding
    # 0/1 = 0.00. Overall (instance level) 3/6 = 50.00.
    assert report.benchmark == "SEED-Bench-image"
    assert report.overall == 50.0
    assert report.breakdowns == {
        "question_type": {"Scene Understanding": 50.0, "Instance Identity": 66.67, "Text Understanding": 0.0}
    }
    # In dimension-id order (1, 2, 9), as LLaVA's script prints them.
    assert list(report.breakdowns["question_type"]) == [
        "Scene Understanding",
        "Instance Identity",
        "Text Understanding",
    ]
    assert report.counts == {"questions": 6, "missing": 1, "skipped_not_image": 1}


def test_seedbench_overall_is_instance_level() -> None:
    # Dimension 1: 1/1 right; dimension 2: 0/3. Mean of dimensions would be 50; instance level 1/4 = 25.
    questions = {
        "a": SEEDQuestion("A", 1, "Scene Understanding"),
        "b": SEEDQuestion("A", 2, "Instance Identity"),
        "c": SEEDQuestion("A", 2, "Instance Identity"),
        "d": SEEDQuestion("A", 2, "Instance Identity"),
    }
    report = score_seedbench({"a": "A", "b": "B", "c": "B", "d": "B"}, questions)
    assert report.overall == 25.0


# ------------------------------------------------------------------------------------------------
# MMMU: multiple-choice parsing
# ------------------------------------------------------------------------------------------------

FRUITS = ["red apple", "green pear", "yellow banana", "purple grape"]


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("(A)", "A"),  # " (A) " holds "(A)"
        ("A", "A"),  # " A " holds " A "
        ("The answer is (B)", "B"),  # bracket rule
        ("The answer is B.", "B"),  # "." stripped at the end: " The answer is B " holds " B "
        ("'C'", "C"),  # "'" stripped at both ends
        ("A cat sits here", "A"),  # the article is " A "
        ("A (B)", "B"),  # a bracketed letter wins over a spaced one: only the bracket rule runs
        ("The answer is (C), not (A)", "A"),  # both bracketed: "(A)" occurs last -> A
        ("B or D", "D"),  # both spaced: " D " occurs last -> D
        # 9 tokens > 5, no letter: option text "green pear" occurs -> B
        ("I believe the fruit shown is a green pear", "B"),
        # both "red apple" (at 25) and "green pear" (at 5) occur: the later one -> A
        ("Not green pear; I think red apple is right", "A"),
    ],
)
def test_mmmu_letter_rules(response: str, expected: str) -> None:
    assert mmmu_letter(response, FRUITS) == expected


@pytest.mark.parametrize(
    "response",
    [
        "green pear",  # 2 tokens: content matching needs more than 5
        "b",  # lower-case letters never count
        "B\n",  # " B\n " does not hold " B " (whitespace is not normalised)
        "I really have no idea at all",  # 7 tokens, no option text
        ".,A",  # "," stripped first (none at the ends), then "." -> ",A": neither "(A)" nor " A "
    ],
)
def test_mmmu_letter_gives_up(response: str) -> None:
    assert mmmu_letter(response, FRUITS) is None


def test_mmmu_letter_ties_go_to_the_earlier_letter() -> None:
    # Options "cat" and "cat" (identical texts) both occur, last at the same position -> the first, A.
    assert mmmu_letter("I am sure it is the cat here", ["cat", "cat", "dog"]) == "A"


def test_mmmu_guess_is_seeded_by_question_id() -> None:
    # Equal to what a stdlib Random seeded with the id draws from [A, B, C, D], and stable.
    expected = random.Random("validation_Art_7").choice(["A", "B", "C", "D"])
    assert mmmu_guess("validation_Art_7", 4) == expected == mmmu_guess("validation_Art_7", 4)
    with pytest.raises(ValueError, match="no options"):
        mmmu_guess("validation_Art_8", 0)


# ------------------------------------------------------------------------------------------------
# MMMU: open questions
# ------------------------------------------------------------------------------------------------


def test_mmmu_parse_open_response_cases() -> None:
    # "the answer is 42" (final "." stripped): after "is " -> "42", after "answer " -> "is 42";
    # shortest "42". Numbers in "42": ["42"]. Both normalise to 42.0 -> [42.0].
    assert mmmu_parse_open_response("The answer is 42.") == [42.0]
    # "so the total is 1,234 dollars": after "so " -> "the total is 1,234 dollars", after "is " ->
    # "1,234 dollars" (shorter). Numbers: comma-grouped "1,234"; plain: "1" is followed by "," (no),
    # "234" -> ["1,234", "234"]. Normalised: "1,234 dollars", 1234.0, 234.0.
    assert mmmu_parse_open_response("So the total is 1,234 dollars") == ["1,234 dollars", 1234.0, 234.0]
    # Two lines: "first line is 7" -> "7"; "the result is 9" -> "9" (after "result " -> "is 9", longer).
    assert mmmu_parse_open_response("First line is 7\nThe result is 9") == [7.0, 9.0]
    # "=" counts on the last line only: "x = 3" -> "3".
    assert mmmu_parse_open_response("x = 3") == [3.0]
    # No indicator: the whole lower-cased response; one character -> [" b", "b "].
    assert mmmu_parse_open_response("B") == [" b", "b "]
    # The sentence split never fires (it looks for a capital after lower-casing): one unit,
    # "the speed is 5. then it is 8" -> after "is " -> "8" only.
    assert mmmu_parse_open_response("The speed is 5. Then it is 8") == [8.0]
    # Scientific notation: after "is " -> "2.5e3"; numbers: scientific "2.5e3"; plain: "2.5" is
    # refused (followed by "e3") but "2" alone passes ("\d+\b" then "." is neither e, comma nor
    # digit), ".5" is refused, "5" has no word boundary before "e", "3" passes -> ["2.5e3", "2", "3"].
    # Normalised and deduplicated: 2500.0, 2.0, 3.0.
    assert mmmu_parse_open_response("It is 2.5e3") == [2500.0, 2.0, 3.0]


def test_mmmu_eval_open_cases() -> None:
    assert mmmu_eval_open("42", [42.0]) is True
    assert mmmu_eval_open("1234", ["1,234 dollars", 1234.0, 234.0]) is True
    assert mmmu_eval_open("5", [8.0]) is False
    # String gold found inside a parsed string.
    assert mmmu_eval_open("Paris", ["paris, france"]) is True
    # A one-letter gold "B" -> " b" / "b ": found in " b" but not in "b" (never produced) or "bob".
    assert mmmu_eval_open("B", [" b", "b "]) is True
    assert mmmu_eval_open("B", ["bob"]) is False
    # Any of several golds; numbers rounded to 2 places: 3.14159 -> 3.14.
    assert mmmu_eval_open(["pi", "3.14159"], [3.14]) is True
    # A number never equals a string gold.
    assert mmmu_eval_open("three", [3.0]) is False


# ------------------------------------------------------------------------------------------------
# MMMU: scoring
# ------------------------------------------------------------------------------------------------


def test_score_mmmu() -> None:
    questions = {
        "validation_Art_1": MMMUQuestion("multiple-choice", "A", "Art", FRUITS),
        "validation_Art_2": MMMUQuestion("multiple-choice", "C", "Art", FRUITS),
        "validation_Math_1": MMMUQuestion("multiple-choice", "B", "Math", FRUITS),
        "validation_Math_2": MMMUQuestion("open", "42", "Math"),
        "validation_Math_3": MMMUQuestion("open", "5", "Math"),
    }
    predictions = {
        "validation_Art_1": "(A)",  # A: right
        "validation_Art_2": "The answer is (B)",  # B, gold C: wrong
        "validation_Math_1": "B",  # right
        "validation_Math_2": "The answer is 42.",  # [42.0]: right
        "validation_Math_3": "The speed is 5. Then it is 8",  # [8.0], gold 5: wrong
    }
    report = score_mmmu(predictions, questions)
    # Art 1/2 = 0.5 -> 50.0; Math 2/3 = 0.6667 -> round 0.667 -> 66.7.
    # Overall: (0.5*2 + (2/3)*3) / 5 = 3/5 = 0.6 -> 60.0.
    assert report.benchmark == "MMMU"
    assert report.overall == 60.0
    assert report.breakdowns == {"subject": {"Art": 50.0, "Math": 66.7}}
    assert report.counts == {"questions": 5, "multiple_choice": 3, "open": 2, "random_guess": 0, "missing": 0}


def test_score_mmmu_guess_missing_and_answer_lists() -> None:
    qid = "validation_Bio_1"
    guess = random.Random(qid).choice(["A", "B"])  # what the seeded guess draws from two options
    questions = {
        qid: MMMUQuestion("multiple-choice", guess, "Bio", ["x", "y"]),  # "no idea" -> guess, == gold
        "validation_Bio_2": MMMUQuestion("multiple-choice", ["A", "B"], "Bio", ["x", "y"]),  # B in list
        "validation_Bio_3": MMMUQuestion("multiple-choice", "A", "Bio", ["x", "y"]),  # missing: wrong
    }
    report = score_mmmu({qid: "no idea", "validation_Bio_2": "B"}, questions)
    # 2 of 3 right: 0.6667 -> 0.667 -> 66.7.
    assert report.overall == 66.7
    assert report.breakdowns == {"subject": {"Bio": 66.7}}
    assert report.counts == {"questions": 3, "multiple_choice": 3, "open": 0, "random_guess": 1, "missing": 1}
