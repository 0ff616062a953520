"""Readers and question builders for MME, MMBench, SEED-Bench and MMMU: official files written by hand in
``tmp_path``, read, checked against hand-written items, then scored; every expected score is worked out in the
comments."""

from __future__ import annotations

import base64
import json
import re
import sys
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image

from mambavlm.eval.questions import read_questions
from mambavlm.eval.scorers.mme import MMEQuestion, build_mme_questions, read_mme, score_mme
from mambavlm.eval.scorers.multiple_choice import (
    MMBenchQuestion,
    MMMUQuestion,
    SEEDQuestion,
    build_mmbench_questions,
    read_mmbench,
    read_mmmu,
    read_seedbench,
    score_mmbench,
    score_mmmu,
    score_seedbench,
)

# ------------------------------------------------------------------------------------------------
# MME: MME_Benchmark_release_version/
# ------------------------------------------------------------------------------------------------


def _save_image(path: Path, color: tuple[int, int, int], image_format: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2), color).save(path, format=image_format)


def _mme_release(root: Path) -> Path:
    """Three layouts of the official release: a flat category (image beside its txt), a category with
    images/ + questions_answers_YN/, and a cognition category; plus a folder that is no category."""
    release = root / "MME_Benchmark_release_version"
    _save_image(release / "existence/000000006040.jpg", (200, 0, 0), "JPEG")
    (release / "existence/000000006040.txt").write_text(
        "Is there a train in this image? Please answer yes or no.\tYes\n"
        "Is there a bed in this image? Please answer yes or no.\tNo\n"
    )
    _save_image(release / "existence/000000018150.jpg", (0, 200, 0), "JPEG")
    (release / "existence/000000018150.txt").write_text(
        "Is there a bus in this image? Please answer yes or no.\tYes\n"
        "Is there a cow in this image? Please answer yes or no.\tNo\n"
    )
    _save_image(release / "artwork/images/10002.jpg", (0, 0, 200), "JPEG")
    (release / "artwork/questions_answers_YN").mkdir(parents=True)
    (release / "artwork/questions_answers_YN/10002.txt").write_text(
        "Is this artwork created by donatello? Please answer yes or no.\tYes\n"
        "Is this artwork created by van gogh?  Please answer yes or no.\tNo\n"  # the two-space variant
    )
    _save_image(release / "code_reasoning/0020.png", (9, 9, 9), "PNG")
    (release / "code_reasoning/0020.txt").write_text(
        "Is a python code shown in the picture? Please answer yes or no.\tYes\n"
        "Is a c++ code shown in the picture? Please answer yes or no.\tNo\n"
    )
    (release / "__MACOSX").mkdir()  # not one of the 14 categories: ignored
    return release


def test_read_mme_ids_and_items_then_score(tmp_path: Path) -> None:
    release = _mme_release(tmp_path)
    questions = read_mme(release)
    assert questions == {
        "existence/000000006040.jpg#0": MMEQuestion("existence", "existence/000000006040.jpg", "Yes"),
        "existence/000000006040.jpg#1": MMEQuestion("existence", "existence/000000006040.jpg", "No"),
        "existence/000000018150.jpg#0": MMEQuestion("existence", "existence/000000018150.jpg", "Yes"),
        "existence/000000018150.jpg#1": MMEQuestion("existence", "existence/000000018150.jpg", "No"),
        "artwork/images/10002.jpg#0": MMEQuestion("artwork", "artwork/images/10002.jpg", "Yes"),
        "artwork/images/10002.jpg#1": MMEQuestion("artwork", "artwork/images/10002.jpg", "No"),
        "code_reasoning/0020.png#0": MMEQuestion("code_reasoning", "code_reasoning/0020.png", "Yes"),
        "code_reasoning/0020.png#1": MMEQuestion("code_reasoning", "code_reasoning/0020.png", "No"),
    }
    predictions = {
        "existence/000000006040.jpg#0": "Yes",  # right
        "existence/000000006040.jpg#1": "No",  # right: image 6040 both right
        "existence/000000018150.jpg#0": "Yes",  # right
        "existence/000000018150.jpg#1": "Yes",  # wrong: image 18150 one right
        "artwork/images/10002.jpg#0": "Yes",  # right
        "artwork/images/10002.jpg#1": "No, it is not.",  # right: image 10002 both right
        "code_reasoning/0020.png#0": "Yes",  # right; #1 has no answer: wrong
    }
    report = score_mme(predictions, questions)
    # existence: 3 of 4 right (75) + 1 of 2 images (50) = 125; artwork 100 + 100 = 200 -> perception 325.
    # code_reasoning: 1 of 2 (50) + 0 of 1 image (0) -> cognition 50.
    assert report.overall == 325.0
    assert report.breakdowns["score"] == {"existence": 125.0, "artwork": 200.0, "code_reasoning": 50.0}
    assert report.breakdowns["total"] == {"perception": 325.0, "cognition": 50.0}


def test_build_mme_questions_writes_llava_prompts_with_unique_ids(tmp_path: Path) -> None:
    release = _mme_release(tmp_path)
    out = build_mme_questions(release, tmp_path / "mme.jsonl")
    assert out == tmp_path / "mme.jsonl"
    suffix = "\nAnswer the question using a single word or phrase."
    expected = [  # perception categories in calculation.py's order, then cognition; txt files by name
        ("existence/000000006040.jpg#0", "existence/000000006040.jpg", "Is there a train in this image?", "existence"),
        ("existence/000000006040.jpg#1", "existence/000000006040.jpg", "Is there a bed in this image?", "existence"),
        ("existence/000000018150.jpg#0", "existence/000000018150.jpg", "Is there a bus in this image?", "existence"),
        ("existence/000000018150.jpg#1", "existence/000000018150.jpg", "Is there a cow in this image?", "existence"),
        ("artwork/images/10002.jpg#0", "artwork/images/10002.jpg", "Is this artwork created by donatello?", "artwork"),
        ("artwork/images/10002.jpg#1", "artwork/images/10002.jpg", "Is this artwork created by van gogh?", "artwork"),
        (
            "code_reasoning/0020.png#0",
            "code_reasoning/0020.png",
            "Is a python code shown in the picture?",
            "code_reasoning",
        ),
        (
            "code_reasoning/0020.png#1",
            "code_reasoning/0020.png",
            "Is a c++ code shown in the picture?",
            "code_reasoning",
        ),
    ]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == [
        {"question_id": qid, "image": image, "text": question + suffix, "category": category}
        for qid, image, question, category in expected
    ]
    # Our runner reads it whole: no repeated id, every image found under the release directory.
    questions, problems = read_questions(out, image_root=release)
    assert problems == []
    assert [q.question_id for q in questions] == [row[0] for row in expected]
    assert all(q.image is not None and q.image.is_file() for q in questions)


def test_read_mme_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        read_mme(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no MME category folder"):
        read_mme(tmp_path / "empty")

    release = _mme_release(tmp_path)
    txt = release / "existence/000000018150.txt"
    txt.write_text("Is there a bus in this image? Please answer yes or no.\tYes\nIs there a cow?\n")
    with pytest.raises(ValueError, match=re.escape(f"{txt} line 2")):
        read_mme(release)
    txt.write_text("Is there a bus in this image?\tYes\nIs there a cow in this image?\tMaybe\n")
    with pytest.raises(ValueError, match=re.escape(f"{txt} line 2")):
        read_mme(release)
    txt.write_text("Is there a bus in this image?\tYes\nIs there a cow?\tNo\nIs there a cat?\tNo\n")
    with pytest.raises(ValueError, match=re.escape(f"{txt}: 3 questions")):
        read_mme(release)
    txt.unlink()

    (release / "existence/000000018150.jpg").unlink()
    (release / "existence/000000099999.txt").write_text("Is it?\tYes\nIs it not?\tNo\n")
    with pytest.raises(FileNotFoundError, match=re.escape(str(release / "existence/000000099999"))):
        read_mme(release)
    (release / "existence/000000099999.txt").unlink()

    (release / "artwork/questions_answers_YN/10002.txt").unlink()
    (release / "artwork/questions_answers_YN").rmdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(release / "artwork/questions_answers_YN"))):
        build_mme_questions(release, tmp_path / "mme.jsonl")
    assert not (tmp_path / "mme.jsonl").exists()


# ------------------------------------------------------------------------------------------------
# MMBench: mmbench_dev_20230712.tsv
# ------------------------------------------------------------------------------------------------

MMBENCH_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source"]
MMBENCH_HEADER += ["l2-category", "comment", "split"]
PERCEPTION = "finegrained_perception (instance-level)"


def _encoded(color: tuple[int, int, int], image_format: str) -> bytes:
    """A 4x4 image of ``color`` fading to black, so that a re-encoded JPEG would differ from this one."""
    image = Image.new("RGB", (4, 4))
    image.putdata([tuple(channel * (16 - i) // 16 for channel in color) for i in range(16)])
    buffer = BytesIO()
    image.save(buffer, format=image_format, quality=95)
    return buffer.getvalue()


def _write_tsv(path: Path, rows: list[list[str]]) -> Path:
    """Tab-separated as pandas' to_csv writes it: a field holding a newline is quoted."""
    lines = ["\t".join(MMBENCH_HEADER)] + ["\t".join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _mmbench_rows(png: bytes, jpeg: bytes) -> list[list[str]]:
    png64, jpeg64 = base64.b64encode(png).decode(), base64.b64encode(jpeg).decode()
    animal, sign = "What animal is shown in the image?", "What does the sign say?"
    hint = '"Read the sign.\nIt is red."'  # a quoted hint spanning two lines
    # question 0 and its circular copy 1000000 (options shifted by one); question 1 (two options) and 1000001
    return [
        ["0", animal, "", "dog", "cat", "bird", "fish", "B", "attribute_recognition", png64, "MMBench"]
        + [PERCEPTION, "", "dev"],
        ["1", sign, hint, "stop", "go", "", "", "A", "ocr", jpeg64, "MMBench", PERCEPTION, "", "dev"],
        ["1000000", animal, "", "cat", "bird", "fish", "dog", "A", "attribute_recognition", png64, "MMBench"]
        + [PERCEPTION, "", "dev"],
        ["1000001", sign, hint, "go", "stop", "", "", "B", "ocr", jpeg64, "MMBench", PERCEPTION, "", "dev"],
    ]


def test_read_mmbench_rows_then_circular_score(tmp_path: Path) -> None:
    tsv = _write_tsv(tmp_path / "mmbench_dev_20230712.tsv", _mmbench_rows(_encoded((255, 0, 0), "PNG"), b"x"))
    questions = read_mmbench(tsv)
    animals = {"A": "dog", "B": "cat", "C": "bird", "D": "fish"}
    shifted = {"A": "cat", "B": "bird", "C": "fish", "D": "dog"}
    assert questions == {
        "0": MMBenchQuestion(0, "B", animals, "attribute_recognition", PERCEPTION),
        "1": MMBenchQuestion(1, "A", {"A": "stop", "B": "go"}, "ocr", PERCEPTION),
        "1000000": MMBenchQuestion(0, "A", shifted, "attribute_recognition", PERCEPTION),
        "1000001": MMBenchQuestion(1, "B", {"A": "go", "B": "stop"}, "ocr", PERCEPTION),
    }
    # question 0: "B" and "A" are both passes' answers -> right; question 1: pass 1000001 says A, answer B -> wrong
    report = score_mmbench({"0": "B", "1000000": "A", "1": "A", "1000001": "A"}, questions)
    assert report.overall == 50.0  # 1 of 2 questions
    assert report.breakdowns["category"] == {"attribute_recognition": 100.0, "ocr": 0.0}


def test_build_mmbench_questions_prompts_and_decoded_images(tmp_path: Path) -> None:
    png, jpeg = _encoded((255, 0, 0), "PNG"), _encoded((10, 120, 240), "JPEG")
    tsv = _write_tsv(tmp_path / "mmbench_dev_20230712.tsv", _mmbench_rows(png, jpeg))
    out = build_mmbench_questions(tsv, tmp_path / "mmbench")
    assert out == tmp_path / "mmbench" / "questions.jsonl"
    suffix = "\nAnswer with the option's letter from the given choices directly."
    animal = "What animal is shown in the image?"
    sign = "Read the sign.\nIt is red.\nWhat does the sign say?"  # hint, newline, question
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"question_id": 0, "image": "images/0.png", "text": f"{animal}\nA. dog\nB. cat\nC. bird\nD. fish{suffix}"},
        {"question_id": 1, "image": "images/1.jpg", "text": f"{sign}\nA. stop\nB. go{suffix}"},
        {
            "question_id": 1000000,
            "image": "images/1000000.png",
            "text": f"{animal}\nA. cat\nB. bird\nC. fish\nD. dog{suffix}",
        },
        {"question_id": 1000001, "image": "images/1000001.jpg", "text": f"{sign}\nA. go\nB. stop{suffix}"},
    ]
    with Image.open(tmp_path / "mmbench/images/0.png") as image:  # PNG: the exact pixels
        assert list(image.convert("RGB").getdata()) == [(255 * (16 - i) // 16, 0, 0) for i in range(16)]
    assert (tmp_path / "mmbench/images/1.jpg").read_bytes() == jpeg  # JPEG: the bytes as encoded, not re-encoded
    with Image.open(tmp_path / "mmbench/images/1.jpg") as written, Image.open(BytesIO(jpeg)) as original:
        assert list(written.getdata()) == list(original.getdata())


def test_mmbench_cells_pandas_reads_as_nan_are_absent(tmp_path: Path) -> None:
    # The references read the TSV with pandas: the hint "N/A" and the option "None" are NaN, so absent. The
    # scorer's options keep every present cell (VLMEvalKit's build_choices: A, B, D), the prompt stops at the
    # first absent one (LLaVA's get_options: A, B).
    png64 = base64.b64encode(_encoded((0, 0, 0), "PNG")).decode()
    row = ["7", "Which one is largest?", "N/A", "1", "2", "None", "3", "B", "c", png64, "s", "l2", "", "dev"]
    tsv = _write_tsv(tmp_path / "t.tsv", [row])
    assert read_mmbench(tsv)["7"].options == {"A": "1", "B": "2", "D": "3"}
    out = build_mmbench_questions(tsv, tmp_path / "out")
    text = json.loads(out.read_text())["text"]
    assert text == "Which one is largest?\nA. 1\nB. 2\nAnswer with the option's letter from the given choices directly."


def test_mmbench_errors_name_the_file_and_row(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing.tsv"))):
        read_mmbench(tmp_path / "missing.tsv")
    png64 = base64.b64encode(_encoded((0, 0, 0), "PNG")).decode()
    good = ["3", "Q?", "", "x", "y", "", "", "A", "c", png64, "s", "l2", "", "dev"]

    tsv = _write_tsv(tmp_path / "bad_answer.tsv", [good, ["4", *good[1:7], "C", *good[8:]]])
    with pytest.raises(ValueError, match=re.escape(f"{tsv} line 3 (index 4): answer 'C'")):
        read_mmbench(tsv)
    tsv = _write_tsv(tmp_path / "bad_index.tsv", [["3a", *good[1:]]])
    with pytest.raises(ValueError, match=re.escape(f"{tsv} line 2: index '3a'")):
        read_mmbench(tsv)
    tsv = _write_tsv(tmp_path / "repeated.tsv", [good, good])
    with pytest.raises(ValueError, match=re.escape(f"{tsv} line 3: index 3 repeated")):
        read_mmbench(tsv)
    tsv = _write_tsv(tmp_path / "short.tsv", [good[:-1]])
    with pytest.raises(ValueError, match=re.escape(f"{tsv} line 2: 13 tab-separated fields")):
        read_mmbench(tsv)
    tsv = tmp_path / "no_l2.tsv"
    tsv.write_text("index\tquestion\tA\tB\tanswer\tcategory\n3\tQ?\tx\ty\tA\tc\n")
    with pytest.raises(ValueError, match=re.escape(f"{tsv}: no column l2-category")):
        read_mmbench(tsv)
    tsv = _write_tsv(tmp_path / "bad_image.tsv", [["3", *good[1:9], "bm90IGFuIGltYWdl", *good[10:]]])
    with pytest.raises(ValueError, match=re.escape(f"{tsv} line 2 (index 3): the image column")):
        build_mmbench_questions(tsv, tmp_path / "out")
    assert not (tmp_path / "out" / "questions.jsonl").exists()


# ------------------------------------------------------------------------------------------------
# SEED-Bench: SEED-Bench.json
# ------------------------------------------------------------------------------------------------

SEED_TYPES = {"Scene Understanding": 1, "Instance Identity": 2, "Instances Counting": 5, "Action Recognition": 10}


def _seed_question(question_id: str | int, answer: str, type_id: int, data_type: str = "image") -> dict:
    return {
        "answer": answer,
        "choice_a": "One",
        "choice_b": "Two",
        "choice_c": "Three",
        "choice_d": "Four",
        "data_id": "1454426_2591111986" if data_type == "image" else "v_1234.mp4",
        "data_type": data_type,
        "question": "How many towels are in the image?",
        "question_id": question_id,
        "question_type_id": type_id,
    }


def _write_seed(path: Path, questions: list[dict]) -> Path:
    path.write_text(json.dumps({"questions": questions, "question_type": SEED_TYPES}))
    return path


def test_read_seedbench_image_questions_then_score(tmp_path: Path) -> None:
    seed = _write_seed(
        tmp_path / "SEED-Bench.json",
        [
            _seed_question("101669", "A", 5),
            _seed_question("101670", "C", 5),
            _seed_question(52401, "B", 1),  # an int id reads as its digits, as LLaVA's int(question_id)
            _seed_question("1_3021", "D", 10, data_type="video"),  # kept (LLaVA asks it), never scored
        ],
    )
    questions = read_seedbench(seed)
    assert questions == {
        "101669": SEEDQuestion("A", 5, "Instances Counting"),
        "101670": SEEDQuestion("C", 5, "Instances Counting"),
        "52401": SEEDQuestion("B", 1, "Scene Understanding"),
        "1_3021": SEEDQuestion("D", 10, "Action Recognition", "video"),
    }
    # 101669 right; 101670 "C. Three" is not exactly "C": wrong; 52401 unanswered: wrong -> 1/3; the video
    # question's answer is read but not scored (LLaVA's image accuracy).
    report = score_seedbench({"101669": "A", "101670": "C. Three", "1_3021": "D"}, questions)
    assert report.overall == 33.33
    assert report.counts == {"questions": 3, "missing": 1, "skipped_not_image": 1}
    assert report.breakdowns["question_type"] == {"Scene Understanding": 0.0, "Instances Counting": 50.0}


def test_read_seedbench_errors_name_the_file_and_question(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "SEED-Bench.json"))):
        read_seedbench(tmp_path / "SEED-Bench.json")
    seed = _write_seed(tmp_path / "a.json", [_seed_question("101669", "E", 5)])
    with pytest.raises(ValueError, match=re.escape(f"{seed} question 101669: answer 'E'")):
        read_seedbench(seed)
    seed = _write_seed(tmp_path / "b.json", [_seed_question("101669", "A", 17)])
    with pytest.raises(ValueError, match=re.escape(f"{seed} question 101669: question_type_id 17")):
        read_seedbench(seed)
    record = _seed_question("101669", "A", 5)
    del record["answer"]
    seed = _write_seed(tmp_path / "c.json", [_seed_question("7", "A", 5), record])
    with pytest.raises(ValueError, match=re.escape(f"{seed} questions[1]")):
        read_seedbench(seed)
    seed = _write_seed(tmp_path / "d.json", [_seed_question("7", "A", 5), _seed_question(7, "B", 5)])
    with pytest.raises(ValueError, match=re.escape(f"{seed} question 7: question_id repeated")):
        read_seedbench(seed)


# ------------------------------------------------------------------------------------------------
# MMMU: answer_dict_val.json + the Hugging Face parquet files
# ------------------------------------------------------------------------------------------------

MMMU_ANSWERS = {
    "validation_Art_Theory_1": {"question_type": "multiple-choice", "ground_truth": "B"},
    "validation_Art_Theory_2": {"question_type": "multiple-choice", "ground_truth": "C"},
    "validation_Math_15": {"question_type": "short-answer", "ground_truth": ["24/7", "3.429"]},
}
ART_OPTIONS = ("Baroque", "Rococo", "Gothic", "Romanesque")


def _write_answers(path: Path, answers: dict) -> Path:
    path.write_text(json.dumps(answers, indent=4))
    return path


def _write_mmmu_dataset(root: Path) -> Path:
    """MMMU/MMMU as the Hub holds it: <Subject>/{dev,validation}-00000-of-00001.parquet, ``options`` a list literal."""
    pyarrow = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")

    def write(path: Path, ids: list[str], options: list[str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        parquet.write_table(pyarrow.table({"id": ids, "question": ["?"] * len(ids), "options": options}), path)

    art_ids = ["validation_Art_Theory_1", "validation_Art_Theory_2"]
    write(root / "Art_Theory/validation-00000-of-00001.parquet", art_ids, [str(list(ART_OPTIONS)), "['1', '2', '3']"])
    write(root / "Art_Theory/dev-00000-of-00001.parquet", ["dev_Art_Theory_1"], ["['x']"])  # not read
    write(root / "Math/validation-00000-of-00001.parquet", ["validation_Math_15"], ["[]"])
    return root


def test_read_mmmu_answers_and_options_then_score(tmp_path: Path) -> None:
    dataset = _write_mmmu_dataset(tmp_path / "MMMU")
    questions = read_mmmu(_write_answers(tmp_path / "answer_dict_val.json", MMMU_ANSWERS), dataset)
    assert questions == {
        "validation_Art_Theory_1": MMMUQuestion("multiple-choice", "B", "Art_Theory", ART_OPTIONS),
        "validation_Art_Theory_2": MMMUQuestion("multiple-choice", "C", "Art_Theory", ("1", "2", "3")),
        "validation_Math_15": MMMUQuestion("short-answer", ("24/7", "3.429"), "Math", ()),
    }
    predictions = {
        "validation_Art_Theory_1": "(B) Rococo",  # "(B)" -> B: right
        "validation_Art_Theory_2": "The answer is (A)",  # A, gold C: wrong
        "validation_Math_15": "The answer is 3.429",  # 3.43 == gold 3.429 rounded to 2 places: right
    }
    report = score_mmmu(predictions, questions)
    # Art_Theory 1/2, Math 1/1; instance level 2/3 -> round(0.667, 3) -> 66.7
    assert report.overall == 66.7
    assert report.breakdowns["subject"] == {"Art_Theory": 50.0, "Math": 100.0}


def test_read_mmmu_checks_options_against_answers(tmp_path: Path) -> None:
    dataset = _write_mmmu_dataset(tmp_path / "MMMU")
    unknown = {"validation_Art_Theory_3": {"question_type": "multiple-choice", "ground_truth": "A"}}
    answers = _write_answers(tmp_path / "a.json", unknown)  # no parquet row has this id
    with pytest.raises(
        ValueError, match=re.escape(f"{answers} question validation_Art_Theory_3: multiple-choice, but")
    ):
        read_mmmu(answers, dataset)
    beyond = {"validation_Art_Theory_2": {"question_type": "multiple-choice", "ground_truth": "D"}}
    answers = _write_answers(tmp_path / "b.json", beyond)
    with pytest.raises(ValueError, match=re.escape(f"{answers} question validation_Art_Theory_2: ground_truth 'D'")):
        read_mmmu(answers, dataset)  # three options: A-C


def test_read_mmmu_without_pyarrow_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = tmp_path / "MMMU"
    (dataset / "Math").mkdir(parents=True)
    (dataset / "Math/validation-00000-of-00001.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        read_mmmu(_write_answers(tmp_path / "answer_dict_val.json", MMMU_ANSWERS), dataset)


def test_read_mmmu_file_errors(tmp_path: Path) -> None:
    dataset = tmp_path / "MMMU"
    dataset.mkdir()
    answers = _write_answers(tmp_path / "answer_dict_val.json", MMMU_ANSWERS)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing.json"))):
        read_mmmu(tmp_path / "missing.json", dataset)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        read_mmmu(answers, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=re.escape(f"no validation-*.parquet under {dataset}")):
        read_mmmu(answers, dataset)
    number = {"validation_Math_15": {"question_type": "short-answer", "ground_truth": 3.429}}
    bad = _write_answers(tmp_path / "bad_truth.json", number)
    with pytest.raises(ValueError, match=re.escape(f"{bad} question validation_Math_15: ground_truth")):
        read_mmmu(bad, dataset)
    bad = _write_answers(tmp_path / "bad_id.json", {"Math15": {"question_type": "short-answer", "ground_truth": "1"}})
    with pytest.raises(ValueError, match=re.escape(f"{bad} question Math15: the id")):
        read_mmmu(bad, dataset)
    bad = tmp_path / "not_json.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match=re.escape(f"{bad}: not a JSON file")):
        read_mmmu(bad, dataset)


def test_build_mmmu_questions_as_lmms_eval_prompts_them(tmp_path: Path) -> None:
    # lmms-eval's mmmu_val construct_prompt: question, "A. .." lines, blank line, instruction; open questions:
    # question, blank line, short-answer instruction. One image per question: the first the prompt names.
    pyarrow = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    from mambavlm.eval.scorers.multiple_choice import MMMU_OPEN_PROMPT, MMMU_PROMPT, build_mmmu_questions

    def png(color: tuple[int, int, int]) -> bytes:
        buffer = BytesIO()
        Image.new("RGB", (4, 3), color).save(buffer, format="PNG")
        return buffer.getvalue()

    red, blue = png((255, 0, 0)), png((0, 0, 255))
    table = pyarrow.table({
        "id": ["validation_Art_1", "validation_Art_2", "validation_Art_3"],
        "question": ["Which style is <image 2>?", "How many sides?", "Compare <image 1> and <image 2>."],
        "options": ["['Baroque', 'Gothic']", "[]", "['same', 'different']"],
        "question_type": ["multiple-choice", "open", "multiple-choice"],
        "image_1": [None, None, {"bytes": red, "path": "a.png"}],
        "image_2": [{"bytes": blue, "path": "b.png"}, None, {"bytes": blue, "path": "b.png"}],
    })
    (tmp_path / "MMMU" / "Art").mkdir(parents=True)
    parquet.write_table(table, tmp_path / "MMMU" / "Art" / "validation-00000-of-00001.parquet")
    out = build_mmmu_questions(tmp_path / "MMMU", tmp_path / "built")
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == [
        {"question_id": "validation_Art_1", "text": f"Which style is <image 2>?\nA. Baroque\nB. Gothic\n\n{MMMU_PROMPT}",
         "image": "images/validation_Art_1.png"},
        {"question_id": "validation_Art_2", "text": f"How many sides?\n\n{MMMU_OPEN_PROMPT}"},
        {"question_id": "validation_Art_3",
         "text": f"Compare <image 1> and <image 2>.\nA. same\nB. different\n\n{MMMU_PROMPT}",
         "image": "images/validation_Art_3.png"},
    ]
    assert (tmp_path / "built" / "images/validation_Art_1.png").read_bytes() == blue
    assert (tmp_path / "built" / "images/validation_Art_3.png").read_bytes() == red
