"""score_answers (eval/score.py, eval/run.py --annotations) refuses answers whose question ids the annotation
files do not hold, for every benchmark and both answer modes, naming the benchmark, the answers file, how many,
the first five ids and the files; answers whose ids the files do hold score as they did before the check.

Each benchmark's files are the mini benchmarks of ``test_benchmarks_end_to_end`` (hand-made files in the
published layouts). The matching answers are one per question the files hold, their texts (likelihood: the
likeliest option) cycling through a fixed list, so that each benchmark gets some right and some wrong; the
expected numbers in ``MATCHING`` are what ``score_answers`` returned for exactly these answers before unknown
ids were refused (the same tests run on the code without the check), so they prove the check changes no
number of answers that match. The one count that differs is SEED-Bench's ``skipped_not_image``: its video
question, read now, is counted there (before, the reader dropped it and its answer was ignored).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from mambavlm.eval.benchmarks import BENCHMARKS, AnnotationFiles, score_answers
from mambavlm.eval.scorers.multiple_choice import MMMUQuestion
from tests.eval.test_benchmarks_end_to_end import MINI_BENCHMARKS
from tests.eval.test_readers_gqa_pope_sqa import gqa_file, pope_dir, sqa_files
from tests.eval.test_score import script, write_jsonl

FOREIGN = ["201307999", "nope-1", "v2_7", "999999999", "-3", "x#0", "20000042"]
"""Seven ids no mini benchmark holds: a GQA-like id, odd strings, a POPE-looking id of a split with no label file."""

# name -> (overall, counts) of the matching answers, as score_answers returned them before this check.
MATCHING: dict[str, tuple[float, dict[str, int]]] = {
    "vqav2": (33.33, {"questions": 3, "missing": 0}),
    "textvqa": (0.0, {"questions": 4, "missing": 0}),
    "vizwiz": (10.0, {"questions": 3, "missing": 0}),
    "gqa": (33.33, {"questions": 3, "missing": 0}),
    "pope": (58.3, {"labels": 5, "scored": 5, "missing": 0, "extra": 0, "random": 2, "adversarial": 3}),
    "scienceqa": (50.0, {"problems": 4, "non_image": 2, "scored": 2, "correct": 1, "missing": 0, "unparsed": 1}),
    "mme": (25.0, {"questions": 8, "images": 4, "categories": 3, "missing": 0, "other": 6}),
    "mmbench": (50.0, {"questions": 2, "passes": 4, "unmatched": 0, "unmatched_questions": 0, "missing": 0,
                       "no_base_row": 0}),
    "seedbench": (50.0, {"questions": 2, "missing": 0, "skipped_not_image": 1}),  # before: 0 (see above)
    "tallyqa": (0.0, {"items": 3, "scored": 3, "missing": 0, "unparsed": 0, "simple": 2, "complex": 1}),
    "tallyqa-likelihood": (0.0, {"items": 3, "scored": 3, "missing": 0, "unparsed": 0, "simple": 2, "complex": 1}),
    "vsr": (25.0, {"items": 4, "scored": 4, "missing": 0, "unparsed": 2}),
    "vsr-likelihood": (100.0, {"items": 4, "scored": 4, "missing": 0, "unparsed": 0}),
}
CASES = [name for name in MINI_BENCHMARKS if name != "mmmu"]  # MMMU's reader needs pyarrow: tested below


TEXTS = ("yes", "B", "no", "A", "2", "True", "C", "net")
TEXTS_OF = {"mmbench": ("B", "B", "A", "B"), "seedbench": ("A", "B", "D"), "tallyqa": ("C", "4", "(E)")}


def _row(name: str, question_id: str, position: int = 0) -> dict[str, Any]:
    benchmark = name.removesuffix("-likelihood")
    texts = TEXTS_OF.get(name, TEXTS)
    row: dict[str, Any] = {"question_id": question_id, "text": texts[position % len(texts)]}
    if name.endswith("-likelihood"):
        options = BENCHMARKS[benchmark].likelihood_options
        likeliest = options[(3 * position) % len(options)]
        row["option_logprobs"] = {option: 0.0 if option == likeliest else -1.0 - i for i, option in enumerate(options)}
        row["text"] = likeliest
    return row


def _where(benchmark: str, files: AnnotationFiles) -> str:
    """How the error names the files, written out: ScienceQA's test split, GQA's balanced questions, else
    the annotation path."""
    held = {"scienceqa": f"the test split of {files.split_file} ({files.annotations})",
            "gqa": f"the balanced questions of {files.annotations}"}
    return held.get(benchmark, str(files.annotations))


def _setup(name: str, tmp_path: Path) -> tuple[str, AnnotationFiles, list[str]]:
    benchmark = name.removesuffix("-likelihood")
    files = MINI_BENCHMARKS[name](tmp_path).files
    return benchmark, files, list(BENCHMARKS[benchmark].read(files))


@pytest.mark.parametrize("name", CASES)
def test_matching_answers_score_as_before(name: str, tmp_path: Path) -> None:
    benchmark, files, ids = _setup(name, tmp_path)
    answers = write_jsonl(tmp_path / "answers.jsonl", [_row(name, qid, i) for i, qid in enumerate(ids)])
    report = score_answers(benchmark, answers, files)
    assert (report.overall, report.counts) == MATCHING[name]


@pytest.mark.parametrize("name", CASES)
def test_answers_with_unknown_ids_are_refused(name: str, tmp_path: Path) -> None:
    benchmark, files, ids = _setup(name, tmp_path)
    answers = write_jsonl(tmp_path / "answers.jsonl", [_row(name, qid) for qid in ids[:1] + FOREIGN + ids[1:]])
    named = FOREIGN[:5]
    if benchmark == "textvqa":  # no prompt to find a LLaVA-style id by: each named with the reason
        named = [f"{qid} (not an official question id and no prompt to find it by)" for qid in named]
    expected = (f"{benchmark}: {answers} has answers for 7 questions not in {_where(benchmark, files)}: "
                f"{', '.join(named)} and 2 more")
    with pytest.raises(ValueError) as error:
        score_answers(benchmark, answers, files)
    assert str(error.value) == expected
    # One unknown id among all the right ones is enough.
    one = write_jsonl(tmp_path / "one.jsonl", [_row(name, qid) for qid in ids] + [_row(name, "nope-1")])
    with pytest.raises(ValueError, match=r"has answers for 1 questions not in .*: nope-1"):
        score_answers(benchmark, one, files)


def test_gqa_answers_scored_as_pope_exit_non_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The walkthrough: eval/score.py pope --answers <a GQA run's answers> --annotations pope/ printed
    # "overall": 0.0 and exited 0. Now it prints one error line naming the files and exits 2.
    labels = pope_dir(tmp_path)
    gqa_ids = [qid for qid, record in json.loads(gqa_file(tmp_path).read_text()).items() if record["isBalanced"]]
    answers = write_jsonl(tmp_path / "gqa_answers.jsonl", [{"question_id": qid, "text": "no"} for qid in gqa_ids])
    with pytest.raises(SystemExit) as exit_info:
        script("score")(["pope", "--answers", str(answers), "--annotations", str(labels)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1
    assert f"pope: {answers} has answers for 3 questions not in {labels}: 201307251, 201640614, 202225914" in err


def test_reference_scored_subsets_are_not_unknown(tmp_path: Path) -> None:
    # Ids the files hold but the reference does not score are no error: ScienceQA's test problems without an
    # image (4, 15) and SEED-Bench's video questions (covered by MATCHING's seedbench case). Ids the files hold
    # outside what is scored are: ScienceQA's train problem 1, GQA's unbalanced question 201640615.
    problems, splits = sqa_files(tmp_path)
    files = AnnotationFiles(problems, split_file=splits)
    answers = write_jsonl(tmp_path / "sqa.jsonl", [{"question_id": pid, "text": "B"} for pid in ("4", "5", "11", "15")])
    report = score_answers("scienceqa", answers, files)
    assert (report.overall, report.counts["scored"], report.counts["non_image"]) == (100.0, 2, 2)
    train = write_jsonl(tmp_path / "train.jsonl", [{"question_id": pid, "text": "B"} for pid in ("1", "5")])
    with pytest.raises(ValueError, match=r"scienceqa: .* has answers for 1 questions not in the test split of .*: 1$"):
        score_answers("scienceqa", train, files)
    gqa = AnnotationFiles(gqa_file(tmp_path))
    unbalanced = write_jsonl(tmp_path / "gqa.jsonl", [{"question_id": "201640615", "text": "yes"}])
    with pytest.raises(ValueError, match=r"1 questions not in the balanced questions of .*: 201640615$"):
        score_answers("gqa", unbalanced, gqa)


def test_textvqa_unknown_rows_are_named_with_why(tmp_path: Path) -> None:
    # An official id passes as itself even among LLaVA-style rows; rows found neither way are refused together.
    files = MINI_BENCHMARKS["textvqa"](tmp_path).files
    records = json.loads(files.annotations.read_text())["data"]
    first = records[0]
    suffix = "\nReference OCR token: A, B\nAnswer the question using a single word or phrase."
    answers = write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": first["question_id"], "text": "x"},
        {"question_id": f"{records[1]['image_id']}#0", "prompt": records[1]["question"] + suffix, "text": "x"},
        {"question_id": "img9#0", "prompt": "Who?" + suffix, "text": "x"},
        {"question_id": "img9#1", "text": "x"},
    ])
    with pytest.raises(ValueError) as error:
        score_answers("textvqa", answers, files)
    assert str(error.value) == (
        f"textvqa: {answers} has answers for 2 questions not in {files.annotations}: "
        "img9#0 (no question 'who?' on image img9), img9#1 (not an official question id and no prompt to find it by)"
    )
    known = write_jsonl(tmp_path / "known.jsonl", [json.loads(line) for line in answers.read_text().splitlines()[:2]])
    assert score_answers("textvqa", known, files).counts == {"questions": 4, "missing": 2}


def test_mmmu_answers_with_unknown_ids_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # read_mmmu needs pyarrow for the options; the check is score_answers', so MMMU's items are given directly.
    questions = {
        "validation_Art_Theory_1": MMMUQuestion("multiple-choice", "B", "Art_Theory", ("a", "b", "c", "d")),
        "validation_Math_15": MMMUQuestion("short-answer", ("24/7", "3.429"), "Math"),
    }
    monkeypatch.setitem(BENCHMARKS, "mmmu", dataclasses.replace(BENCHMARKS["mmmu"], read=lambda files: questions))
    files = AnnotationFiles(tmp_path / "answer_dict_val.json", tmp_path / "MMMU")
    # (B) right; "The answer is 3.429" holds the number 3.429, one of the golds: 2 of 2.
    answers = write_jsonl(tmp_path / "answers.jsonl", [
        {"question_id": "validation_Art_Theory_1", "text": "(B)"},
        {"question_id": "validation_Math_15", "text": "The answer is 3.429"}])
    report = score_answers("mmmu", answers, files)
    assert (report.overall, report.counts["missing"]) == (100.0, 0)
    extra = write_jsonl(tmp_path / "extra.jsonl", [
        {"question_id": "validation_Art_Theory_1", "text": "(B)"}, {"question_id": "test_Art_Theory_1", "text": "A"}])
    with pytest.raises(ValueError) as error:
        score_answers("mmmu", extra, files)
    assert str(error.value) == (
        f"mmmu: {extra} has answers for 1 questions not in {files.annotations}: test_Art_Theory_1")
