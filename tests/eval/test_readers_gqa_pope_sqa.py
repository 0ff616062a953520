"""Readers of the official GQA, POPE and ScienceQA files: hand-written files in the published layout, read,
then scored end to end with numbers worked out by hand."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from mambavlm.eval.scorers.gqa import GQA_PROMPT, GQAQuestion, read_gqa_questions, score_gqa
from mambavlm.eval.scorers.pope import (
    POPE_PROMPT,
    POPE_QUESTION_ID_OFFSETS,
    POPELabel,
    read_pope_labels,
    score_pope,
)
from mambavlm.eval.scorers.scienceqa import SCIENCEQA_PROMPT, SQAProblem, read_scienceqa_problems, score_scienceqa


def write_json(path: Path, content: Any) -> Path:
    path.write_text(json.dumps(content))
    return path


# ---------------------------------------------------------------- GQA


def gqa_question(question: str, answer: str, structural: str, semantic: str, balanced: bool = True) -> dict[str, Any]:
    """One testdev_balanced_questions.json record (fields as published; the reader uses four of them)."""
    return {
        "semantic": [{"operation": "select", "dependencies": [], "argument": "scene"}],
        "entailed": [],
        "equivalent": [],
        "question": question,
        "imageId": "n161313",
        "isBalanced": balanced,
        "groups": {"global": None, "local": "06-weather_overcast"},
        "answer": answer,
        "semanticStr": "select: scene->verify weather: overcast",
        "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
        "types": {"detailed": "weatherVerifyC", "semantic": semantic, "structural": structural},
        "fullAnswer": f"{answer.capitalize()}.",
    }


def gqa_file(tmp_path: Path) -> Path:
    records = {
        "201307251": gqa_question("Is it overcast?", "no", "verify", "global"),
        "201640614": gqa_question("Who is wearing the dress?", "woman", "query", "rel"),
        "202225914": gqa_question(
            "Does the utensil on top of the table look clean and black?", "no", "logical", "attr"
        ),
        "201640615": gqa_question("Is the woman wearing a dress?", "yes", "verify", "rel", balanced=False),
    }
    return write_json(tmp_path / "testdev_balanced_questions.json", records)


def test_read_gqa_and_score(tmp_path: Path) -> None:
    questions = read_gqa_questions(gqa_file(tmp_path))
    # The unbalanced 201640615 is dropped, as GQA's eval.py scores only isBalanced questions.
    assert questions == {
        "201307251": GQAQuestion("no", "verify", "global"),
        "201640614": GQAQuestion("woman", "query", "rel"),
        "202225914": GQAQuestion("no", "logical", "attr"),
    }
    # Prompts as LLaVA wrote them in llava_gqa_testdev_balanced.jsonl; answers as a run writes them.
    assert f"Is it overcast?\n{GQA_PROMPT}" == "Is it overcast?\nAnswer the question using a single word or phrase."
    predictions = {"201307251": "No.", "201640614": "The woman", "202225914": "Yes"}
    report = score_gqa(predictions, questions)
    # "No." -> "no": right; "The woman" -> "the woman" != "woman": wrong; "Yes" -> "yes" != "no": wrong.
    # 1 of 3 -> 33.33; binary (verify, logical): 1 of 2 -> 50.0; open (query): 0 of 1 -> 0.0.
    assert report.overall == 33.33
    assert report.breakdowns == {
        "answer_type": {"binary": 50.0, "open": 0.0},
        "structural": {"logical": 0.0, "query": 0.0, "verify": 100.0},
        "semantic": {"attr": 0.0, "global": 100.0, "rel": 0.0},
    }
    assert report.counts == {"questions": 3, "missing": 0}


def test_read_gqa_errors(tmp_path: Path) -> None:
    missing = tmp_path / "testdev_balanced_questions.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        read_gqa_questions(missing)
    records = json.loads(gqa_file(tmp_path).read_text())
    del records["201640614"]["types"]["semantic"]
    broken = write_json(tmp_path / "no_semantic.json", records)
    with pytest.raises(ValueError, match=r"no_semantic\.json: question 201640614, types: missing field 'semantic'"):
        read_gqa_questions(broken)
    records = json.loads(gqa_file(tmp_path).read_text())
    del records["202225914"]["answer"]
    broken = write_json(tmp_path / "no_answer.json", records)
    with pytest.raises(ValueError, match=r"no_answer\.json: question 202225914: missing field 'answer'"):
        read_gqa_questions(broken)
    records = json.loads(gqa_file(tmp_path).read_text())
    records["201307251"]["isBalanced"] = "true"
    broken = write_json(tmp_path / "string_flag.json", records)
    with pytest.raises(ValueError, match=r"question 201307251: field 'isBalanced' must be bool, got str"):
        read_gqa_questions(broken)
    with pytest.raises(ValueError, match=r"expected a JSON object of question id -> question, got list"):
        read_gqa_questions(write_json(tmp_path / "list.json", [records["201307251"]]))


# ---------------------------------------------------------------- POPE


def write_pope(path: Path, rows: list[tuple[int, str, str, str]]) -> Path:
    """A coco_pope_<split>.json label file: one JSON object a line, as POPE publishes it."""
    lines = [
        json.dumps({"question_id": qid, "image": image, "text": f"Is there a {thing} in the image?", "label": label})
        for qid, image, thing, label in rows
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def pope_dir(tmp_path: Path) -> Path:
    coco = tmp_path / "coco"
    coco.mkdir()
    write_pope(
        coco / "coco_pope_adversarial.json",
        [
            (1, "COCO_val2014_000000310196.jpg", "snowboard", "yes"),
            (2, "COCO_val2014_000000310196.jpg", "backpack", "no"),
            (3, "COCO_val2014_000000310196.jpg", "person", "yes"),
        ],
    )
    write_pope(
        coco / "coco_pope_random.json",
        [
            (1, "COCO_val2014_000000310196.jpg", "snowboard", "yes"),
            (2, "COCO_val2014_000000310196.jpg", "car", "no"),
        ],
    )
    return coco


def test_read_pope_directory_and_score(tmp_path: Path) -> None:
    labels = read_pope_labels(pope_dir(tmp_path))
    # Both files number their questions from 1; the random ones get LLaVA's offset 10000000, so the keys are
    # the question_ids of llava_pope_test.jsonl (adversarial 1..3000, random 10000001...).
    assert labels == {
        "1": POPELabel("yes", "adversarial"),
        "2": POPELabel("no", "adversarial"),
        "3": POPELabel("yes", "adversarial"),
        "10000001": POPELabel("yes", "random"),
        "10000002": POPELabel("no", "random"),
    }
    assert POPE_QUESTION_ID_OFFSETS == {"adversarial": 0, "random": 10_000_000, "popular": 20_000_000}
    assert f"Is there a snowboard in the image?\n{POPE_PROMPT}" == (
        "Is there a snowboard in the image?\nAnswer the question using a single word or phrase."
    )
    predictions = {
        "1": "Yes, there is a snowboard.",  # yes on yes: TP
        "2": "No",  # no on no: TN
        "3": "There is no person.",  # no on yes: FN
        "10000001": "Yes",  # TP
        "10000002": "Yes",  # yes on no: FP
    }
    report = score_pope(predictions, labels)
    # adversarial: TP 1, TN 1, FN 1 -> precision 1/1, recall 1/2, F1 2 * 1 * 0.5 / 1.5 = 2/3
    # random: TP 1, FP 1 -> precision 1/2, recall 1/1, F1 2 * 0.5 * 1 / 1.5 = 2/3
    # overall: mean F1 2/3 -> '%.3f' 0.667 -> 66.7
    assert report.overall == 66.7
    assert report.breakdowns["f1"] == {"random": 66.7, "adversarial": 66.7, "all": 66.7}
    assert report.breakdowns["accuracy"] == {"random": 50.0, "adversarial": 66.7, "all": 60.0}  # 1/2, 2/3, 3/5
    assert report.counts["random"] == 2 and report.counts["adversarial"] == 3


def test_read_pope_single_file(tmp_path: Path) -> None:
    popular = write_pope(
        tmp_path / "coco_pope_popular.json",
        [
            (11, "COCO_val2014_000000210789.jpg", "umbrella", "yes"),
            (12, "COCO_val2014_000000210789.jpg", "chair", "no"),
        ],
    )
    # llava_pope_test.jsonl has this question as
    # {"question_id": 20000011, ..., "text": "Is there an umbrella in the imange?...", "category": "popular"}
    assert read_pope_labels(popular) == {
        "20000011": POPELabel("yes", "popular"),
        "20000012": POPELabel("no", "popular"),
    }


def test_read_pope_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "coco"))):
        read_pope_labels(tmp_path / "coco")
    (tmp_path / "coco").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no coco_pope_\*\.json POPE label file in .*coco"):
        read_pope_labels(tmp_path / "coco")

    badly_named = write_pope(tmp_path / "pope_random.json", [(1, "COCO_val2014_000000310196.jpg", "car", "no")])
    with pytest.raises(ValueError, match=r"pope_random\.json: a POPE label file is named coco_pope_<split>\.json"):
        read_pope_labels(badly_named)
    unknown_split = write_pope(tmp_path / "coco_pope_easy.json", [(1, "COCO_val2014_000000310196.jpg", "car", "no")])
    with pytest.raises(ValueError, match=r"coco_pope_easy\.json: a POPE label file"):
        read_pope_labels(unknown_split)

    label_file = tmp_path / "coco_pope_random.json"
    write_pope(label_file, [(1, "COCO_val2014_000000310196.jpg", "car", "maybe")])
    with pytest.raises(
        ValueError, match=r"coco_pope_random\.json: line 1 \(question_id 1\): label must be 'yes' or 'no'"
    ):
        read_pope_labels(label_file)
    label_file.write_text(
        '{"question_id": 1, "label": "yes"}\n{"image": "COCO_val2014_000000310196.jpg", "label": "no"}\n'
    )
    with pytest.raises(ValueError, match=r"coco_pope_random\.json: line 2: missing field 'question_id'"):
        read_pope_labels(label_file)
    label_file.write_text('{"question_id": 1, "label": "yes"}\n{"question_id": 1, "label": "no"}\n')
    with pytest.raises(ValueError, match=r"line 2 \(question_id 1\): question_id repeated"):
        read_pope_labels(label_file)
    label_file.write_text('{"question_id": 10000001, "label": "yes"}\n')
    with pytest.raises(ValueError, match=r"line 1 \(question_id 10000001\): question_id must lie in 1\.\.9999999"):
        read_pope_labels(label_file)
    label_file.write_text('{"question_id": "1", "label": "yes"}\n')
    with pytest.raises(ValueError, match=r"line 1: field 'question_id' must be int, got str"):
        read_pope_labels(label_file)
    label_file.write_text('{"question_id": 1, "label": "yes"\n')
    with pytest.raises(ValueError, match=r"coco_pope_random\.json: line 1: not JSON"):
        read_pope_labels(label_file)


# ---------------------------------------------------------------- ScienceQA


def sqa_problem(
    question: str, choices: list[str], answer: int, subject: str, grade: str, hint: str = "", image: str | None = None
) -> dict[str, Any]:
    """One problems.json record (fields as published)."""
    return {
        "question": question,
        "choices": choices,
        "answer": answer,
        "hint": hint,
        "image": image,
        "task": "closed choice",
        "grade": grade,
        "subject": subject,
        "topic": "topic",
        "category": "category",
        "skill": "skill",
        "lecture": "",
        "solution": "",
        "split": "test",
    }


def sqa_files(tmp_path: Path) -> tuple[Path, Path]:
    problems = {
        "1": sqa_problem(
            "Which tense does the sentence use?", ["past", "present", "future"], 2, "language science", "grade2"
        ),
        "4": sqa_problem(
            "Which figure of speech is used in this text?", ["chiasmus", "apostrophe"], 1, "language science", "grade10"
        ),
        "5": sqa_problem(
            "Which of the following could Gordon's test show?",
            ["if the spacecraft was damaged", "how steady a parachute with a 1 m vent was", "whether it would swing"],
            1,
            "natural science",
            "grade8",
            hint="People can use the engineering-design process to develop solutions to problems.",
            image="image.png",
        ),
        "11": sqa_problem(
            "What is the name of the colony shown?",
            ["Maryland", "New Hampshire", "Rhode Island", "Vermont"],
            1,
            "social science",
            "grade5",
            image="image.png",
        ),
        "15": sqa_problem(
            "Would you find the word dozen on a dictionary page with the following guide words?\ndaddy - definition",
            ["no", "yes"],
            0,
            "language science",
            "grade3",
        ),
    }
    splits = {"train": ["1"], "val": [], "test": ["4", "5", "11", "15"], "minitest": ["4"]}
    return write_json(tmp_path / "problems.json", problems), write_json(tmp_path / "pid_splits.json", splits)


def test_read_scienceqa_and_score(tmp_path: Path) -> None:
    problems_path, splits_path = sqa_files(tmp_path)
    problems = read_scienceqa_problems(problems_path, splits_path)
    hint = "People can use the engineering-design process to develop solutions to problems."
    assert problems == {
        "4": SQAProblem(
            answer=1, num_choices=2, subject="language science", has_image=False, context="", grade="grade10"
        ),
        "5": SQAProblem(
            answer=1, num_choices=3, subject="natural science", has_image=True, context=hint, grade="grade8"
        ),
        "11": SQAProblem(answer=1, num_choices=4, subject="social science", has_image=True, context="", grade="grade5"),
        "15": SQAProblem(
            answer=0, num_choices=2, subject="language science", has_image=False, context="", grade="grade3"
        ),
    }
    assert list(problems) == ["4", "5", "11", "15"]  # pid_splits.json's order
    assert list(read_scienceqa_problems(problems_path, splits_path, "train")) == ["1"]

    # The prompt suffix LLaVA-1.5's answers file shows at the end of every prompt.
    assert SCIENCEQA_PROMPT == "Answer with the option's letter from the given choices directly."
    report = score_scienceqa({"4": "B", "5": "B", "11": "A", "15": "A"}, problems)
    # Only image problems count: "5" answers B = index 1, right; "11" answers A = index 0, wrong -> 1 of 2 = 50.0.
    assert report.overall == 50.0
    assert report.breakdowns == {
        "subject": {"NAT": 100.0, "SOC": 0.0},  # 5 / 11
        "context": {"TXT": 100.0, "IMG": 50.0},  # 5 has a hint; both have an image
        "grade": {"G1-6": 0.0, "G7-12": 100.0},  # 11 (grade5) / 5 (grade8)
    }
    assert report.counts == {"problems": 4, "non_image": 2, "scored": 2, "correct": 1, "missing": 0, "unparsed": 0}


def test_read_scienceqa_errors(tmp_path: Path) -> None:
    problems_path, splits_path = sqa_files(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent.json"))):
        read_scienceqa_problems(tmp_path / "absent.json", splits_path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent.json"))):
        read_scienceqa_problems(problems_path, tmp_path / "absent.json")
    with pytest.raises(ValueError, match=r"pid_splits\.json: no split 'dev'; it has minitest, test, train, val"):
        read_scienceqa_problems(problems_path, splits_path, "dev")

    problems = json.loads(problems_path.read_text())
    del problems["11"]["choices"]
    broken = write_json(tmp_path / "no_choices.json", problems)
    with pytest.raises(ValueError, match=r"no_choices\.json: problem 11: missing field 'choices'"):
        read_scienceqa_problems(broken, splits_path)
    read_scienceqa_problems(broken, splits_path, "minitest")  # problem 11 is not in that split

    problems = json.loads(problems_path.read_text())
    problems["5"]["answer"] = 3
    broken = write_json(tmp_path / "out_of_range.json", problems)
    with pytest.raises(ValueError, match=r"problem 5: answer 3 is not the index of one of its 3 choices"):
        read_scienceqa_problems(broken, splits_path)

    problems = json.loads(problems_path.read_text())
    del problems["4"]["image"]
    broken = write_json(tmp_path / "no_image_field.json", problems)
    with pytest.raises(ValueError, match=r"problem 4: missing field 'image'"):
        read_scienceqa_problems(broken, splits_path)

    problems = json.loads(problems_path.read_text())
    problems["15"]["hint"] = None
    broken = write_json(tmp_path / "null_hint.json", problems)
    with pytest.raises(ValueError, match=r"problem 15: field 'hint' must be str, got NoneType"):
        read_scienceqa_problems(broken, splits_path)

    problems = json.loads(problems_path.read_text())
    del problems["15"]
    broken = write_json(tmp_path / "fewer.json", problems)
    with pytest.raises(ValueError, match=r"pid_splits\.json: pid 15 of split 'test' is not in .*fewer\.json"):
        read_scienceqa_problems(broken, splits_path)

    splits = write_json(tmp_path / "repeated_splits.json", {"test": ["4", "5", "4"]})
    with pytest.raises(ValueError, match=r"repeated_splits\.json: pid 4 repeated in split 'test'"):
        read_scienceqa_problems(problems_path, splits)
