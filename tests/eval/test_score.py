"""eval/score.py and eval/run.py --annotations: answers JSONL + a benchmark's published files -> the
reference scorer's numbers, worked out by hand below; LLaVA's TextVQA answers found by their prompts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from mambavlm.data.synthetic import make_shapes_vqa
from mambavlm.eval.benchmarks import BENCHMARKS, AnnotationFiles, read_answers, score_answers
from tests.conftest import ROOT, tiny_vlm


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"eval_{name}", ROOT / "eval" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize(("content", "problem"), [
    (b"", "{answers} holds no answers (a run that answered nothing?)"),
    (b"\n\n", "{answers} holds no answers (a run that answered nothing?)"),
    (b'\xff\xfe{"question_id": 1000, "text": "net"}\n',
     "{answers}: not UTF-8 text (invalid start byte at byte 0): expected an answers JSONL"),
])
def test_an_empty_or_binary_answers_file_is_one_error_naming_it(
    content: bytes, problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty answers file scored 0.0 (POPE: every metric empty, overall 0.0, status 0), a UTF-16 one
    failed with "'utf-8' codec can't decode byte 0xff ...", naming no file."""
    annotations = vqav2_annotations(tmp_path)
    answers = tmp_path / "answers.jsonl"
    answers.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        script("score")(["vqav2", "--answers", str(answers), "--annotations", str(annotations)])
    assert exit_info.value.code == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].endswith("error: " + problem.format(answers=answers)), errors


def ten(*groups: tuple[str, int]) -> list[dict[str, Any]]:
    answers = [a for a, n in groups for _ in range(n)]
    assert len(answers) == 10
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i} for i, a in enumerate(answers, 1)]


def vqav2_annotations(tmp_path: Path) -> Path:
    records = [
        {"question_id": 1000, "image_id": 1, "question_type": "what is", "answer_type": "other",
         "multiple_choice_answer": "net", "answers": ten(("net", 10))},
        {"question_id": 1001, "image_id": 1, "question_type": "how many", "answer_type": "number",
         "multiple_choice_answer": "3", "answers": ten(("2", 3), ("two", 1), ("3", 6))},
    ]
    path = tmp_path / "v2_mscoco_val2014_annotations.json"
    path.write_text(json.dumps({"data_subtype": "val2014", "annotations": records}))
    return path


def test_vqav2_scored_from_the_published_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 1000: "Net." -> "net" after the official processing: 10 of 10 humans agree -> 1.0.
    # 1001: "two" -> "2" (number words become digits); 3 humans said "2": leaving out one of them
    # leaves 2 matches -> 2/3, leaving out any of the other 7 leaves 3 -> 1; (3 * 2/3 + 7) / 10 = 0.9.
    # Overall (1.0 + 0.9) / 2 = 95.0; by answer type: other 100.0, number 90.0.
    answers = write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": 1000, "prompt": "What is this?\nAnswer the question using a single word or phrase.", "text": "Net."},
        {"question_id": 1001, "prompt": "How many?\nAnswer the question using a single word or phrase.", "text": "two"},
    ])
    result = script("score")(["vqav2", "--answers", str(answers), "--annotations", str(vqav2_annotations(tmp_path))])
    assert result["overall"] == 95.0
    assert result["breakdowns"]["answer_type"] == {"number": 90.0, "other": 100.0}
    assert json.loads(capsys.readouterr().out) == result


TEXTVQA_PROMPT_SUFFIX = "\nReference OCR token: nike, sale\nAnswer the question using a single word or phrase."


def two_textvqa_questions_on_one_image(tmp_path: Path) -> Path:
    """TextVQA annotations of two questions on image img1: 34 "What brand is shown?" (10 x "nike"), 35 "What
    color is the sign?" (2 x "red", 8 x "blue")."""
    annotations = tmp_path / "TextVQA_0.5.1_val.json"
    annotations.write_text(json.dumps({"dataset_name": "textvqa", "data": [
        {"question_id": 34, "image_id": "img1", "question": "What brand is shown?", "answers": ["nike"] * 10},
        {"question_id": 35, "image_id": "img1", "question": "What color is the sign?",
         "answers": ["red"] * 2 + ["blue"] * 8},
    ]}))
    return annotations


def test_textvqa_answers_of_llavas_question_file_are_found_by_prompt(tmp_path: Path) -> None:
    # LLaVA's TextVQA question file uses the image id as question_id, so two questions on one image
    # arrive as "img1#0" and "img1#1" (read_questions); each is found by (image id, question).
    # 34: "Nike" -> "nike", 10 of 10 -> 1.0. 35: "red", 2 of 10 humans: leaving out a "red" leaves 1
    # match -> 1/3, leaving out a "blue" leaves 2 -> 2/3; (2/3 + 8 * 2/3) / 10 = 0.6. Overall 80.0.
    annotations = two_textvqa_questions_on_one_image(tmp_path)
    suffix = TEXTVQA_PROMPT_SUFFIX
    answers = write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": "img1#0", "prompt": "What brand is shown?" + suffix, "text": "Nike"},
        {"question_id": "img1#1", "prompt": "What color is the sign?" + suffix, "text": "red"},
    ])
    report = score_answers("textvqa", answers, AnnotationFiles(annotations))
    assert report.overall == 80.0
    official = write_jsonl(tmp_path / "official.jsonl", [
        {"question_id": 34, "text": "Nike"}, {"question_id": 35, "text": "red"}])
    assert score_answers("textvqa", official, AnnotationFiles(annotations)).overall == 80.0
    stray = write_jsonl(tmp_path / "stray.jsonl", [{"question_id": "img1#2", "prompt": "Who?" + suffix, "text": "x"}])
    with pytest.raises(ValueError, match="no question 'who\\?' on image img1"):
        score_answers("textvqa", stray, AnnotationFiles(annotations))


def test_llavas_own_textvqa_answers_repeating_the_image_id_are_scored(tmp_path: Path) -> None:
    """LLaVA's model_vqa_loader writes the question file's id, the image's, for both questions of an image
    (its eval_textvqa.py matches them by prompt): such a file was refused ("question_id img1 repeated").
    Hand-worked as in the test above: "Nike" 1.0, "red" against 2 of 10 humans 0.6, overall 80.0. The same
    id with the same prompt twice is still a repeat, and so is any repeat outside TextVQA."""
    annotations = two_textvqa_questions_on_one_image(tmp_path)
    suffix = TEXTVQA_PROMPT_SUFFIX
    llava = [{"question_id": "img1", "prompt": "What color is the sign?" + suffix, "text": "red", "answer_id": "a",
              "model_id": "llava-v1.5-7b", "metadata": {}},
             {"question_id": "img1", "prompt": "What brand is shown?" + suffix, "text": "Nike", "answer_id": "b",
              "model_id": "llava-v1.5-7b", "metadata": {}}]
    answers = write_jsonl(tmp_path / "llava_answers.jsonl", llava)
    result = script("score")(["textvqa", "--answers", str(answers), "--annotations", str(annotations)])
    assert (result["overall"], result["counts"]) == (80.0, {"questions": 2, "missing": 0})
    assert [row["question_id"] for row in read_answers(answers, by_prompt=True)] == ["img1#0", "img1#1"]
    with pytest.raises(ValueError, match=r"llava_answers.jsonl: line 2: question_id img1 repeated$"):
        read_answers(answers)  # any other benchmark: no prompt-matching scorer to tell them apart
    twice = write_jsonl(tmp_path / "twice.jsonl", [llava[0], {**llava[0], "text": "blue"}])
    with pytest.raises(ValueError, match=r"twice.jsonl: line 2: question_id img1 repeated with the same prompt$"):
        read_answers(twice, by_prompt=True)


def test_tallyqa_letters_are_the_options_counts(tmp_path: Path) -> None:
    # The multiple-choice prompt lists "A. 0" .. "P. 15": "C" is 2, "(D)" is 3, "1" parses as 1.
    # q1 (simple, 2): "C" right; q2 (complex, 3): "(D)." right; q3 (simple, 4): "1" wrong -> 2 of 3.
    annotations = tmp_path / "test.json"
    annotations.write_text(json.dumps([
        {"image": "VG_100K/1.jpg", "answer": 2, "data_source": "amt", "question": "How many dogs?",
         "image_id": 1, "question_id": 1, "issimple": True},
        {"image": "VG_100K/2.jpg", "answer": 3, "data_source": "amt", "question": "How many red cars?",
         "image_id": 2, "question_id": 2, "issimple": False},
        {"image": "VG_100K/3.jpg", "answer": 4, "data_source": "amt", "question": "How many cats?",
         "image_id": 3, "question_id": 3, "issimple": True},
    ]))
    answers = write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": 1, "text": "C"}, {"question_id": 2, "text": "(D)."}, {"question_id": 3, "text": "1"}])
    report = score_answers("tallyqa", answers, AnnotationFiles(annotations))
    assert report.overall == 66.7  # printed to one decimal, as the harness does
    assert report.to_json()["breakdowns"] == {"split": {"complex": 100.0, "simple": 50.0}}


def test_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    annotations = vqav2_annotations(tmp_path)
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"question_id": 999, "text": "net"}])
    with pytest.raises(SystemExit) as exit_info:
        script("score")(["vqav2", "--answers", str(unknown), "--annotations", str(annotations)])
    assert exit_info.value.code == 2 and "999" in capsys.readouterr().err
    with pytest.raises(ValueError, match="scienceqa needs --split-file"):
        score_answers("scienceqa", unknown, AnnotationFiles(tmp_path / "problems.json"))
    (tmp_path / "bad.jsonl").write_text('{"question_id": 1000, "text": "net"}\n{"question_id": 1000, "text": "x"}\n')
    with pytest.raises(ValueError, match="line 2: question_id 1000 repeated"):
        read_answers(tmp_path / "bad.jsonl")
    assert set(BENCHMARKS) == {"vqav2", "textvqa", "vizwiz", "gqa", "pope", "scienceqa", "mme", "mmbench",
                               "seedbench", "mmmu", "tallyqa", "vsr"}


def test_run_with_annotations_writes_scores_and_rejects_a_wrong_file_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A POPE run end to end with the tiny model: questions in LLaVA's layout, labels in POPE's, scored
    # into results.json equal to eval/score.py on the written answers.
    tiny_vlm().save_pretrained(tmp_path / "model")
    _, val = make_shapes_vqa(tmp_path / "data", 0, 4, image_size=32)
    records = json.loads(val.read_text())
    labels = tmp_path / "coco_pope_random.json"
    write_jsonl(labels, [{"question_id": i + 1, "image": r["image"], "text": "Is there a red circle in the image?",
                          "label": "yes" if i % 2 else "no"} for i, r in enumerate(records)])
    questions = write_jsonl(tmp_path / "data" / "llava_pope_test.jsonl", [
        {"question_id": 10_000_000 + i + 1, "image": r["image"],
         "text": "Is there a red circle in the image?\nAnswer the question using a single word or phrase."}
        for i, r in enumerate(records)])
    common = ["--model", str(tmp_path / "model"), "--benchmark", "pope", "--data", str(questions),
              "--batch-size", "2", "--max-new-tokens", "3"]
    with pytest.raises(SystemExit) as exit_info:
        script("run")(common + ["--output-dir", str(tmp_path / "wrong"), "--annotations", str(tmp_path / "nope.json")])
    assert exit_info.value.code == 2 and "POPE label file or directory not found" in capsys.readouterr().err
    assert not (tmp_path / "wrong" / "answers.jsonl").exists()
    results = script("run")(common + ["--output-dir", str(tmp_path / "out"), "--annotations", str(labels)])
    expected = score_answers("pope", tmp_path / "out" / "answers.jsonl", AnnotationFiles(labels)).to_json()
    assert results["scores"] == expected and results["scores"]["counts"]["random"] == 4
    assert results["baseline_prompt"] == "Answer the question using a single word or phrase."
    assert json.loads((tmp_path / "out" / "results.json").read_text())["scores"] == expected


def test_likelihood_rows_are_scored_by_the_likelihood_scorer(tmp_path: Path) -> None:
    # VSR by likelihood (Prismatic's VSRScorer): argmax of {"True", "False"}. Labels: 0 true, 1 false,
    # 2 true; argmaxes True, True, False -> 1 of 3 right = 33.3; always-true baseline 2 of 3 = 66.7.
    annotations = tmp_path / "test.jsonl"
    write_jsonl(annotations, [
        {"image": f"{i}.jpg", "image_link": "", "caption": "The cat is on the mat.", "label": label, "relation": "on"}
        for i, label in enumerate([1, 0, 1])])
    answers = write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": "0", "text": "True", "option_logprobs": {"True": -0.1, "False": -2.4}},
        {"question_id": "1", "text": "True", "option_logprobs": {"True": -0.5, "False": -0.9}},
        {"question_id": "2", "text": "False", "option_logprobs": {"True": -1.2, "False": -0.4}},
    ])
    report = score_answers("vsr", answers, AnnotationFiles(annotations))
    assert (report.overall, report.breakdowns["baseline"]["always_true"]) == (33.3, 66.7)
    with pytest.raises(ValueError, match="gqa has no likelihood scorer"):
        score_answers("gqa", answers, AnnotationFiles(annotations))


def test_run_in_likelihood_mode_answers_with_the_options_logprobs(tmp_path: Path) -> None:
    # TallyQA questions built from the published layout, answered by likelihood over the letters A..P
    # with the tiny model, scored by Prismatic's rule; each row equals option_logprobs of its question.
    model = tiny_vlm(seed=4)
    model.save_pretrained(tmp_path / "model")
    _, val = make_shapes_vqa(tmp_path / "data", 0, 3, image_size=32)
    records = json.loads(val.read_text())
    annotations = tmp_path / "data" / "test.json"
    annotations.write_text(json.dumps([
        {"image": r["image"], "answer": i, "data_source": "amt", "question": "How many objects are there?",
         "image_id": i, "question_id": 100 + i, "issimple": i != 1}
        for i, r in enumerate(records)]))
    from mambavlm.eval.scorers.closed_set import build_tallyqa_questions

    questions = build_tallyqa_questions(annotations, tmp_path / "data" / "tallyqa.jsonl")
    out = tmp_path / "out"
    results = script("run")(["--model", str(tmp_path / "model"), "--benchmark", "tallyqa", "--data", str(questions),
                             "--output-dir", str(out), "--batch-size", "2", "--mode", "likelihood",
                             "--annotations", str(annotations)])
    rows = read_answers(out / "answers.jsonl")
    assert [r["question_id"] for r in rows] == ["100", "101", "102"]
    lines = [json.loads(line) for line in questions.read_text().splitlines()]
    from PIL import Image

    for row, line in zip(rows, lines):
        expected = model.option_logprobs([Image.open(questions.parent / line["image"])], [line["text"]],
                                         list(BENCHMARKS["tallyqa"].likelihood_options))[0]
        assert list(row["option_logprobs"]) == list(expected)
        assert row["option_logprobs"] == pytest.approx(expected, abs=1e-5)
        assert row["text"] == max(expected, key=expected.get)
    assert results["decoding"]["mode"] == "likelihood" and results["scores"]["counts"]["items"] == 3
    assert results["scores"] == score_answers("tallyqa", out / "answers.jsonl", AnnotationFiles(annotations)).to_json()


def test_scienceqa_questions_from_llavas_file_then_scored_against_problems_json(tmp_path: Path) -> None:
    # LLaVA's llava_test_CQM-A.json -> our question JSONL (model_vqa_science.py's prompt), then answers
    # scored against problems.json + pid_splits.json. Image problems 5 (answer B) and 7 (answer A); 6 has
    # no image. Answers: 5 "B" right, 7 "The answer is C." wrong, 6 "A" (not an image problem, not
    # counted) -> IMG accuracy 1 of 2 = 50.0.
    from mambavlm.eval.questions import read_questions
    from mambavlm.eval.scorers.scienceqa import SCIENCEQA_PROMPT, build_scienceqa_questions

    llava = tmp_path / "llava_test_CQM-A.json"
    llava.write_text(json.dumps([
        {"id": "5", "image": "5/image.png", "conversations": [
            {"from": "human", "value": "<image>\nContext: A bar magnet.\nWhich pole is north?\nA. left\nB. right"},
            {"from": "gpt", "value": "B"}]},
        {"id": "6", "conversations": [{"from": "human", "value": "Which word is a noun?\nA. run\nB. dog"},
                                      {"from": "gpt", "value": "B"}]},
        {"id": "7", "image": "7/image.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?\nA. a cell\nB. a rock\nC. a leaf"}]},
    ]))
    questions_path = build_scienceqa_questions(llava, tmp_path / "sqa.jsonl")
    questions, problems = read_questions(questions_path, image_root=tmp_path)
    assert problems == []
    assert [(q.question_id, q.image, q.text) for q in questions] == [
        ("5", tmp_path / "5/image.png",
         f"Context: A bar magnet.\nWhich pole is north?\nA. left\nB. right\n{SCIENCEQA_PROMPT}"),
        ("6", None, f"Which word is a noun?\nA. run\nB. dog\n{SCIENCEQA_PROMPT}"),
        ("7", tmp_path / "7/image.png", f"What is shown?\nA. a cell\nB. a rock\nC. a leaf\n{SCIENCEQA_PROMPT}"),
    ]

    def problem(choices: list[str], answer: int, image: str | None, subject: str) -> dict[str, Any]:
        return {"question": "q", "choices": choices, "answer": answer, "hint": "", "image": image,
                "task": "closed choice", "grade": "grade4", "subject": subject, "topic": "t", "category": "c",
                "skill": "s", "lecture": "", "solution": "", "split": "test"}

    (tmp_path / "problems.json").write_text(json.dumps({
        "5": problem(["left", "right"], 1, "image.png", "natural science"),
        "6": problem(["run", "dog"], 1, None, "language science"),
        "7": problem(["a cell", "a rock", "a leaf"], 0, "image.png", "natural science"),
    }))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["5", "6", "7"], "train": []}))
    answers = write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": "5", "text": "B"}, {"question_id": "6", "text": "A"},
        {"question_id": "7", "text": "The answer is C."}])
    files = AnnotationFiles(tmp_path / "problems.json", split_file=tmp_path / "pid_splits.json")
    assert score_answers("scienceqa", answers, files).overall == 50.0
    (tmp_path / "bad.json").write_text(json.dumps([{"id": "9", "conversations": [{"from": "gpt", "value": "x"}]}]))
    with pytest.raises(ValueError, match=r"record 0 \(id 9\): the first turn must be the human's"):
        build_scienceqa_questions(tmp_path / "bad.json", tmp_path / "bad.jsonl")


def test_submission_files_for_the_test_servers(tmp_path: Path) -> None:
    # LLaVA's convert_vqav2_for_submission.py: every test2015 question, "" where test-dev has no answer,
    # answers through the EvalAI processor ("Two dogs." -> "2 dogs"); VizWiz: image + answer, all required.
    questions = write_jsonl(tmp_path / "test2015.jsonl", [
        {"question_id": 7, "image": "a.jpg", "text": "How many?"}, {"question_id": 8, "image": "b.jpg", "text": "?"}])
    answers = write_jsonl(tmp_path / "answers.jsonl", [{"question_id": 7, "text": "Two dogs."}])
    out = script("submission")(["vqav2", "--answers", str(answers), "--questions", str(questions),
                                "--out", str(tmp_path / "up.json")])
    assert json.loads(out.read_text()) == [{"question_id": 7, "answer": "2 dogs"}, {"question_id": 8, "answer": ""}]
    with pytest.raises(SystemExit):
        script("submission")(["vizwiz", "--answers", str(answers), "--questions", str(questions),
                              "--out", str(tmp_path / "vw.json")])
    full = write_jsonl(tmp_path / "full.jsonl", [{"question_id": 7, "text": "Unanswerable"},
                                                 {"question_id": 8, "text": "It's red, I think."}])
    out = script("submission")(["vizwiz", "--answers", str(full), "--questions", str(questions),
                                "--out", str(tmp_path / "vw.json")])
    assert json.loads(out.read_text()) == [{"image": "a.jpg", "answer": "unanswerable"},
                                           {"image": "b.jpg", "answer": "it 's red i think"}]  # mmf's word_tokenize splits "'s"


@pytest.mark.parametrize("benchmark", ["vqav2", "vizwiz"])
def test_a_submission_of_answers_to_other_questions_is_refused(benchmark: str, tmp_path: Path, capsys) -> None:
    """Answers of another benchmark (POPE's ids) given with the VQAv2 test questions: the upload held every
    question with the answer "" and the script said "wrote 2 answers", rc 0. Now one error line naming the
    answers not among the questions, and no file."""
    questions = write_jsonl(tmp_path / "test2015.jsonl", [
        {"question_id": 7, "image": "a.jpg", "text": "How many?"}, {"question_id": 8, "image": "b.jpg", "text": "?"}])
    answers = write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": 7, "text": "two"}, {"question_id": 8, "text": "no"},
        *({"question_id": qid, "text": "yes"} for qid in (1, 2, 3, 10000001, 10000002, 10000003))])
    out = tmp_path / "up.json"
    with pytest.raises(SystemExit) as exit_info:
        script("submission")([benchmark, "--answers", str(answers), "--questions", str(questions), "--out", str(out)])
    assert exit_info.value.code == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].endswith(
        f" error: {benchmark}: {answers} has answers for 6 questions not in {questions}: "
        "1, 2, 3, 10000001, 10000002 and 1 more"), errors
    assert not out.exists()


def test_a_submission_question_file_error_names_the_file(tmp_path: Path, capsys) -> None:
    """The official questions JSON given as --questions: "question line 1: missing field 'question_id'"."""
    questions = tmp_path / "v2_OpenEnded_mscoco_test2015_questions.json"
    questions.write_text(json.dumps({"questions": [{"question_id": 7, "image_id": 1, "question": "How many?"}]}))
    answers = write_jsonl(tmp_path / "answers.jsonl", [{"question_id": 7, "text": "two"}])
    with pytest.raises(SystemExit):
        script("submission")(["vqav2", "--answers", str(answers), "--questions", str(questions),
                              "--out", str(tmp_path / "up.json")])
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].endswith(f" error: {questions}: line 1: missing field 'question_id'"), errors
