"""Readers of the official VQAv2, TextVQA and VizWiz annotation files: hand-written files in the published
layout, read, then scored end to end with numbers worked out by hand.

Leave-one-out over 10 human answers of which k equal the prediction (see test_vqa.py): k = 0 -> 0,
k = 1 -> 0.3, k = 2 -> 0.6, k = 3 -> 0.9, k >= 4 -> 1.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from mambavlm.eval.scorers.vqa import (
    TEXTVQA_PROMPT,
    VIZWIZ_PROMPT,
    VQAV2_PROMPT,
    VQAAnnotation,
    llava_textvqa_question,
    read_textvqa_llava_index,
    read_vqa_annotations,
    score_vqa,
)


def write_json(path: Path, content: Any) -> Path:
    path.write_text(json.dumps(content))
    return path


def vqav2_answers(*groups: tuple[str, int]) -> list[dict[str, Any]]:
    """Ten VQAv2 answer records from (answer, how many) groups, numbered as the official file numbers them."""
    answers = [answer for answer, count in groups for _ in range(count)]
    assert len(answers) == 10
    return [
        {"answer": answer, "answer_confidence": "yes", "answer_id": number}
        for number, answer in enumerate(answers, start=1)
    ]


def vqav2_files(tmp_path: Path) -> tuple[Path, Path]:
    """v2_mscoco_val2014_annotations.json and v2_OpenEnded_mscoco_val2014_questions.json, three questions."""
    annotations = {
        "info": {"description": "This is v2.0 of the VQA dataset.", "version": "2.0"},
        "license": {"name": "Creative Commons Attribution 4.0 International License"},
        "data_subtype": "val2014",
        "data_type": "mscoco",
        "annotations": [
            {
                "question_type": "what is this",
                "multiple_choice_answer": "net",
                "answers": vqav2_answers(("net", 10)),
                "image_id": 458752,
                "answer_type": "other",
                "question_id": 458752000,
            },
            {
                "question_type": "what",
                "multiple_choice_answer": "catcher",
                "answers": vqav2_answers(("pitcher", 3), ("catcher", 7)),
                "image_id": 458752,
                "answer_type": "other",
                "question_id": 458752001,
            },
            {
                "question_type": "is the",
                "multiple_choice_answer": "no",
                "answers": vqav2_answers(("yes", 1), ("no", 9)),
                "image_id": 262148,
                "answer_type": "yes/no",
                "question_id": 262148000,
            },
        ],
    }
    questions = {
        "info": annotations["info"],
        "task_type": "Open-Ended",
        "data_type": "mscoco",
        "data_subtype": "val2014",
        "license": annotations["license"],
        "questions": [
            {"image_id": 458752, "question": "What is this photo taken looking through?", "question_id": 458752000},
            {"image_id": 458752, "question": "What position is this man playing?", "question_id": 458752001},
            {"image_id": 262148, "question": "Is the dog waiting?", "question_id": 262148000},
        ],
    }
    return (
        write_json(tmp_path / "v2_mscoco_val2014_annotations.json", annotations),
        write_json(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", questions),
    )


def test_read_vqav2_and_score(tmp_path: Path) -> None:
    annotations_path, questions_path = vqav2_files(tmp_path)
    annotations = read_vqa_annotations(annotations_path, "vqav2", questions_path)
    assert annotations == {
        "458752000": VQAAnnotation(("net",) * 10, "other", "what is this"),
        "458752001": VQAAnnotation(("pitcher",) * 3 + ("catcher",) * 7, "other", "what"),
        "262148000": VQAAnnotation(("yes",) + ("no",) * 9, "yes/no", "is the"),
    }
    assert list(annotations) == ["458752000", "458752001", "262148000"]  # file order
    assert read_vqa_annotations(annotations_path, "vqav2") == annotations  # the question file is optional

    # "Net" -> "net", 10 of 10 -> 1; "pitcher": 3 of 10 -> 0.9; "Yes." -> "yes": 1 of 10 -> 0.3.
    report = score_vqa({"458752000": "Net", "458752001": "pitcher", "262148000": "Yes."}, annotations, "vqav2")
    # (1 + 0.9 + 0.3) / 3 = 0.7333... -> 73.33
    assert report.overall == 73.33
    assert report.breakdowns == {
        "answer_type": {"other": 95.0, "yes/no": 30.0},  # (1 + 0.9) / 2; 0.3
        "question_type": {"is the": 30.0, "what": 90.0, "what is this": 100.0},
    }
    assert report.counts == {"questions": 3, "missing": 0}


def test_read_vqav2_errors(tmp_path: Path) -> None:
    annotations_path, questions_path = vqav2_files(tmp_path)
    missing = tmp_path / "v2_mscoco_test-dev2015_annotations.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        read_vqa_annotations(missing, "vqav2")
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        read_vqa_annotations(annotations_path, "vqav2", missing)

    content = json.loads(annotations_path.read_text())
    del content["annotations"][1]["answers"]
    broken = write_json(tmp_path / "no_answers.json", content)
    with pytest.raises(
        ValueError, match=r"no_answers\.json: annotations\[1\] \(question_id 458752001\): missing field 'answers'"
    ):
        read_vqa_annotations(broken, "vqav2")

    content = json.loads(annotations_path.read_text())
    content["annotations"][2]["answer_type"] = None
    broken = write_json(tmp_path / "null_type.json", content)
    with pytest.raises(ValueError, match=r"question_id 262148000\): field 'answer_type' must be str, got NoneType"):
        read_vqa_annotations(broken, "vqav2")

    content = json.loads(annotations_path.read_text())
    del content["annotations"][0]["answers"][4]["answer"]
    broken = write_json(tmp_path / "no_answer_text.json", content)
    with pytest.raises(ValueError, match=r"question_id 458752000\), answers\[4\]: missing field 'answer'"):
        read_vqa_annotations(broken, "vqav2")

    content = json.loads(annotations_path.read_text())
    content["annotations"][2]["question_id"] = 458752000
    broken = write_json(tmp_path / "repeated.json", content)
    with pytest.raises(ValueError, match=r"annotations\[2\] \(question_id 458752000\): question_id repeated"):
        read_vqa_annotations(broken, "vqav2")

    broken = write_json(tmp_path / "a_list.json", [{"question_id": 1}])
    with pytest.raises(ValueError, match=r"a_list\.json: expected a JSON object, got list"):
        read_vqa_annotations(broken, "vqav2")
    (tmp_path / "cut.json").write_text('{"annotations": [')
    with pytest.raises(ValueError, match=r"cut\.json: not a JSON file"):
        read_vqa_annotations(tmp_path / "cut.json", "vqav2")

    # The question file must hold exactly the annotated ids.
    questions = json.loads(questions_path.read_text())
    questions["questions"][2]["question_id"] = 262148001
    other = write_json(tmp_path / "other_questions.json", questions)
    with pytest.raises(
        ValueError, match=r"1 annotated but not asked \(262148000\), 1 asked but not annotated \(262148001\)"
    ):
        read_vqa_annotations(annotations_path, "vqav2", other)
    with pytest.raises(ValueError, match="only cross-checked for vqav2"):
        read_vqa_annotations(annotations_path, "textvqa", questions_path)
    with pytest.raises(ValueError, match="unknown VQA benchmark 'okvqa'"):
        read_vqa_annotations(annotations_path, "okvqa")


def textvqa_file(tmp_path: Path) -> Path:
    """TextVQA_0.5.1_val.json with four questions, two of them on one image."""

    def question(question_id: int, image_id: str, text: str, answers: list[str]) -> dict[str, Any]:
        assert len(answers) == 10
        return {
            "question": text,
            "image_id": image_id,
            "image_classes": ["Poster"],
            "flickr_original_url": f"https://farm1.staticflickr.com/{image_id}_o.jpg",
            "flickr_300k_url": f"https://farm1.staticflickr.com/{image_id}_z.jpg",
            "image_width": 1024,
            "image_height": 768,
            "answers": answers,
            "question_tokens": text.rstrip("?").split(),
            "question_id": question_id,
            "set_name": "val",
        }

    data = [
        question(
            34602, "003a8ae2ef43b901", "what is the brand of this camera?", ["dakota"] * 8 + ["dakota digital"] * 2
        ),
        question(
            34603, "b9dc400eb20bad64", "what does the small white text spell?", ["copenhagen"] * 2 + ["rupalcon"] * 8
        ),
        question(34604, "831bcec304a17054", "what brand liquor is on the right?", ["bowmore"] * 10),
        question(
            34605,
            "831bcec304a17054",
            "how long has the drink on the right been aged?",
            ["10 years"] * 6 + ["10 year"] * 4,
        ),
    ]
    content = {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data}
    return write_json(tmp_path / "TextVQA_0.5.1_val.json", content)


def test_read_textvqa_and_score_llava_answers(tmp_path: Path) -> None:
    path = textvqa_file(tmp_path)
    annotations = read_vqa_annotations(path, "textvqa")
    assert annotations == {
        "34602": VQAAnnotation(("dakota",) * 8 + ("dakota digital",) * 2),
        "34603": VQAAnnotation(("copenhagen",) * 2 + ("rupalcon",) * 8),
        "34604": VQAAnnotation(("bowmore",) * 10),
        "34605": VQAAnnotation(("10 years",) * 6 + ("10 year",) * 4),
    }
    index = read_textvqa_llava_index(path)
    assert index == {
        ("003a8ae2ef43b901", "what is the brand of this camera?"): "34602",
        ("b9dc400eb20bad64", "what does the small white text spell?"): "34603",
        ("831bcec304a17054", "what brand liquor is on the right?"): "34604",
        ("831bcec304a17054", "how long has the drink on the right been aged?"): "34605",
    }

    # Answer rows of a run on llava_textvqa_val_v051_ocr.jsonl: question_id is the image id, so the two
    # questions on image 831bcec304a17054 share it, and the prompt tells them apart.
    def row(image_id: str, question: str, ocr: str, text: str) -> dict[str, str]:
        prompt = f"{question}\nReference OCR token: {ocr}\n{TEXTVQA_PROMPT}"
        return {"question_id": image_id, "prompt": prompt, "text": text, "model_id": "mambavlm"}

    rows = [
        row("003a8ae2ef43b901", "What is the brand of this camera?", "DAKOTA, DIGITAL", "Dakota"),
        row("b9dc400eb20bad64", "What does the small white text spell?", "D, COPENHAGEN", "COPENHAGEN"),
        row("831bcec304a17054", "What brand liquor is on the right?", "MORANGIE, OWMOR", "Bowmore"),
        row("831bcec304a17054", "How long has the drink on the right been aged?", "AGED, 10", "12 years"),
    ]
    predictions = {index[row["question_id"], llava_textvqa_question(row["prompt"])]: row["text"] for row in rows}
    assert predictions == {"34602": "Dakota", "34603": "COPENHAGEN", "34604": "Bowmore", "34605": "12 years"}

    report = score_vqa(predictions, annotations, "textvqa")
    # "dakota": 8 of 10 -> 1; "copenhagen": 2 of 10 -> 0.6; "bowmore": 10 of 10 -> 1; "12 years": 0 of 10 -> 0.
    # (1 + 0.6 + 1 + 0) / 4 = 0.65 -> 65.0
    assert report.overall == 65.0
    assert report.breakdowns == {}
    assert report.counts == {"questions": 4, "missing": 0}


@pytest.mark.parametrize(
    ("prompt", "question"),
    [
        (f"What is the time?\nReference OCR token: N, u, g0\n{TEXTVQA_PROMPT}", "what is the time?"),
        (f"Reference OCR token: N, u, g0\nWhat is the time?\n{TEXTVQA_PROMPT}", "what is the time?"),
        (f"What is the time?\n{TEXTVQA_PROMPT}", "what is the time?"),
        ("OCR tokens: N, u, g0 Question: What is the time? Short answer:", "what is the time?"),
    ],
)
def test_llava_textvqa_question(prompt: str, question: str) -> None:
    assert llava_textvqa_question(prompt) == question


def test_llava_textvqa_question_rejects_what_the_reference_asserts_on() -> None:
    with pytest.raises(ValueError, match="not a TextVQA prompt"):
        llava_textvqa_question("What is the time?")
    with pytest.raises(ValueError, match=re.escape("no 'Question: ... Short answer:'")):
        llava_textvqa_question("OCR tokens: N, u, g0\nWhat is the time?")


def test_read_textvqa_errors(tmp_path: Path) -> None:
    path = textvqa_file(tmp_path)
    content = json.loads(path.read_text())
    content["data"][0]["answers"] = content["data"][0]["answers"][:9]
    broken = write_json(tmp_path / "nine.json", content)
    with pytest.raises(
        ValueError, match=r"data\[0\] \(question_id 34602\): TextVQA scores exactly 10 human answers, got 9"
    ):
        read_vqa_annotations(broken, "textvqa")

    content = json.loads(path.read_text())
    content["data"][1]["answers"][3] = 3
    broken = write_json(tmp_path / "number.json", content)
    with pytest.raises(ValueError, match=r"question_id 34603\): field 'answers' must be a list of strings"):
        read_vqa_annotations(broken, "textvqa")

    content = json.loads(path.read_text())
    del content["data"][3]["image_id"]
    broken = write_json(tmp_path / "no_image.json", content)
    read_vqa_annotations(broken, "textvqa")  # the scorer needs no image id ...
    with pytest.raises(ValueError, match=r"data\[3\] \(question_id 34605\): missing field 'image_id'"):
        read_textvqa_llava_index(broken)  # ... the LLaVA lookup does

    with pytest.raises(ValueError, match=r"TextVQA_0\.5\.1_val\.json: missing field 'data'"):
        read_vqa_annotations(write_json(tmp_path / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa"}), "textvqa")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent.json"))):
        read_textvqa_llava_index(tmp_path / "absent.json")


def vizwiz_answers(*groups: tuple[str, int]) -> list[dict[str, str]]:
    return [{"answer": answer, "answer_confidence": "yes"} for answer, count in groups for _ in range(count)]


def vizwiz_file(tmp_path: Path) -> Path:
    """VizWiz val.json with three questions."""
    records = [
        {
            "image": "VizWiz_val_00000000.jpg",
            "question": "Ok. There is another picture I hope it is a better one.",
            "answers": vizwiz_answers(("unanswerable", 10)),
            "answer_type": "unanswerable",
            "answerable": 0,
        },
        {
            "image": "VizWiz_val_00000001.jpg",
            "question": "Can you tell me what this is?",
            "answers": vizwiz_answers(("soup", 2), ("tomato soup", 8)),
            "answer_type": "other",
            "answerable": 1,
        },
        {
            "image": "VizWiz_val_00000002.jpg",
            "question": "Is this oven on?",
            "answers": vizwiz_answers(("no", 1), ("yes", 9)),
            "answer_type": "yes/no",
            "answerable": 1,
        },
    ]
    return write_json(tmp_path / "val.json", records)


def test_read_vizwiz_and_score(tmp_path: Path) -> None:
    annotations = read_vqa_annotations(vizwiz_file(tmp_path), "vizwiz")
    # Keys: the position in val.json, as LLaVA numbers llava_test.jsonl (question 0 = VizWiz_test_00000000.jpg).
    assert annotations == {
        "0": VQAAnnotation(("unanswerable",) * 10, "unanswerable"),
        "1": VQAAnnotation(("soup",) * 2 + ("tomato soup",) * 8, "other"),
        "2": VQAAnnotation(("no",) + ("yes",) * 9, "yes/no"),
    }
    report = score_vqa({"0": "Unanswerable", "1": "soup", "2": "No"}, annotations, "vizwiz")
    # "unanswerable": 10 of 10 -> 1; "soup": 2 of 10 -> 0.6; "no": 1 of 10 -> 0.3.
    # (1 + 0.6 + 0.3) / 3 = 0.6333... -> 63.33
    assert report.overall == 63.33
    assert report.breakdowns == {"answer_type": {"other": 60.0, "unanswerable": 100.0, "yes/no": 30.0}}


def test_read_vizwiz_errors(tmp_path: Path) -> None:
    content = json.loads(vizwiz_file(tmp_path).read_text())
    del content[1]["answer_type"]
    broken = write_json(tmp_path / "untyped.json", content)
    with pytest.raises(ValueError, match=r"untyped\.json: \[1\]: missing field 'answer_type'"):
        read_vqa_annotations(broken, "vizwiz")
    # test.json has no answers: not scorable.
    test_split = write_json(
        tmp_path / "test.json", [{"image": "VizWiz_test_00000000.jpg", "question": "What is this?"}]
    )
    with pytest.raises(ValueError, match=r"test\.json: \[0\]: missing field 'answers'"):
        read_vqa_annotations(test_split, "vizwiz")
    content = json.loads(vizwiz_file(tmp_path).read_text())
    content[2]["answers"] = []
    broken = write_json(tmp_path / "unanswered.json", content)
    with pytest.raises(ValueError, match=r"unanswered\.json: \[2\]: no human answers"):
        read_vqa_annotations(broken, "vizwiz")
    with pytest.raises(ValueError, match=r"expected a JSON list of questions \(VizWiz val\.json\), got dict"):
        read_vqa_annotations(write_json(tmp_path / "object.json", {"0": content[0]}), "vizwiz")


def test_prompt_suffixes() -> None:
    # As LLaVA-1.5's question files end each prompt (llava_vqav2_mscoco_test-dev2015.jsonl, llava_test.jsonl).
    assert (
        f"Is the dog waiting?\n{VQAV2_PROMPT}"
        == "Is the dog waiting?\nAnswer the question using a single word or phrase."
    )
    assert f"What is this?\n{VIZWIZ_PROMPT}" == (
        "What is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n"
        "Answer the question using a single word or phrase."
    )
