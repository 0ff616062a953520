"""GQA accuracy as LLaVA-1.5 reports it: every expected number below is worked out by hand."""

from __future__ import annotations

import pytest

from mambavlm.eval.scorers.gqa import GQAQuestion, llava_gqa_answer, score_gqa


@pytest.mark.parametrize(
    ("raw", "converted"),
    [
        ("Yes.", "yes"),  # trailing period off, then lower case
        ("Yes", "yes"),
        ("yes..", "yes"),  # rstrip('.') takes every trailing period
        ("yes. ", "yes. "),  # ... but only when the text ends in one: no whitespace strip
        (" yes", " yes"),
        ("U.S.", "u.s"),  # inner periods stay
        ("The table.", "the table"),  # no article removal
        ("Two", "two"),  # no number mapping either way
    ],
)
def test_llava_conversion(raw: str, converted: str) -> None:
    assert llava_gqa_answer(raw) == converted


def gqa_set() -> tuple[dict[str, str], dict[str, GQAQuestion]]:
    questions = {
        "1": GQAQuestion("yes", "verify", "attr"),  # "Yes." -> "yes": right
        "2": GQAQuestion("no", "logical", "obj"),  # "no": right
        "3": GQAQuestion("table", "query", "cat"),  # "The table." -> "the table": wrong
        "4": GQAQuestion("left", "choose", "rel"),  # "Left" -> "left": right
        "5": GQAQuestion("yes", "compare", "attr"),  # "yes. " keeps its period: wrong
        "6": GQAQuestion("red", "query", "attr"),  # no prediction: wrong
        "7": GQAQuestion("blue", "query", "global"),  # "Blue.." -> "blue": right
    }
    predictions = {"1": "Yes.", "2": "no", "3": "The table.", "4": "Left", "5": "yes. ", "7": "Blue.."}
    return predictions, questions


def test_score_gqa_overall_and_breakdowns() -> None:
    predictions, questions = gqa_set()
    report = score_gqa(predictions, questions)
    assert report.benchmark == "gqa"
    assert report.unit == "percent"
    # right: 1, 2, 4, 7 -> 4 / 7 = 0.571428... * 100 = 57.1428... -> 57.14
    assert report.overall == 57.14
    assert report.breakdowns == {
        # binary = not "query": 1, 2, 4, 5 -> 3 / 4 = 75.0; open = "query": 3, 6, 7 -> 1 / 3 -> 33.33
        "answer_type": {"binary": 75.0, "open": 33.33},
        "structural": {
            "choose": 100.0,  # 4
            "compare": 0.0,  # 5
            "logical": 100.0,  # 2
            "query": 33.33,  # 3, 6, 7 -> 1 / 3
            "verify": 100.0,  # 1
        },
        "semantic": {
            "attr": 33.33,  # 1, 5, 6 -> 1 / 3
            "cat": 0.0,  # 3
            "global": 100.0,  # 7
            "obj": 100.0,  # 2
            "rel": 100.0,  # 4
        },
    }
    assert report.counts == {"questions": 7, "missing": 1}


def test_score_gqa_empty_open_list_is_absent_and_no_semantic() -> None:
    # Only binary questions: no open question, so no "open" (the reference's avg([]) = 0 would read as 0 %).
    questions = {"a": GQAQuestion("yes", "verify"), "b": GQAQuestion("no", "verify")}
    report = score_gqa({"a": "yes", "b": "yes"}, questions)
    # 1 of 2 -> 50.0
    assert report.overall == 50.0
    assert report.breakdowns == {"answer_type": {"binary": 50.0}, "structural": {"verify": 50.0}}


def test_score_gqa_rounds_as_python_round() -> None:
    # 1 right of 32: 1 / 32 * 100 = 3.125 exactly in binary; {:.2f} / round tie to even -> 3.12.
    questions = {f"q{i}": GQAQuestion("yes", "verify", "attr") for i in range(32)}
    report = score_gqa({"q0": "yes"}, questions)
    assert report.overall == 3.12
    assert report.breakdowns["semantic"] == {"attr": 3.12}
    assert report.counts == {"questions": 32, "missing": 31}


def test_score_gqa_errors() -> None:
    predictions, questions = gqa_set()
    with pytest.raises(ValueError, match="1 questions not in the GQA questions: 99"):
        score_gqa({**predictions, "99": "yes"}, questions)
    with pytest.raises(ValueError, match="no GQA questions"):
        score_gqa({}, {})
    mixed = {"a": GQAQuestion("yes", "verify", "attr"), "b": GQAQuestion("no", "verify")}
    with pytest.raises(ValueError, match="1 of 2 questions have no semantic type"):
        score_gqa({"a": "yes"}, mixed)


def test_score_gqa_no_binary_question_has_no_binary_entry_in_report_or_table() -> None:
    # Only "query" questions, so all open: a: "Table." -> "table" right; b: "blue" != "red" wrong; c: missing
    # (0, counted). Open and overall: 1 of 3 -> 33.33; obj: a, c -> 1 of 2 -> 50.0; attr: b -> 0 of 1 -> 0.0.
    # No binary question: "binary" is absent, not 0.0 (which the reader would take for a score of 0).
    from mambavlm.eval.scorers.report import format_report

    questions = {
        "a": GQAQuestion("table", "query", "obj"),
        "b": GQAQuestion("red", "query", "attr"),
        "c": GQAQuestion("cup", "query", "obj"),
    }
    report = score_gqa({"a": "Table.", "b": "blue"}, questions)
    assert report.overall == 33.33
    assert report.breakdowns == {
        "answer_type": {"open": 33.33},
        "structural": {"query": 33.33},
        "semantic": {"attr": 0.0, "obj": 50.0},
    }
    assert report.counts == {"questions": 3, "missing": 1}
    assert format_report(report) == "\n".join([
        "| score | value |",
        "|---|---|",
        "| gqa overall | 33.33 % |",
        "| answer_type: open | 33.33 % |",
        "| structural: query | 33.33 % |",
        "| semantic: attr | 0.0 % |",
        "| semantic: obj | 50.0 % |",
        "| count: questions | 3 |",
        "| count: missing | 1 |",
    ])
