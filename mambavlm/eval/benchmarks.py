"""The benchmarks by name: which published files score them, how they are read, scored, and prompted.

``BENCHMARKS[name]`` ties a benchmark's reader (``mambavlm.eval.scorers.*.read_*``: the official files
as published -> question id -> item) to its scorer (the reference scorer's rules) and to the prompt
suffix the papers' baselines used (LLaVA-1.5's, Prismatic's for TallyQA / VSR). ``score_answers`` is
what ``eval/score.py`` and ``eval/run.py --annotations`` run: an answers JSONL (LLaVA's format, one
``{"question_id", "prompt", "text", ...}`` per line, ours or LLaVA's) scored against those files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mambavlm.eval.scorers.closed_set import (
    TALLYQA_LETTERS,
    TALLYQA_PROMPT,
    VSR_OPTIONS,
    VSR_PROMPT,
    read_tallyqa,
    read_vsr,
    score_tallyqa,
    score_tallyqa_likelihood,
    score_vsr,
    score_vsr_likelihood,
)
from mambavlm.eval.scorers.gqa import GQA_PROMPT, read_gqa_questions, score_gqa
from mambavlm.eval.scorers.mme import MME_PROMPT, read_mme, score_mme
from mambavlm.eval.scorers.multiple_choice import (
    MMBENCH_PROMPT,
    MMMU_PROMPT,
    SEED_PROMPT,
    read_mmbench,
    read_mmmu,
    read_seedbench,
    score_mmbench,
    score_mmmu,
    score_seedbench,
)
from mambavlm.eval.scorers.pope import POPE_PROMPT, read_pope_labels, score_pope
from mambavlm.eval.scorers.report import ScoreReport, reject_unknown_ids, unknown_ids_message
from mambavlm.eval.scorers.scienceqa import SCIENCEQA_PROMPT, read_scienceqa_problems, score_scienceqa
from mambavlm.eval.scorers.vqa import (
    TEXTVQA_PROMPT,
    VIZWIZ_PROMPT,
    VQAV2_PROMPT,
    llava_textvqa_question,
    read_textvqa_llava_index,
    read_vqa_annotations,
    score_vqa,
)

__all__ = [
    "BENCHMARKS",
    "AnnotationFiles",
    "Benchmark",
    "check_annotation_files",
    "ids_held_by",
    "read_answers",
    "score_answers",
]


@dataclass(frozen=True)
class AnnotationFiles:
    """The published files a benchmark is scored against. annotations: the main file (or folder);
    questions: a second file where the benchmark has one (VQAv2's questions file, cross-checked; MMMU's
    Hugging Face dataset folder, for the options); split_file: ScienceQA's ``pid_splits.json``."""

    annotations: Path
    questions: Path | None = None
    split_file: Path | None = None


@dataclass(frozen=True)
class Benchmark:
    """name: the CLI name. prompt: the suffix the papers' baselines appended to each question.
    annotations: what ``--annotations`` (and ``--questions`` / ``--split-file``) take, as published.
    read: files -> question id -> item. score: (question id -> answer, items) -> ScoreReport.
    likelihood_options / score_likelihood: the closed set answered by likelihood (Prismatic's mode:
    ``MambaVLM.option_logprobs``) and its scorer, for the benchmarks that have one. takes: which of
    ``AnnotationFiles``' optional files (``"questions"``, ``"split_file"``) ``read`` reads; any other
    given is refused by ``check_annotation_files``."""

    name: str
    prompt: str
    annotations: str
    read: Callable[[AnnotationFiles], Mapping[str, Any]]
    score: Callable[[Mapping[str, str], Mapping[str, Any]], ScoreReport]
    likelihood_options: tuple[str, ...] = ()
    score_likelihood: Callable[[Mapping[str, Mapping[str, float]], Mapping[str, Any]], ScoreReport] | None = None
    takes: tuple[str, ...] = ()


def _required(files: AnnotationFiles, attribute: str, benchmark: str, what: str) -> Path:
    value = getattr(files, attribute)
    if value is None:
        raise ValueError(f"{benchmark} needs --{attribute.replace('_', '-')}: {what}")
    return value


_TALLYQA_LETTER = re.compile(r"^\(?([A-P])\)?(?:[.:)\s]|$)")


def _score_tallyqa_generated(predictions: Mapping[str, str], items: Mapping[str, Any]) -> ScoreReport:
    """TallyQA from generated answers: an answer that starts with one of the prompt's option letters
    ("C", "C.", "(C)") is that option's count (letter i <-> count i), any other is parsed as a count.
    Departure: Prismatic scores TallyQA by option likelihood only (``score_tallyqa_likelihood``); this
    is the generation-mode reading of the same multiple-choice prompt."""
    counts = {}
    for question_id, text in predictions.items():
        match = _TALLYQA_LETTER.match(text.strip())
        counts[question_id] = str(TALLYQA_LETTERS.index(match.group(1))) if match else text
    return score_tallyqa(counts, items)


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "vqav2", VQAV2_PROMPT, "v2_mscoco_val2014_annotations.json [--questions v2_OpenEnded_mscoco_val2014_questions.json]",
            lambda f: read_vqa_annotations(f.annotations, "vqav2", f.questions),
            lambda p, items: score_vqa(p, items, "vqav2"),
            takes=("questions",),
        ),
        Benchmark(
            "textvqa", TEXTVQA_PROMPT, "TextVQA_0.5.1_val.json",
            lambda f: read_vqa_annotations(f.annotations, "textvqa"),
            lambda p, items: score_vqa(p, items, "textvqa"),
        ),
        Benchmark(
            "vizwiz", VIZWIZ_PROMPT, "VizWiz val.json (ids: the position in the file)",
            lambda f: read_vqa_annotations(f.annotations, "vizwiz"),
            lambda p, items: score_vqa(p, items, "vizwiz"),
        ),
        Benchmark("gqa", GQA_PROMPT, "testdev_balanced_questions.json", lambda f: read_gqa_questions(f.annotations), score_gqa),
        Benchmark("pope", POPE_PROMPT, "coco_pope_{random,popular,adversarial}.json, or their folder",
                  lambda f: read_pope_labels(f.annotations), score_pope),
        Benchmark(
            "scienceqa", SCIENCEQA_PROMPT, "problems.json --split-file pid_splits.json",
            lambda f: read_scienceqa_problems(
                f.annotations, _required(f, "split_file", "scienceqa", "ScienceQA's pid_splits.json")
            ),
            score_scienceqa,
            takes=("split_file",),
        ),
        Benchmark("mme", MME_PROMPT, "the MME_Benchmark_release_version folder", lambda f: read_mme(f.annotations), score_mme),
        Benchmark("mmbench", MMBENCH_PROMPT, "mmbench_dev_20230712.tsv", lambda f: read_mmbench(f.annotations), score_mmbench),
        Benchmark("seedbench", SEED_PROMPT, "SEED-Bench.json", lambda f: read_seedbench(f.annotations), score_seedbench),
        Benchmark(
            "mmmu", MMMU_PROMPT, "answer_dict_val.json --questions MMMU_DATASET_FOLDER (the Hugging Face MMMU/MMMU copy)",
            lambda f: read_mmmu(f.annotations, _required(f, "questions", "mmmu", "the MMMU/MMMU dataset folder")),
            score_mmmu,
            takes=("questions",),
        ),
        Benchmark("tallyqa", TALLYQA_PROMPT, "TallyQA test.json", lambda f: read_tallyqa(f.annotations),
                  _score_tallyqa_generated, TALLYQA_LETTERS, score_tallyqa_likelihood),
        Benchmark("vsr", VSR_PROMPT, "VSR test.jsonl (ids: the line's position)", lambda f: read_vsr(f.annotations),
                  score_vsr, VSR_OPTIONS, score_vsr_likelihood),
    )
}


def check_annotation_files(benchmark: str, files: AnnotationFiles) -> None:
    """ValueError where ``files`` gives a questions or split file that ``benchmark``'s reader does not read
    (a ``--split-file`` with POPE, say): passed over, it would be recorded in results.json as scored against
    while nothing read it. The message names the file and what the benchmark is scored against."""
    spec = BENCHMARKS[benchmark]
    for attribute in ("questions", "split_file"):
        given = getattr(files, attribute)
        if given is not None and attribute not in spec.takes:
            what = {"questions": "questions file", "split_file": "split file"}[attribute]
            raise ValueError(f"{benchmark} reads no {what} ({given} given): it is scored against "
                             f"{spec.annotations}")


def read_answers(path: Path, by_prompt: bool = False) -> list[dict[str, Any]]:
    """The rows of an answers JSONL (LLaVA's format: ``question_id``, ``text``, optionally ``prompt``), in
    file order, each ``question_id`` a string.

    ``by_prompt`` (TextVQA): LLaVA's TextVQA question file gives an image's questions one id (the image's),
    so LLaVA's own answers repeat it, the prompt telling them apart (its ``eval_textvqa.py`` matches answers
    by image and prompt). Rows sharing an id with different prompts are then kept apart as ``ID#n``, n their
    position among them from 0, as ``read_questions`` names such questions (``eval/run.py``'s own answers
    already carry these ids), for the scorer to find through their prompts.

    Raises FileNotFoundError for a missing file, ValueError naming the file where it is not UTF-8 text or
    holds no row, and naming the line of a row that is not a JSON object with a ``question_id`` and a
    string ``text``, or whose question id repeats (``by_prompt``: with the same prompt, or without one, or
    where the ``ID#n`` it would become is another row's id).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"answers file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Notepad and other editors) dropped
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}): expected an answers JSONL") from None
    numbered: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {number}: not JSON ({err.msg})") from None
        if not isinstance(row, dict) or "question_id" not in row or not isinstance(row.get("text"), str):
            raise ValueError(f"{path}: line {number}: expected an object with a question_id and a string text")
        row["question_id"] = str(row["question_id"])
        same_id = numbered.setdefault(row["question_id"], [])
        prompt = row.get("prompt")
        if same_id and (not by_prompt or not isinstance(prompt, str)
                        or any(other.get("prompt") == prompt for _, other in same_id)):
            raise ValueError(f"{path}: line {number}: question_id {row['question_id']} repeated"
                             + (" with the same prompt" if by_prompt and isinstance(prompt, str) else ""))
        same_id.append((number, row))
    rows = sorted((entry for same_id in numbered.values() for entry in same_id), key=lambda entry: entry[0])
    for question_id, same_id in numbered.items():
        if len(same_id) == 1:
            continue
        for position, (number, row) in enumerate(same_id):
            row["question_id"] = f"{question_id}#{position}"
            if row["question_id"] in numbered:
                raise ValueError(f"{path}: line {number}: question_id {question_id} repeated, and "
                                 f"{row['question_id']}, the id its repeats are told apart by, is taken")
    if not rows:
        raise ValueError(f"{path} holds no answers (a run that answered nothing?)")
    return [row for _, row in rows]


def _textvqa_predictions(
    rows: list[dict[str, Any]], items: Mapping[str, Any], files: AnnotationFiles, where: str, subject: str
) -> dict[str, str]:
    """TextVQA answers keyed by the official question id. Rows already keyed so pass; rows of a run on
    LLaVA's question file (whose id is the image id, ``ID#n`` when the image has several questions) are
    found by (image id, lower-cased question read back from the prompt), as LLaVA's ``eval_textvqa.py``
    does (``read_textvqa_llava_index``). Rows found neither way are refused together, as ``score_answers``
    refuses unknown ids (LLaVA's script stops at the first with a KeyError), each named with the reason."""
    if all(row["question_id"] in items for row in rows):
        return {row["question_id"]: row["text"] for row in rows}
    index = read_textvqa_llava_index(files.annotations)
    predictions, unknown = {}, []
    for row in rows:
        if row["question_id"] in items:  # an official id (an int; LLaVA's image ids are hex strings)
            predictions[row["question_id"]] = row["text"]
            continue
        if not isinstance(row.get("prompt"), str):
            unknown.append(f"{row['question_id']} (not an official question id and no prompt to find it by)")
            continue
        image_id = row["question_id"].split("#", 1)[0]
        key = (image_id, llava_textvqa_question(row["prompt"]))
        if key not in index:
            unknown.append(f"{row['question_id']} (no question {key[1]!r} on image {image_id})")
            continue
        predictions[index[key]] = row["text"]
    if unknown:
        raise ValueError(unknown_ids_message(unknown, where, subject))
    return predictions


def ids_held_by(benchmark: str, files: AnnotationFiles) -> str:
    """What holds the question ids every answer's id must be among (the files), as the error names it."""
    if benchmark == "scienceqa":
        return f"the test split of {files.split_file} ({files.annotations})"
    if benchmark == "gqa":
        return f"the balanced questions of {files.annotations}"
    return str(files.annotations)


def score_answers(
    benchmark: str, answers: Path, files: AnnotationFiles, items: Mapping[Any, Any] | None = None
) -> ScoreReport:
    """Score an answers JSONL against the benchmark's published files, as its reference scorer does.

    Rows that carry ``option_logprobs`` (a likelihood-mode run) are scored by the benchmark's likelihood
    scorer (ValueError for a benchmark without one, or a file mixing both kinds of rows).

    Every answer's question id must be one the files hold (the items ``spec.read`` returns, including any
    the reference reads but does not score, e.g. SEED-Bench's video questions or ScienceQA's problems
    without an image): answers of another benchmark, split or file are refused with a ValueError naming
    the benchmark, the answers file, how many ids are unknown, the first five and the files, before
    anything is scored. Questions without an answer are the scorer's business: each counts them as its
    reference does (wrong, or left out) under ``counts["missing"]``.

    ``items``: the annotation items to score against, as the benchmark's reader returns them (default:
    all of ``files``'; a run limited to its first questions passes those questions' own, so that the
    questions it never asked are neither missing nor wrong, as lmms-eval's ``--limit`` scores).

    Raises ValueError for an unknown benchmark, a questions or split file it does not read
    (``check_annotation_files``) or an answer whose question id the files do not hold, FileNotFoundError for
    a missing file (the readers' and scorers' errors, which name the record).
    """
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {', '.join(BENCHMARKS)}")
    check_annotation_files(benchmark, files)
    spec = BENCHMARKS[benchmark]
    rows = read_answers(answers, by_prompt=benchmark == "textvqa")
    where, subject = ids_held_by(benchmark, files), f"{benchmark}: {answers} has answers"
    by_likelihood = ["option_logprobs" in row for row in rows]
    if any(by_likelihood):
        if not all(by_likelihood):
            raise ValueError(f"{answers}: some rows have option_logprobs and some do not")
        if spec.score_likelihood is None:
            raise ValueError(f"{benchmark} has no likelihood scorer; answer it by generation")
        items = spec.read(files) if items is None else items
        option_logprobs = {row["question_id"]: row["option_logprobs"] for row in rows}
        reject_unknown_ids(option_logprobs, items, where, subject)
        return spec.score_likelihood(option_logprobs, items)
    items = spec.read(files) if items is None else items
    if benchmark == "textvqa":
        predictions = _textvqa_predictions(rows, items, files, where, subject)
    else:
        predictions = {row["question_id"]: row["text"] for row in rows}
    reject_unknown_ids(predictions, items, where, subject)
    return spec.score(predictions, items)
