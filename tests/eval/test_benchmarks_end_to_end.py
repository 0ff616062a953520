"""Every benchmark end to end: a mini benchmark in its published annotation layout, the question JSONL a user
would run (LLaVA-1.5's file, or the one our builder writes from the official file, with the ids the README's
table gives), images on disk, answered by the tiny model through ``eval/run.py --annotations`` and scored.

The scores themselves come from a random tiny model; what is checked is that question file, published files,
runner and scorer compose: every question answered, every one scored (none missing), and the scores in
results.json equal to ``score_answers`` on the written answers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mambavlm.eval.benchmarks import AnnotationFiles, score_answers
from mambavlm.eval.scorers.closed_set import build_tallyqa_questions, build_vsr_questions
from mambavlm.eval.scorers.gqa import GQA_PROMPT
from mambavlm.eval.scorers.mme import build_mme_questions
from mambavlm.eval.scorers.multiple_choice import SEED_PROMPT, build_mmbench_questions
from mambavlm.eval.scorers.pope import POPE_PROMPT, POPE_QUESTION_ID_OFFSETS
from mambavlm.eval.scorers.scienceqa import build_scienceqa_questions
from mambavlm.eval.scorers.vqa import TEXTVQA_PROMPT, VIZWIZ_PROMPT, VQAV2_PROMPT
from tests.conftest import tiny_vlm
from tests.eval.test_readers_closed_set import TALLYQA_TEST, VSR_LINES, _write_json, _write_lines
from tests.eval.test_readers_gqa_pope_sqa import gqa_file, pope_dir, sqa_files
from tests.eval.test_readers_mme_mc import (
    MMMU_ANSWERS,
    _encoded,
    _mmbench_rows,
    _mme_release,
    _seed_question,
    _write_answers,
    _write_mmmu_dataset,
    _write_seed,
    _write_tsv,
)
from tests.eval.test_readers_vqa import textvqa_file, vizwiz_file, vqav2_files
from tests.eval.test_score import script, write_jsonl


@dataclass(frozen=True)
class MiniBenchmark:
    """What a user runs: ``eval/run.py --benchmark name --data questions [--image-folder images]
    --annotations files ...``; ``scored_key``: the scorer's count that must equal ``scored`` (the questions
    it scores: all of them, or the subset the reference scores), next to ``counts["missing"] == 0``."""

    name: str
    questions: Path
    images: Path
    files: AnnotationFiles
    num_questions: int
    scored_key: str
    scored: int
    extra_args: list[str] = field(default_factory=list)


def _image(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> None:
    """A small RGB image at ``path``, in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 24), color).save(path)


def _images(root: Path, questions: Path) -> None:
    """Write an image for every question of a question JSONL that names one."""
    for line in questions.read_text().splitlines():
        image = json.loads(line).get("image")
        if image:
            _image(root / image)


def _vqav2(tmp_path: Path) -> MiniBenchmark:
    # llava_vqav2 layout on val: the official question ids, COCO file names, LLaVA's suffix.
    annotations, official_questions = vqav2_files(tmp_path)
    records = json.loads(official_questions.read_text())["questions"]
    questions = write_jsonl(tmp_path / "llava_vqav2_val.jsonl", [
        {"question_id": r["question_id"], "image": f"COCO_val2014_{r['image_id']:012d}.jpg",
         "text": f"{r['question']}\n{VQAV2_PROMPT}"} for r in records])
    images = tmp_path / "val2014"
    _images(images, questions)
    return MiniBenchmark("vqav2", questions, images, AnnotationFiles(annotations, official_questions), 3,
                         "questions", 3)


def _textvqa(tmp_path: Path) -> MiniBenchmark:
    # llava_textvqa_val_v051_ocr.jsonl: question_id is the image id (repeated for two questions on one image).
    annotations = textvqa_file(tmp_path)
    records = json.loads(annotations.read_text())["data"]
    questions = write_jsonl(tmp_path / "llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": r["image_id"], "image": f"{r['image_id']}.jpg",
         "text": f"{r['question'].capitalize()}\nReference OCR token: A, B\n{TEXTVQA_PROMPT}"} for r in records])
    images = tmp_path / "train_images"
    _images(images, questions)
    return MiniBenchmark("textvqa", questions, images, AnnotationFiles(annotations), 4, "questions", 4)


def _vizwiz(tmp_path: Path) -> MiniBenchmark:
    # llava_test.jsonl's layout on val: the id is the position in the file.
    annotations = vizwiz_file(tmp_path)
    records = json.loads(annotations.read_text())
    questions = write_jsonl(tmp_path / "llava_val.jsonl", [
        {"question_id": i, "image": r["image"], "text": f"{r['question']}\n{VIZWIZ_PROMPT}"}
        for i, r in enumerate(records)])
    images = tmp_path / "val"
    _images(images, questions)
    return MiniBenchmark("vizwiz", questions, images, AnnotationFiles(annotations), 3, "questions", 3)


def _gqa(tmp_path: Path) -> MiniBenchmark:
    # llava_gqa_testdev_balanced.jsonl: the balanced questions, keyed by GQA's question id.
    annotations = gqa_file(tmp_path)
    records = json.loads(annotations.read_text())
    questions = write_jsonl(tmp_path / "llava_gqa_testdev_balanced.jsonl", [
        {"question_id": qid, "image": f"{r['imageId']}.jpg", "text": f"{r['question']}\n{GQA_PROMPT}"}
        for qid, r in records.items() if r["isBalanced"]])
    images = tmp_path / "images"
    _images(images, questions)
    return MiniBenchmark("gqa", questions, images, AnnotationFiles(annotations), 3, "questions", 3)


def _pope(tmp_path: Path) -> MiniBenchmark:
    # llava_pope_test.jsonl: each split's label-file question, its id plus LLaVA's offset for the split.
    labels = pope_dir(tmp_path)
    rows = []
    for split in ("adversarial", "random"):
        for line in (labels / f"coco_pope_{split}.json").read_text().splitlines():
            record = json.loads(line)
            rows.append({"question_id": POPE_QUESTION_ID_OFFSETS[split] + record["question_id"],
                         "image": record["image"], "text": f"{record['text']}\n{POPE_PROMPT}"})
    questions = write_jsonl(tmp_path / "llava_pope_test.jsonl", rows)
    images = tmp_path / "val2014"
    _images(images, questions)
    return MiniBenchmark("pope", questions, images, AnnotationFiles(labels), 5, "scored", 5)


def _scienceqa(tmp_path: Path) -> MiniBenchmark:
    # llava_test_CQM-A.json as LLaVA's convert_sqa_to_llava.py writes it, then our builder; images under test/.
    problems_path, splits_path = sqa_files(tmp_path)
    problems = json.loads(problems_path.read_text())
    records = []
    for pid in json.loads(splits_path.read_text())["test"]:
        problem = problems[pid]
        options = " ".join(f"({'ABCDE'[i]}) {choice}" for i, choice in enumerate(problem["choices"]))
        value = f"Context: {problem['hint'] or 'N/A'}\n{problem['question']}\nOptions: {options}"
        record: dict[str, Any] = {"id": pid, "conversations": [
            {"from": "human", "value": value}, {"from": "gpt", "value": "LECTURE: \nSOLUTION: \nANSWER: A."}]}
        if problem["image"]:
            record["image"] = f"{pid}/{problem['image']}"
            record["conversations"][0]["value"] = f"<image>\n{value}"
        records.append(record)
    questions = build_scienceqa_questions(_write_json(tmp_path / "llava_test_CQM-A.json", records),
                                          tmp_path / "scienceqa.jsonl")
    images = tmp_path / "images" / "test"
    _images(images, questions)
    # Problems 5 and 11 have an image: the IMG subset the reference scores; 4 and 15 are answered, not scored.
    return MiniBenchmark("scienceqa", questions, images, AnnotationFiles(problems_path, split_file=splits_path), 4,
                         "scored", 2)


def _mme(tmp_path: Path) -> MiniBenchmark:
    release = _mme_release(tmp_path)
    questions = build_mme_questions(release, tmp_path / "llava_mme.jsonl")
    return MiniBenchmark("mme", questions, release, AnnotationFiles(release), 8, "questions", 8)


def _mmbench(tmp_path: Path) -> MiniBenchmark:
    tsv = _write_tsv(tmp_path / "mmbench_dev_20230712.tsv",
                     _mmbench_rows(_encoded((255, 0, 0), "PNG"), _encoded((10, 120, 240), "JPEG")))
    questions = build_mmbench_questions(tsv, tmp_path / "mmbench")
    return MiniBenchmark("mmbench", questions, questions.parent, AnnotationFiles(tsv), 4, "passes", 4)


def _seedbench(tmp_path: Path) -> MiniBenchmark:
    # llava-seed-bench.jsonl holds the video questions too (a middle frame as image); only image ones are scored.
    records = [
        _seed_question(101669, "A", 5),
        _seed_question(101670, "C", 5),
        _seed_question("1_3021", "D", 10, data_type="video"),
    ]
    annotations = _write_seed(tmp_path / "SEED-Bench.json", records)
    folders = {"image": "SEED-Bench-image", "video": "SEED-Bench-video-image"}
    questions = write_jsonl(tmp_path / "llava-seed-bench.jsonl", [
        {"question_id": r["question_id"], "image": f"{folders[r['data_type']]}/{r['data_id']}.jpg",
         "text": f"{r['question']}\nA. {r['choice_a']}\nB. {r['choice_b']}\nC. {r['choice_c']}\nD. {r['choice_d']}"
                 f"\n{SEED_PROMPT}"} for r in records])
    _images(tmp_path, questions)
    return MiniBenchmark("seedbench", questions, tmp_path, AnnotationFiles(annotations), 3, "questions", 2)


def _mmmu(tmp_path: Path) -> MiniBenchmark:
    pytest.importorskip("pyarrow")
    dataset = _write_mmmu_dataset(tmp_path / "MMMU")
    answers = _write_answers(tmp_path / "answer_dict_val.json", MMMU_ANSWERS)
    questions = write_jsonl(tmp_path / "mmmu.jsonl", [
        {"question_id": qid, "image": f"{qid}.png", "text": "Which one is it?\nAnswer with the option's letter."}
        for qid in MMMU_ANSWERS])
    _images(tmp_path, questions)
    return MiniBenchmark("mmmu", questions, tmp_path, AnnotationFiles(answers, dataset), 3, "questions", 3)


def _tallyqa(tmp_path: Path, *extra_args: str) -> MiniBenchmark:
    annotations = _write_json(tmp_path / "test.json", TALLYQA_TEST)
    questions = build_tallyqa_questions(annotations, tmp_path / "tallyqa.jsonl")
    _images(tmp_path, questions)
    return MiniBenchmark("tallyqa", questions, tmp_path, AnnotationFiles(annotations), 3, "scored", 3,
                         list(extra_args))


def _vsr(tmp_path: Path, *extra_args: str) -> MiniBenchmark:
    annotations = _write_lines(tmp_path / "test.jsonl", VSR_LINES)
    questions = build_vsr_questions(annotations, tmp_path / "vsr.jsonl")
    images = tmp_path / "vsr_images"
    _images(images, questions)
    return MiniBenchmark("vsr", questions, images, AnnotationFiles(annotations), 4, "scored", 4, list(extra_args))


MINI_BENCHMARKS: dict[str, Callable[[Path], MiniBenchmark]] = {
    "vqav2": _vqav2,
    "textvqa": _textvqa,
    "vizwiz": _vizwiz,
    "gqa": _gqa,
    "pope": _pope,
    "scienceqa": _scienceqa,
    "mme": _mme,
    "mmbench": _mmbench,
    "seedbench": _seedbench,
    "mmmu": _mmmu,
    "tallyqa": _tallyqa,
    "tallyqa-likelihood": lambda tmp_path: _tallyqa(tmp_path, "--mode", "likelihood"),
    "vsr": _vsr,
    "vsr-likelihood": lambda tmp_path: _vsr(tmp_path, "--mode", "likelihood"),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model saved once for the module."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_vlm().save_pretrained(path)
    return path


@pytest.mark.parametrize("case", list(MINI_BENCHMARKS))
def test_benchmark_questions_run_and_score(case: str, model_dir: Path, tmp_path: Path) -> None:
    mini = MINI_BENCHMARKS[case](tmp_path)
    out = tmp_path / "out"
    args = ["--model", str(model_dir), "--benchmark", mini.name, "--data", str(mini.questions),
            "--image-folder", str(mini.images), "--output-dir", str(out), "--batch-size", "2",
            "--max-new-tokens", "3", "--annotations", str(mini.files.annotations), *mini.extra_args]
    if mini.files.questions is not None:
        args += ["--annotation-questions", str(mini.files.questions)]
    if mini.files.split_file is not None:
        args += ["--split-file", str(mini.files.split_file)]
    results = script("run")(args)
    assert results["num_questions"] == results["num_answered"] == mini.num_questions, results["skipped_by_reason"]
    assert results["num_skipped"] == results["num_missing"] == 0
    assert results["scores"] == score_answers(mini.name, out / "answers.jsonl", mini.files).to_json()
    counts = results["scores"]["counts"]
    assert counts["missing"] == 0 and counts[mini.scored_key] == mini.scored, counts
    assert json.loads((out / "results.json").read_text())["scores"] == results["scores"]


def _run_args(mini: MiniBenchmark, model_dir: Path, out: Path, *extra: str, annotations: bool = True) -> list[str]:
    """eval/run.py's command line for ``mini`` (with its annotation files unless ``annotations`` is False)."""
    args = ["--model", str(model_dir), "--benchmark", mini.name, "--data", str(mini.questions),
            "--image-folder", str(mini.images), "--output-dir", str(out), "--batch-size", "2",
            "--max-new-tokens", "3", *mini.extra_args, *extra]
    if annotations:
        args += ["--annotations", str(mini.files.annotations)]
        if mini.files.questions is not None:
            args += ["--annotation-questions", str(mini.files.questions)]
        if mini.files.split_file is not None:
            args += ["--split-file", str(mini.files.split_file)]
    return args


def test_likelihood_mode_without_a_likelihood_scorer_is_refused_before_answering(
    model_dir: Path, tmp_path: Path, capsys
) -> None:
    """gqa --mode likelihood --annotations answered every question, then failed scoring with a traceback."""
    mini = _gqa(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        script("run")(_run_args(mini, model_dir, out, "--mode", "likelihood", "--options", "yes,no"))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    assert "gqa has no likelihood scorer, so --mode likelihood answers cannot be scored with --annotations" in errors[0]
    assert "drop --annotations to answer it unscored (benchmarks with one: tallyqa, vsr)" in errors[0]
    assert not out.exists()  # refused before anything was answered or written


def test_a_run_again_without_annotations_scores_against_the_recorded_files(
    model_dir: Path, tmp_path: Path, caplog, capsys
) -> None:
    """Run again without --annotations ("0 of 3 questions to answer"), a scored run keeps its scores: the
    files results.json recorded score the answers again; where they cannot be read now, a one-line error
    and results.json left as it was."""
    mini = _gqa(tmp_path)
    out = tmp_path / "out"
    first = script("run")(_run_args(mini, model_dir, out))
    assert first["annotations"] == {"annotations": str(mini.files.annotations.resolve())}
    caplog.clear()
    with caplog.at_level("INFO"):
        again = script("run")(_run_args(mini, model_dir, out, annotations=False))
    assert "0 of 3 questions to answer" in caplog.text
    assert f"no --annotations: scoring against the files {out / 'results.json'} records" in caplog.text
    assert again["scores"] == first["scores"] and again["annotations"] == first["annotations"]
    assert json.loads((out / "results.json").read_text())["scores"] == first["scores"]
    mini.files.annotations.rename(tmp_path / "moved.json")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        script("run")(_run_args(mini, model_dir, out, annotations=False))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    assert f"(the earlier run was scored against it, as {out / 'results.json'} records; pass --annotations" in errors[0]
    assert json.loads((out / "results.json").read_text())["scores"] == first["scores"]


@pytest.mark.parametrize(
    ("case", "questions", "missing"),
    [
        ("gqa", 1, 0),
        ("textvqa", 1, 0),  # LLaVA's ids (the image's) found through the prompt
        ("mme", 2, 1),  # an image's pair is scored together (acc+): the one not asked counts as missing
    ],
)
def test_a_limited_run_scores_the_asked_questions_only(
    case: str, questions: int, missing: int, model_dir: Path, tmp_path: Path
) -> None:
    """--limit 1: the scores cover the question asked, not the others counted as missing and wrong; results.json
    says what the scores cover and how many questions were not asked."""
    mini = MINI_BENCHMARKS[case](tmp_path)
    out = tmp_path / "out"
    results = script("run")(_run_args(mini, model_dir, out, "--limit", "1"))
    assert (results["num_answered"], results["num_missing"], results["limit"]) == (1, 0, 1)
    assert results["num_not_asked"] == mini.num_questions - 1
    counts = results["scores"]["counts"]
    assert (counts["questions"], counts["missing"]) == (questions, missing), counts
    assert results["scores_cover"].startswith(
        f"the 1 questions asked (--limit 1: {mini.num_questions - 1} more questions in {mini.questions} not asked")
    if case == "gqa":  # the same as scoring against annotations holding only the question asked
        asked = json.loads(mini.questions.read_text().splitlines()[0])["question_id"]
        whole = json.loads(mini.files.annotations.read_text())
        one = _write_json(tmp_path / "one.json", {asked: whole[asked]})
        assert results["scores"] == score_answers("gqa", out / "answers.jsonl", AnnotationFiles(one)).to_json()
    full = script("run")(_run_args(mini, model_dir, out))  # the rest answered: every question scored again
    assert full["num_not_asked"] == 0 and full["scores"]["counts"]["missing"] == 0
    assert full["scores_cover"].startswith("every question in the annotation files")


@pytest.mark.parametrize("case", ["other-benchmark", "repeated-id", "textvqa-unknown-question"])
def test_questions_the_annotations_do_not_hold_are_refused_before_answering(
    case: str, model_dir: Path, tmp_path: Path, capsys
) -> None:
    """POPE's question file run as VQAv2, a VQAv2 question repeated (read as ID#0 / ID#1), and a TextVQA
    question on LLaVA's file that the annotations do not ask: every question was answered, then scoring
    stopped with a ValueError traceback and no results.json. Now one error line before any answer."""
    if case == "other-benchmark":
        mini = _vqav2(tmp_path)
        (tmp_path / "pope").mkdir()
        pope = _pope(tmp_path / "pope")
        mini = MiniBenchmark(mini.name, pope.questions, pope.images, mini.files, 5, "questions", 3)
        named = "asks for 5 questions not in {where}: 1, 2, 3, 10000001, 10000002 ("
    elif case == "repeated-id":
        mini = _vqav2(tmp_path)
        lines = mini.questions.read_text().splitlines()
        mini.questions.write_text("\n".join([*lines, lines[0]]) + "\n")
        qid = json.loads(lines[0])["question_id"]
        named = f"asks for 2 questions not in {{where}}: {qid}#0, {qid}#1 ("
    else:
        mini = _textvqa(tmp_path)
        row = json.loads(mini.questions.read_text().splitlines()[0])
        row["text"] = row["text"].replace("What is the brand", "What is the colour")
        with mini.questions.open("a") as f:
            f.write(json.dumps(row) + "\n")
        named = f"asks for 1 questions not in {{where}}: {row['question_id']}#1 ("
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        script("run")(_run_args(mini, model_dir, out))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    assert f"{mini.name}: {mini.questions} " + named.format(where=mini.files.annotations) in errors[0], errors[0]
    assert errors[0].endswith("their answers could not be scored; nothing answered")
    assert not out.exists()


@pytest.mark.parametrize("script_name", ["score", "run"])
def test_an_annotation_file_the_benchmark_does_not_read_is_refused(
    script_name: str, model_dir: Path, tmp_path: Path, capsys
) -> None:
    """POPE given ScienceQA's --split-file: passed over unread, and recorded in results.json's
    ``annotations`` as a file the scores were computed against."""
    mini = _pope(tmp_path)
    split_file = tmp_path / "pid_splits.json"
    split_file.write_text('{"test": []}')
    out = tmp_path / "out"
    if script_name == "run":
        argv = [*_run_args(mini, model_dir, out), "--split-file", str(split_file)]
    else:
        answers = write_jsonl(tmp_path / "answers.jsonl", [{"question_id": 1, "text": "yes"}])
        argv = ["pope", "--answers", str(answers), "--annotations", str(mini.files.annotations),
                "--split-file", str(split_file)]
    with pytest.raises(SystemExit) as exit_info:
        script(script_name)(argv)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].endswith(
        f"error: pope reads no split file ({split_file} given): it is scored against "
        "coco_pope_{random,popular,adversarial}.json, or their folder"), errors
    assert not out.exists()


def test_a_split_file_without_annotations_is_refused(model_dir: Path, tmp_path: Path, capsys) -> None:
    """ScienceQA run with --split-file but no --annotations: answered, unscored, the split file passed over."""
    mini = _scienceqa(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        script("run")([*_run_args(mini, model_dir, out, annotations=False), "--split-file", str(mini.files.split_file)])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].endswith(
        "error: --split-file goes with --annotations (the benchmark's published file to score against): give both"), errors
    assert not out.exists()
