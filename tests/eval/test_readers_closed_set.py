"""Readers and question builders for TallyQA and VSR: the official test files written by hand in ``tmp_path``,
read, checked against hand-written items, then scored; every expected score is worked out in the comments."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mambavlm.eval.scorers.closed_set import (
    TallyQAItem,
    build_tallyqa_questions,
    build_vsr_questions,
    read_tallyqa,
    read_vsr,
    score_tallyqa,
    score_tallyqa_likelihood,
    score_vsr,
)

# ------------------------------------------------------------------------------------------------
# TallyQA: test.json
# ------------------------------------------------------------------------------------------------

TALLYQA_TEST = [
    {
        "image": "VG_100K_2/2410408.jpg",
        "answer": 4,
        "data_source": "imported_genome",
        "question": "How many headlights does the black bus have?",
        "image_id": 92410408,
        "question_id": 30095774,
        "issimple": False,
    },
    {
        "image": "VG_100K/2345678.jpg",
        "answer": 2,
        "data_source": "amt",
        "question": "How many dogs are there?",
        "image_id": 2345678,
        "question_id": 30095775,
        "issimple": True,
    },
    {
        "image": "VG_100K/2345679.jpg",
        "answer": 0,
        "data_source": "imported_tdiuc",
        "question": "How many zebras are in the photo?",
        "image_id": 2345679,
        "question_id": 30095776,
        "issimple": True,
    },
]


def _write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_read_tallyqa_items_then_score_text_answers(tmp_path: Path) -> None:
    items = read_tallyqa(_write_json(tmp_path / "test.json", TALLYQA_TEST))
    assert items == {
        "30095774": TallyQAItem(4, "complex"),
        "30095775": TallyQAItem(2, "simple"),
        "30095776": TallyQAItem(0, "simple"),
    }
    # complex: "4" right (1/1); simple: "two" right, "1" wrong (1/2); pooled 2/3 -> 66.7
    report = score_tallyqa({"30095774": "4", "30095775": "two", "30095776": "1"}, items)
    assert report.overall == 66.7
    assert report.breakdowns["split"] == {"simple": 50.0, "complex": 100.0}


def test_read_tallyqa_then_score_letter_likelihoods(tmp_path: Path) -> None:
    items = read_tallyqa(_write_json(tmp_path / "test.json", TALLYQA_TEST))
    letters = "ABCDEFGHIJKLMNOP"

    def best(letter: str) -> dict[str, float]:
        return {option: (-0.1 if option == letter else -5.0) for option in letters}

    # E is count 4 (right), C count 2 (right), B count 1 (wrong: 0 zebras) -> 2/3
    report = score_tallyqa_likelihood({"30095774": best("E"), "30095775": best("C"), "30095776": best("B")}, items)
    assert report.overall == 66.7


def test_build_tallyqa_questions_multiple_choice_prompt(tmp_path: Path) -> None:
    out = build_tallyqa_questions(_write_json(tmp_path / "test.json", TALLYQA_TEST), tmp_path / "tallyqa.jsonl")
    assert out == tmp_path / "tallyqa.jsonl"
    options = "A. 0\nB. 1\nC. 2\nD. 3\nE. 4\nF. 5\nG. 6\nH. 7\nI. 8\nJ. 9\nK. 10\nL. 11\nM. 12\nN. 13\nO. 14\nP. 15"
    suffix = "Answer with the option's letter from the given choices directly."
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {
            "question_id": 30095774,
            "image": "VG_100K_2/2410408.jpg",
            "text": f"How many headlights does the black bus have?\n{options}\n{suffix}",
        },
        {
            "question_id": 30095775,
            "image": "VG_100K/2345678.jpg",
            "text": f"How many dogs are there?\n{options}\n{suffix}",
        },
        {
            "question_id": 30095776,
            "image": "VG_100K/2345679.jpg",
            "text": f"How many zebras are in the photo?\n{options}\n{suffix}",
        },
    ]


def test_tallyqa_errors_name_the_file_and_question(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "test.json"))):
        read_tallyqa(tmp_path / "test.json")
    no_split = {key: value for key, value in TALLYQA_TEST[1].items() if key != "issimple"}
    path = _write_json(tmp_path / "a.json", [TALLYQA_TEST[0], no_split])
    with pytest.raises(ValueError, match=re.escape(f"{path} question 30095775: missing field 'issimple'")):
        read_tallyqa(path)
    path = _write_json(tmp_path / "b.json", [TALLYQA_TEST[0] | {"answer": "4"}])
    with pytest.raises(ValueError, match=re.escape(f"{path} question 30095774: field 'answer' must be int")):
        read_tallyqa(path)
    path = _write_json(tmp_path / "c.json", [TALLYQA_TEST[0], TALLYQA_TEST[0]])
    with pytest.raises(ValueError, match=re.escape(f"{path} question 30095774: question_id repeated")):
        build_tallyqa_questions(path, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()
    path = _write_json(tmp_path / "d.json", [{"image": "VG_100K/1.jpg", "question": "How many?"}])
    with pytest.raises(ValueError, match=re.escape(f"{path} [0]: missing field 'question_id'")):
        read_tallyqa(path)


# ------------------------------------------------------------------------------------------------
# VSR: test.jsonl (zero-shot split)
# ------------------------------------------------------------------------------------------------


def _vsr_line(image: str, caption: str, label: int, relation: str) -> str:
    link = f"http://images.cocodataset.org/train2017/{image}"
    return json.dumps({"image": image, "image_link": link, "caption": caption, "label": label, "relation": relation})


VSR_LINES = [
    _vsr_line("000000085637.jpg", "The banana is at the edge of the dining table.", 1, "at the edge of"),
    _vsr_line("000000321121.jpg", "The cat is behind the laptop.", 0, "behind"),
    _vsr_line("000000085637.jpg", "The dining table is under the banana.", 1, "under"),
    "",  # a blank line is not an example: the next one is example 3
    _vsr_line("000000470121.jpg", "The umbrella is beneath the bed.", 0, "beneath"),
]


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_vsr_labels_by_position_then_score(tmp_path: Path) -> None:
    labels = read_vsr(_write_lines(tmp_path / "test.jsonl", VSR_LINES))
    assert labels == {"0": True, "1": False, "2": True, "3": False}
    # 0 "True" right, 1 "False." right, 2 "False" wrong, 3 "false" right -> 3/4; always-true 2/4
    report = score_vsr({"0": "True", "1": "False.", "2": "False", "3": "false"}, labels)
    assert report.overall == 75.0
    assert report.breakdowns["baseline"] == {"always_true": 50.0}


def test_build_vsr_questions_true_false_prompt(tmp_path: Path) -> None:
    out = build_vsr_questions(_write_lines(tmp_path / "test.jsonl", VSR_LINES), tmp_path / "vsr.jsonl")
    assert out == tmp_path / "vsr.jsonl"
    ask, respond = (
        'Based on the image, is this statement "True" or "False"? ',
        '\nRespond with "True" or "False" directly.',
    )
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {
            "question_id": 0,
            "image": "000000085637.jpg",
            "text": f"{ask}The banana is at the edge of the dining table.{respond}",
        },
        {"question_id": 1, "image": "000000321121.jpg", "text": f"{ask}The cat is behind the laptop.{respond}"},
        {"question_id": 2, "image": "000000085637.jpg", "text": f"{ask}The dining table is under the banana.{respond}"},
        {"question_id": 3, "image": "000000470121.jpg", "text": f"{ask}The umbrella is beneath the bed.{respond}"},
    ]


def test_vsr_errors_name_the_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "test.jsonl"))):
        read_vsr(tmp_path / "test.jsonl")
    path = _write_lines(tmp_path / "a.jsonl", [VSR_LINES[0], '{"image": "000000321121.jpg", "caption": '])
    with pytest.raises(ValueError, match=re.escape(f"{path} line 2: not JSON")):
        read_vsr(path)
    path = _write_lines(
        tmp_path / "b.jsonl", [VSR_LINES[0], _vsr_line("000000321121.jpg", "The cat is on it.", 2, "on")]
    )
    with pytest.raises(ValueError, match=re.escape(f"{path} line 2: label must be 0 or 1, got 2")):
        read_vsr(path)
    path = _write_lines(tmp_path / "c.jsonl", [json.dumps({"image": "000000321121.jpg", "label": 1})])
    with pytest.raises(ValueError, match=re.escape(f"{path} line 1: missing field 'caption'")):
        build_vsr_questions(path, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()
