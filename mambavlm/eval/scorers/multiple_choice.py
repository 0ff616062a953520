"""Multiple-choice benchmarks scored as their reference scorers score them: MMBench (CircularEval),
SEED-Bench (image dimensions) and MMMU.

References read (each function names the one it reproduces):

* MMBench: VLMEvalKit (open-compass/VLMEvalKit, the evaluation the open-compass/MMBench README points
  to): ``vlmeval/utils/matching_util.py`` (``can_infer``, ``can_infer_option``, ``can_infer_text``),
  ``vlmeval/dataset/utils/multiple_choice.py`` (``mcq_circular_eval``, ``prefetch_circular_group``,
  ``report_acc``) and ``vlmeval/dataset/image_mcq.py`` (``ImageMCQDataset.evaluate``). Answers are
  produced as LLaVA's ``llava/eval/model_vqa_mmbench.py`` writes them (the decoded text, stripped) and
  handed over by ``scripts/convert_mmbench_for_submission.py`` (one prediction per TSV row).
* SEED-Bench: LLaVA's ``scripts/convert_seed_for_submission.py`` (``eval_single``) on answers written by
  ``llava/eval/model_vqa_loader.py``; SEED-Bench's own ``eval.py`` computes the same per-dimension and
  instance-level accuracies.
* MMMU: MMMU-Benchmark/MMMU ``eval/eval_utils.py`` (``parse_multi_choice_response``,
  ``parse_open_response``, ``eval_multi_choice``, ``eval_open``, ``calculate_ins_level_acc``) and
  ``eval/main_eval_only.py`` (per-subject accuracy, instance-level overall, both rounded to 3 places).

Departures common to the three scorers: a question with no prediction counts as wrong and is counted in
``counts["missing"]`` (LLaVA's SEED script does exactly this; the MMBench and MMMU scripts only ever see
complete prediction files). Answers whose ids are not questions of the files are refused by
``score_answers`` (ValueError naming them), for all three: MMMU's ``main_eval_only.py`` fails on them too
(``answer_dict[data_id]``, a KeyError), while LLaVA's MMBench and SEED scripts pass over them without a
word (the MMBench one writes each answer into the TSV row of its index, none for an unknown index; the SEED
one looks answers up question by question). That silence is no documented allowance, only how the loops are
written, and such answers are always another benchmark's, split's or file's, whose score would be
meaningless; so they are refused, and every number of the answers that do match is the reference's.
SEED-Bench's video questions are questions of the file (LLaVA's question file asks them and its script
reads their answers), so ``read_seedbench`` keeps them and ``score_seedbench`` skips them. Called
directly, the three scorers still ignore predictions for ids that are not among ``questions``.

Files (each reader's docstring names the file, where it comes from and the fields read): ``read_mmbench`` and
``build_mmbench_questions`` read the MMBench TSV (``build_mmbench_questions`` writes the question JSONL and the
decoded images; LLaVA has no question file for MMBench, its script reads the TSV itself); ``read_seedbench``
reads ``SEED-Bench.json`` (the questions are LLaVA's ``llava-seed-bench.jsonl``); ``read_mmmu`` reads MMMU's
``answer_dict_val.json`` and the multiple-choice options from the Hugging Face MMMU/MMMU parquet files.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import json
import random
import re
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from PIL import Image

from mambavlm.atomic import atomic_file
from mambavlm.eval.scorers.files import field as _field
from mambavlm.eval.scorers.files import load_json as _load_json
from mambavlm.eval.scorers.report import ScoreReport

__all__ = [
    "MMBENCH_PROMPT",
    "SEED_PROMPT",
    "MMBenchQuestion",
    "MMMU_OPEN_PROMPT",
    "MMMU_PROMPT",
    "MMMUQuestion",
    "build_mmmu_questions",
    "SEEDQuestion",
    "build_mmbench_questions",
    "mmbench_letter",
    "mmmu_eval_open",
    "mmmu_guess",
    "mmmu_letter",
    "mmmu_parse_open_response",
    "read_mmbench",
    "read_mmmu",
    "read_seedbench",
    "score_mmbench",
    "score_mmmu",
    "score_seedbench",
]


# --------------------------------------------------------------------------------------------------
# MMBench
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MMBenchQuestion:
    """One row of the MMBench TSV, i.e. one circular pass of a question.

    ``base_index``: ``int(index % 1e6)`` as VLMEvalKit's ``mcq_circular_eval`` computes ``g_index``
    (the official TSV numbers the shifted copies of question ``i`` as ``i + k * 1_000_000``).
    ``answer``: this pass's correct letter. ``options``: letter -> option text for this pass (the
    non-empty ``A``..``D`` columns).
    """

    base_index: int
    answer: str
    options: Mapping[str, str]
    category: str
    l2_category: str


_MMBENCH_API_FAILURE = "Failed to obtain answer via API"
_MMBENCH_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_MMBENCH_SEPARATORS = ".()[],:;!*#{}"
# can_infer_option only trusts a letter among the last few tokens: its index must exceed len - 5.
_MMBENCH_LETTER_WINDOW = 5


def _mmbench_option_letter(text: str, options: Mapping[str, str]) -> str | None:
    """VLMEvalKit's ``can_infer_option`` (None where it returns False)."""
    if _MMBENCH_API_FAILURE in text:
        return None
    if any(phrase in text for phrase in _MMBENCH_REFUSALS):
        return "Z"
    spaced = text
    for separator in _MMBENCH_SEPARATORS:
        spaced = spaced.replace(separator, " ")
    tokens = spaced.split()
    present = [letter for letter in options if letter in tokens]
    if len(present) == 1:
        letter = present[0]
        # .index is the letter's FIRST occurrence, even when it is repeated later on.
        return letter if tokens.index(letter) > len(tokens) - _MMBENCH_LETTER_WINDOW else None
    if not present and "Z" in tokens:
        return "Z"
    return None


def _mmbench_text_letter(text: str, options: Mapping[str, str]) -> str | None:
    """VLMEvalKit's ``can_infer_text`` (None where it returns False)."""
    lowered = text.lower()
    if len(lowered) > 2 * sum(len(option) for option in options.values()):
        return None
    found = [letter for letter, option in options.items() if option.lower() in lowered]
    return found[0] if len(found) == 1 else None


def mmbench_letter(text: str, options: Mapping[str, str]) -> str | None:
    """The option letter VLMEvalKit's rule-based matcher ``can_infer`` reads from an answer, or None
    where it gives up (the official evaluation then asks a ChatGPT judge; we never do).

    Reproduces ``vlmeval/utils/matching_util.py`` in its recent form (the last-five-token window and
    the length guard below, as recent VLMEvalKit copies carry them; they appear to date from PR #1175,
    "Improve can_infer_option and can_infer_text", July 2025), with the ``VERBOSE`` environment
    variable unset (its default; set, it also rejects answers with an "A" token and more than three
    tokens):

    1. ``can_infer_option``: an answer containing "Failed to obtain answer via API" skips to step 2;
       one containing a refusal phrase ("Cannot determine the answer", ...) gives ``"Z"``. Otherwise
       the characters ``.()[],:;!*#{}`` become spaces, the answer is split on whitespace, and the
       option letters found among the tokens are counted. Exactly one -> that letter, provided its
       first occurrence is among the last five tokens (index > number of tokens - 5): "The answer is
       C" -> C, "(B) cat" -> B, "A cat" -> A (the article counts), but "C is correct because the cat
       sits on a mat" -> nothing. None found and a token "Z" -> ``"Z"``. Two or more -> step 2.
    2. ``can_infer_text``: unless the lower-cased answer is longer than twice the options' total
       length, the one option whose lower-cased text occurs in it ("cat" -> the option "cat"); zero
       or several such options -> None.

    Older VLMEvalKit releases (e.g. commit 18fc37a5) accepted the single letter anywhere and had no
    length guard in step 2; one stored commit (134b4ea6) inverts the window test (``<``), which would
    reject a bare "A", so we follow the form the copies agree on (``>``). ``"Z"`` is returned as the reference
    returns it: it never equals a real answer, so such a pass is wrong, not unmatched.
    """
    return _mmbench_option_letter(text, options) or _mmbench_text_letter(text, options)


def score_mmbench(predictions: Mapping[str, str], questions: Mapping[str, MMBenchQuestion]) -> ScoreReport:
    """MMBench CircularEval as VLMEvalKit's ``mcq_circular_eval`` + ``report_acc`` compute it under its
    ``exact_matching`` policy (no judge model).

    ``questions`` maps each TSV row's ``index`` (as a string) to its pass; ``predictions`` maps the
    same ids to the model's answer text, stripped as LLaVA's ``model_vqa_mmbench.py`` strips it. The
    passes sharing a ``base_index`` form one question, scored only when its own row (id ==
    ``base_index``) is among the questions, as the reference scores only groups whose index equals
    their ``g_index``; category and l2-category come from that row. A question is right only if every
    one of its passes gives, through ``mmbench_letter``, exactly that pass's answer.

    Departure: where ``mmbench_letter`` gives up, the official evaluation asks ChatGPT to map the
    answer to an option; we call no API and count the pass as wrong (VLMEvalKit's ``exact_matching``
    mode does the same). This can only lower the score. ``counts["unmatched"]`` counts such passes;
    ``counts["unmatched_questions"]`` the questions whose verdict rested on them (every pass that was
    matched was right and none was missing): the judge could have raised the overall score by at most
    that many questions. ``counts["no_base_row"]`` counts passes whose question's own row is absent.

    overall and breakdowns (``category``, ``l2-category``; group names as in the TSV, not
    VLMEvalKit's display abbreviations) in percent, unrounded as ``report_acc`` leaves them.
    """
    groups: dict[int, list[tuple[str, MMBenchQuestion]]] = defaultdict(list)
    for question_id, question in questions.items():
        groups[question.base_index].append((question_id, question))

    hits: dict[int, bool] = {}
    bases: dict[int, MMBenchQuestion] = {}
    counts = {"questions": 0, "passes": 0, "unmatched": 0, "unmatched_questions": 0, "missing": 0, "no_base_row": 0}
    for base_index, passes in groups.items():
        base = [question for question_id, question in passes if _tsv_index(question_id) == base_index]
        if not base:
            counts["no_base_row"] += len(passes)
            continue
        bases[base_index] = base[0]
        wrong = unmatched = missing = 0
        for question_id, question in passes:
            if question_id not in predictions:
                missing += 1
                continue
            letter = mmbench_letter(predictions[question_id].strip(), question.options)
            if letter is None:
                unmatched += 1
            elif letter != question.answer:
                wrong += 1
        hits[base_index] = wrong == unmatched == missing == 0
        counts["questions"] += 1
        counts["passes"] += len(passes)
        counts["unmatched"] += unmatched
        counts["missing"] += missing
        counts["unmatched_questions"] += int(unmatched > 0 and wrong == missing == 0)
    if not hits:
        raise ValueError("no MMBench question has its own row (id == base_index) among the questions")

    breakdowns: dict[str, dict[str, float]] = {}
    for name, field in (("category", "category"), ("l2-category", "l2_category")):
        by_group: dict[str, list[bool]] = defaultdict(list)
        for base_index, hit in hits.items():
            by_group[getattr(bases[base_index], field)].append(hit)
        breakdowns[name] = {group: 100 * sum(by_group[group]) / len(by_group[group]) for group in sorted(by_group)}
    overall = 100 * sum(hits.values()) / len(hits)
    return ScoreReport("MMBench", overall, breakdowns, counts)


def _tsv_index(question_id: str) -> int:
    """The TSV ``index`` a question id names (VLMEvalKit asserts these are integers)."""
    try:
        return int(question_id)
    except ValueError:
        raise ValueError(f"MMBench question id {question_id!r} is not the TSV's integer index") from None


MMBENCH_PROMPT = "Answer with the option's letter from the given choices directly."
"""What LLaVA-1.5's ``llava/eval/model_vqa_mmbench.py`` appends, after a newline, to the hint, question and
options with ``--single-pred-prompt`` (as ``scripts/v1_5/eval/mmbench.sh`` runs it)."""

_MMBENCH_OPTION_LETTERS = ("A", "B", "C", "D")  # model_vqa_mmbench.py's all_options
_MMBENCH_CIRCULAR_STRIDE = 1_000_000  # VLMEvalKit's g_index = index % 1e6
# What pandas' read_csv/read_table (2.x) read as NaN by default; LLaVA and VLMEvalKit read the TSV with pandas.
_PANDAS_NA_STRINGS = frozenset(
    {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA",
     "NULL", "NaN", "None", "n/a", "nan", "null"}
)  # fmt: skip
_TSV_FIELD_SIZE_LIMIT = 2**31 - 1  # a base64 image is far above the csv module's default 128 KiB field limit
_IMAGE_SUFFIXES = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png"}  # PIL format -> file suffix; others: format.lower()


def _mmbench_missing(cell: str) -> bool:
    """Whether a TSV cell is absent to the references: a string pandas reads as NaN, or one LLaVA's ``is_none``
    calls none ("nan" / "none" in any case)."""
    return cell in _PANDAS_NA_STRINGS or cell.lower() in ("nan", "none")


def _mmbench_rows(path: Path, columns: Sequence[str]) -> Iterator[tuple[str, int, dict[str, str]]]:
    """(where, index, row) for each row of an MMBench TSV, read with ``csv`` as pandas' ``read_table`` reads it
    (tab-separated, '"' quoting, blank lines skipped); ``where`` names the file and the row's line for messages.

    Raises FileNotFoundError for a missing file; ValueError for a header without ``columns``, a row not as wide
    as the header, an ``index`` that is not a new integer, or a line the csv module cannot parse.
    """
    if not path.is_file():
        raise FileNotFoundError(f"MMBench TSV not found: {path}")
    csv.field_size_limit(max(csv.field_size_limit(), _TSV_FIELD_SIZE_LIMIT))
    seen: set[int] = set()
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        try:
            header = next(reader, [])
            missing = [column for column in columns if column not in header]
            if missing:
                raise ValueError(f"{path}: no column {', '.join(missing)} in the header {header}")
            for fields in reader:
                if not fields:
                    continue
                where = f"{path} line {reader.line_num}"
                if len(fields) != len(header):
                    raise ValueError(f"{where}: {len(fields)} tab-separated fields, the header has {len(header)}")
                row = dict(zip(header, fields))
                try:
                    index = int(row["index"])
                except ValueError:
                    raise ValueError(f"{where}: index {row['index']!r} is not an integer") from None
                if index in seen:
                    raise ValueError(f"{where}: index {index} repeated")
                seen.add(index)
                yield f"{where} (index {index})", index, row
        except csv.Error as err:
            raise ValueError(f"{path} line {reader.line_num}: {err}") from None


def read_mmbench(annotations: Path) -> dict[str, MMBenchQuestion]:
    """The MMBench questions of an official TSV, keyed as ``score_mmbench`` expects: the ``index`` column as text.

    annotations: ``mmbench_dev_20230712.tsv`` (the file LLaVA-1.5's ``scripts/v1_5/eval/mmbench.sh`` scores; the
    download is linked from LLaVA's ``docs/Evaluation.md`` and the open-compass/MMBench README) or a later
    ``mmbench_dev_en_*.tsv``: one row per circular pass, the shifted copies of question ``i`` numbered
    ``i + k * 1_000_000``. Columns read: ``index``, ``A``..``D`` (``A`` and ``B`` required), ``answer``,
    ``category``, ``l2-category``. The ids are what LLaVA's ``model_vqa_mmbench.py`` writes as ``question_id``
    (the row's ``index``) and ``convert_mmbench_for_submission.py`` matches back to the row; ``base_index`` is
    ``index % 1_000_000`` as VLMEvalKit groups the passes. Options are the ``A``..``D`` cells pandas would not
    read as NaN (VLMEvalKit's ``build_choices``; "nan"/"none" in any case are absent too, as LLaVA's
    ``is_none`` has them).

    Raises FileNotFoundError for a missing file; ValueError naming the file and line (and index) for a missing
    column, a malformed row, a repeated or non-integer index, or an answer that is not one of the row's option
    letters, and for a TSV without rows.
    """
    columns = ("index", "answer", "category", "l2-category", "A", "B")
    questions: dict[str, MMBenchQuestion] = {}
    for where, index, row in _mmbench_rows(annotations, columns):
        options = {
            letter: row[letter] for letter in _MMBENCH_OPTION_LETTERS if not _mmbench_missing(row.get(letter, ""))
        }
        if row["answer"] not in options:
            raise ValueError(f"{where}: answer {row['answer']!r} is not one of the option letters {list(options)}")
        base_index = index % _MMBENCH_CIRCULAR_STRIDE
        questions[str(index)] = MMBenchQuestion(base_index, row["answer"], options, row["category"], row["l2-category"])
    if not questions:
        raise ValueError(f"{annotations}: no question rows")
    return questions


def _mmbench_prompt(row: Mapping[str, str], prompt: str) -> str:
    """The text LLaVA's ``model_vqa_mmbench.py`` asks: the hint (if any) and the question on the next line, then
    ``"\\nA. <option>"`` for each option up to the first absent one (``get_options``), then a newline and
    ``prompt``."""
    text = row["question"]
    if not _mmbench_missing(row["hint"]):
        text = f"{row['hint']}\n{text}"
    for letter in _MMBENCH_OPTION_LETTERS:
        option = row.get(letter, "")
        if _mmbench_missing(option):
            break
        text += f"\n{letter}. {option}"
    return f"{text}\n{prompt}"


def _decoded_image(cell: str, where: str) -> tuple[bytes, str]:
    """(bytes, file suffix) of a base64 image cell, decoded as LLaVA's ``load_image_from_base64`` decodes it."""
    try:
        data = base64.b64decode(cell)
        with Image.open(BytesIO(data)) as image:
            image_format = image.format or ""
    except (binascii.Error, OSError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"{where}: the image column is not a base64-encoded image ({err})") from None
    return data, _IMAGE_SUFFIXES.get(image_format, image_format.lower())


def build_mmbench_questions(annotations: Path, out_dir: Path, prompt: str = MMBENCH_PROMPT) -> Path:
    """Write an MMBench TSV as the LLaVA-style question JSONL our run answers; returns ``out_dir/questions.jsonl``.

    annotations: the TSV ``read_mmbench`` reads (columns read here: ``index``, ``question``, ``hint``,
    ``A``..``D``, ``image``). Each row's base64 ``image`` is decoded to ``out_dir/images/<index>.<jpg|png|...>``
    (the decoded bytes as they are, the suffix from their format) and the row becomes the line
    ``{"question_id": index, "image": "images/<index>.<suffix>", "text": ...}`` (images relative to
    ``out_dir``, the questions file's default image root). ``text`` is built as LLaVA-1.5's
    ``model_vqa_mmbench.py`` builds it (``_mmbench_prompt``): "<hint>\\n<question>\\nA. <option A>\\nB. ...\\n<prompt>",
    the hint left out where absent, the options up to the first absent one. Every row is written, the
    shifted copies included, as LLaVA answers each row (without ``--all-rounds``).

    Raises as ``read_mmbench``, and ValueError naming the file and row for an image that is not a
    base64-encoded image. The JSONL is written last and atomically, so it exists only if every row was written.
    """
    rows = []
    for where, index, row in _mmbench_rows(annotations, ("index", "question", "hint", "A", "B", "image")):
        data, suffix = _decoded_image(row["image"], where)
        image = f"images/{index}.{suffix}"
        (out_dir / "images").mkdir(parents=True, exist_ok=True)
        (out_dir / image).write_bytes(data)
        rows.append({"question_id": index, "image": image, "text": _mmbench_prompt(row, prompt)})
    if not rows:
        raise ValueError(f"{annotations}: no question rows")
    questions = out_dir / "questions.jsonl"
    with atomic_file(questions) as f:
        for line in rows:
            f.write(json.dumps(line) + "\n")
    return questions


# --------------------------------------------------------------------------------------------------
# SEED-Bench
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SEEDQuestion:
    """One SEED-Bench question: ``answer`` is its letter (A-D); ``question_type_id`` its evaluation
    dimension and ``question_type`` that dimension's name, as the annotation file's ``question_type``
    map gives it (LLaVA's script reads the names from there); ``data_type`` "image" or "video"."""

    answer: str
    question_type_id: int
    question_type: str
    data_type: str = "image"


def score_seedbench(predictions: Mapping[str, str], questions: Mapping[str, SEEDQuestion]) -> ScoreReport:
    """SEED-Bench image accuracy as LLaVA's ``scripts/convert_seed_for_submission.py`` computes it
    (``eval_single(..., eval_only_type='image')``; per dimension as its all-types pass prints it).

    There is no letter extraction: LLaVA compares the answer text, stripped as ``model_vqa_loader.py``
    strips the decoded output, with the answer letter for exact equality, so "B" is right and "B. A red
    car" or "b" is wrong (LLaVA prompts "Answer with the option's letter from the given choices
    directly."). A question without a prediction counts as wrong, as in LLaVA's script. Only
    ``data_type == "image"`` questions (dimensions 1-9 in SEED-Bench-1) are scored; the others are
    counted in ``counts["skipped_not_image"]``.

    overall: instance-level accuracy over the image questions; breakdowns ``question_type``:
    dimension name -> accuracy, in dimension-id order; percent rounded to 2 places as the script
    prints them (``:.2f``).
    """
    totals: dict[int, int] = defaultdict(int)
    correct: dict[int, int] = defaultdict(int)
    names: dict[int, str] = {}
    counts = {"questions": 0, "missing": 0, "skipped_not_image": 0}
    for question_id, question in questions.items():
        if question.data_type != "image":
            counts["skipped_not_image"] += 1
            continue
        type_id = question.question_type_id
        names[type_id] = question.question_type
        totals[type_id] += 1
        counts["questions"] += 1
        if question_id not in predictions:
            counts["missing"] += 1
        elif predictions[question_id].strip() == question.answer:
            correct[type_id] += 1
    if not totals:
        raise ValueError("no SEED-Bench image question to score")

    per_type = {names[type_id]: round(correct[type_id] / totals[type_id] * 100, 2) for type_id in sorted(totals)}
    overall = round(sum(correct.values()) / sum(totals.values()) * 100, 2)
    return ScoreReport("SEED-Bench-image", overall, {"question_type": per_type}, counts)


SEED_PROMPT = "Answer with the option's letter from the given choices directly."
"""The last line of each prompt in LLaVA-1.5's ``llava-seed-bench.jsonl`` ("How many towels are in the
image?\\nA. One\\nB. Two\\nC. Three\\nD. Four\\nAnswer with the option's letter from the given choices directly.")."""

_SEED_LETTERS = ("A", "B", "C", "D")
_SEED_FIELDS = ("question_id", "answer", "question_type_id", "data_type")


def read_seedbench(annotations: Path) -> dict[str, SEEDQuestion]:
    """SEED-Bench's questions, keyed by ``question_id``, as LLaVA's ``convert_seed_for_submission.py``
    scores them.

    annotations: the official ``SEED-Bench.json`` (AILab-CVC/SEED-Bench; Hugging Face AILab-CVC/SEED-Bench),
    ``{"questions": [...], "question_type": {name: id}}``. Fields read per question: ``question_id``,
    ``answer`` (A-D), ``question_type_id``, ``data_type``. Every question is kept, with its ``data_type``:
    ``score_seedbench`` scores only the ``"image"`` ones (those ``eval_single(..., eval_only_type="image")``
    counts), but LLaVA's ``llava-seed-bench.jsonl`` also asks the video questions (on their middle frame) and
    its script reads their answers (its video pass, its upload file), so their ids are SEED-Bench's too and an
    answer to one is no unknown id. ``question_type`` is the dimension's name from the
    file's map, as the script prints it. Ids: ``question_id`` as text ("101669"). LLaVA's script looks answers up
    by ``int(question_id)`` because its ``llava-seed-bench.jsonl`` writes the image ids as ints (101669), which
    our runner reads back as the same digits.

    Raises FileNotFoundError for a missing file; ValueError naming the file and the question (its position, or
    its id once read) for a missing field, a ``question_type_id`` outside the map, an answer that is not A-D or
    a repeated id, and for a file without image questions.
    """
    data = _load_json(annotations, "SEED-Bench annotation file")
    if not (
        isinstance(data, dict)
        and isinstance(data.get("questions"), list)
        and isinstance(data.get("question_type"), dict)
    ):
        raise ValueError(f"{annotations}: expected an object with a 'questions' list and a 'question_type' map")
    type_names = {type_id: name for name, type_id in data["question_type"].items()}
    questions: dict[str, SEEDQuestion] = {}
    for number, record in enumerate(data["questions"]):
        if not isinstance(record, dict) or any(field not in record for field in _SEED_FIELDS):
            raise ValueError(f"{annotations} questions[{number}]: expected an object with fields {_SEED_FIELDS}")
        question_id = str(record["question_id"])
        where = f"{annotations} question {question_id}"
        type_id, answer = record["question_type_id"], record["answer"]
        if type_id not in type_names:
            raise ValueError(f"{where}: question_type_id {type_id!r} is not in the file's question_type map")
        if answer not in _SEED_LETTERS:
            raise ValueError(f"{where}: answer {answer!r} is not one of {_SEED_LETTERS}")
        if question_id in questions:
            raise ValueError(f"{where}: question_id repeated")
        questions[question_id] = SEEDQuestion(answer, type_id, type_names[type_id], str(record["data_type"]))
    if not any(question.data_type == "image" for question in questions.values()):
        raise ValueError(f"{annotations}: no image question (data_type 'image')")
    return questions


# --------------------------------------------------------------------------------------------------
# MMMU
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MMMUQuestion:
    """One MMMU question. ``question_type``: "multiple-choice" or "open" (anything else is scored as
    open, as in the reference). ``answer``: the letter (multiple-choice) or the answer text (open); a
    sequence means any of them is accepted. ``options``: the option texts in order (A, B, ...), empty
    for open questions. ``subject``: e.g. "Art_Theory" (the official ids ``validation_Art_Theory_12``
    carry it between the split and the number)."""

    question_type: str
    answer: str | Sequence[str]
    subject: str
    options: Sequence[str] = ()


_MMMU_EDGE_PUNCTUATION = (",", ".", "!", "?", ";", ":", "'")
# Content matching is tried only on responses of more than this many whitespace-separated tokens.
_MMMU_CONTENT_MIN_TOKENS = 5


def _mmmu_letters(count: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(count)]


def mmmu_letter(response: str, options: Sequence[str]) -> str | None:
    """The letter MMMU's ``parse_multi_choice_response`` picks, or None where it picks at random.

    Reproduces ``eval/eval_utils.py`` of MMMU-Benchmark/MMMU:

    1. ``,.!?;:'`` are stripped from both ends, one character kind after the other (so ".,A" keeps
       its comma), and the response is padded with one space each side. Inner whitespace is not
       normalised: "B\\n" never matches " B ".
    2. Candidates: every letter written "(X)"; if none, every letter written " X " (so the article in
       "A cat is ..." is option A; lower-case letters never count); if none and the response has more
       than five tokens, every option whose text occurs in it (case-insensitively).
    3. One candidate -> it. Several -> the one whose LAST occurrence ("(X)", " X " or the option text,
       by the rule that found them) starts furthest right; on a tie, the earlier letter. So "The
       answer is (C), not (A)" -> A.
    4. None -> the reference draws ``random.choice`` of the letters (see ``mmmu_guess``).
    """
    text = response
    for character in _MMMU_EDGE_PUNCTUATION:
        text = text.strip(character)
    text = f" {text} "
    letters = _mmmu_letters(len(options))

    # Each rule: letter -> the mark it looks for, and the text it looks in; the first rule that finds
    # any candidate decides.
    rules = [
        ({letter: f"({letter})" for letter in letters}, text),
        ({letter: f" {letter} " for letter in letters}, text),
    ]
    if len(text.split()) > _MMMU_CONTENT_MIN_TOKENS:
        rules.append(({letter: option.lower() for letter, option in zip(letters, options)}, text.lower()))
    for marks, haystack in rules:
        found = [letter for letter, mark in marks.items() if mark in haystack]
        if found:
            # np.argmax over the last-occurrence positions: the first maximum wins.
            positions = [haystack.rfind(marks[letter]) for letter in found]
            return found[positions.index(max(positions))]
    return None


def mmmu_guess(question_id: str, option_count: int) -> str:
    """The letter chosen where ``mmmu_letter`` finds none.

    Departure: the reference calls the module-level ``random.choice`` (seeded 42 once at import), so
    its pick depends on how many guesses came before; we draw from ``random.Random(question_id)`` so
    that each question's guess is reproducible on its own. Either way it is a uniform guess.
    """
    if option_count < 1:
        raise ValueError(f"MMMU question {question_id!r} is multiple-choice but has no options")
    return random.Random(question_id).choice(_mmmu_letters(option_count))


_MMMU_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_MMMU_TRIVIAL_KEYS = frozenset(":,.!?;'")

_MMMU_NUMBER_WITH_COMMAS = re.compile(
    r"""-? \b \d{1,3} (?: , \d{3} )+ \b   # 1,234 or -12,345,678""",
    re.VERBOSE,
)
_MMMU_NUMBER_SCIENTIFIC = re.compile(
    r"""-? \d+ (?: \. \d+ )? [eE] [+-]? \d+   # 1e5, 2.5E-3""",
    re.VERBOSE,
)
_MMMU_NUMBER_PLAIN = re.compile(
    r"""-? (?: \d+ \. \d+ | \. \d+ | \d+ \b )   # 3.14, .5, 42
        (?! [eE] [+-]? \d+ )                     # not the mantissa of a scientific number
        (?! [,\d] )                              # not part of a comma-grouped number""",
    re.VERBOSE,
)


def _mmmu_numbers(text: str) -> list[str]:
    """``extract_numbers``: comma-grouped, then scientific, then plain numbers, as found."""
    return (
        _MMMU_NUMBER_WITH_COMMAS.findall(text)
        + _MMMU_NUMBER_SCIENTIFIC.findall(text)
        + _MMMU_NUMBER_PLAIN.findall(text)
    )


def _mmmu_normalize(text: str) -> list[str | float]:
    """``normalize_str``: a number (commas removed, as ``float`` reads it) rounded to 2 places; else
    the lower-cased text, a single character as [" c", "c "] to avoid trivial substring matches."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        text = text.lower()
        return [f" {text}", f"{text} "] if len(text) == 1 else [text]


def _mmmu_key_responses(response: str) -> list[str]:
    """``get_key_subresponses``: the shortest tail after an answer indicator, per line."""
    text = response.strip().strip(".").lower()
    # The reference splits on r"\.\s(?=[A-Z])|\n", but only after lower-casing, so the sentence
    # alternative can never match: lines are the only units.
    lines = text.split("\n")
    keys: list[str] = []
    for number, line in enumerate(lines):
        indicators = _MMMU_KEY_INDICATORS + (("=",) if number == len(lines) - 1 else ())
        shortest = ""
        for indicator in indicators:
            if indicator in line:
                tail = line.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _MMMU_TRIVIAL_KEYS:
            keys.append(shortest)
    return keys or [text]


def mmmu_parse_open_response(response: str) -> list[str | float]:
    """MMMU's ``parse_open_response``: the candidate answers (strings and numbers) in a response.

    The key parts of the response (``_mmmu_key_responses``: per line, the shortest text after "could
    be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ", or "=" on the last line;
    the whole lower-cased response if no line has one), then every number found in them, each
    normalised (numbers to floats rounded to 2 places, text lower-cased). Duplicates removed; the
    reference returns them in ``set`` order, we keep first-seen order (the verdict does not depend on
    the order).
    """
    keys = _mmmu_key_responses(response)
    found: list[str] = keys + [number for key in keys for number in _mmmu_numbers(key)]
    normalized = [value for item in found for value in _mmmu_normalize(item)]
    return list(dict.fromkeys(normalized))


def mmmu_eval_open(answer: str | Sequence[str], parsed: Sequence[str | float]) -> bool:
    """MMMU's ``eval_open``: right if a parsed number equals a normalised answer number, or a
    normalised answer string occurs inside a parsed string (so the gold "paris" is found in "paris,
    france"; a one-character gold "b" only as " b" or "b ")."""
    golds = [answer] if isinstance(answer, str) else list(answer)
    normalized = [value for gold in golds for value in _mmmu_normalize(gold)]
    for prediction in parsed:
        if isinstance(prediction, str):
            if any(isinstance(gold, str) and gold in prediction for gold in normalized):
                return True
        elif prediction in normalized:
            return True
    return False


def score_mmmu(predictions: Mapping[str, str], questions: Mapping[str, MMMUQuestion]) -> ScoreReport:
    """MMMU accuracy as the official ``main_parse_and_eval.py`` + ``main_eval_only.py`` compute it.

    Multiple-choice: ``mmmu_letter`` (the reference's ``parse_multi_choice_response``), falling back
    to ``mmmu_guess`` where it finds no letter (``counts["random_guess"]``; the departure there is only
    the seeding), right if equal to the answer letter (or to one of them). Open: right if
    ``mmmu_eval_open(answer, mmmu_parse_open_response(response))``.

    overall: instance-level accuracy (``calculate_ins_level_acc``: per-subject accuracy weighted by
    its question count); breakdowns ``subject``: accuracy per subject. Each is rounded to 3 places as a
    fraction, as ``main_eval_only.py`` prints it, and given in percent (so 2/3 -> 66.7).
    """
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    counts = {"questions": 0, "multiple_choice": 0, "open": 0, "random_guess": 0, "missing": 0}
    for question_id, question in questions.items():
        total[question.subject] += 1
        counts["questions"] += 1
        is_choice = question.question_type == "multiple-choice"
        counts["multiple_choice" if is_choice else "open"] += 1
        if question_id not in predictions:
            counts["missing"] += 1
            continue
        response = predictions[question_id]
        if is_choice:
            letter = mmmu_letter(response, question.options)
            if letter is None:
                counts["random_guess"] += 1
                letter = mmmu_guess(question_id, len(question.options))
            golds = [question.answer] if isinstance(question.answer, str) else list(question.answer)
            correct = letter in golds
        else:
            correct = mmmu_eval_open(question.answer, mmmu_parse_open_response(response))
        right[question.subject] += int(correct)
    if not total:
        raise ValueError("no MMMU question to score")

    accuracy = {subject: right[subject] / total[subject] for subject in sorted(total)}
    overall = sum(accuracy[subject] * total[subject] for subject in accuracy) / sum(total.values())
    per_subject = {subject: _mmmu_percent(value) for subject, value in accuracy.items()}
    return ScoreReport("MMMU", _mmmu_percent(overall), {"subject": per_subject}, counts)


def _mmmu_percent(fraction: float) -> float:
    """``round(acc, 3)`` as the reference prints it, in percent (one decimal, float noise removed)."""
    return round(round(fraction, 3) * 100, 1)


def _mmmu_parquet_files(dataset: Path) -> list[Path]:
    """The ``validation-*.parquet`` files under ``dataset`` (pyarrow importable, or ImportError)."""
    if not dataset.is_dir():
        raise FileNotFoundError(f"MMMU dataset directory not found: {dataset}")
    files = sorted(dataset.rglob("validation-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no validation-*.parquet under {dataset} (expected <Subject>/validation-*.parquet)")
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ImportError("reading MMMU's parquet files needs pyarrow: pip install pyarrow") from None
    return files


def _mmmu_option_list(cell: object, where: str) -> tuple[str, ...]:
    """An ``options`` cell (a Python list literal) as MMMU's ``construct_prompt`` reads it, with
    ``ast.literal_eval`` in place of its ``eval``."""
    try:
        parsed = ast.literal_eval(cell) if isinstance(cell, str) else None
    except (SyntaxError, TypeError, ValueError):
        parsed = None
    if not (isinstance(parsed, list) and all(isinstance(option, str) for option in parsed)):
        raise ValueError(f"{where}: options {cell!r} is not a list of strings")
    return tuple(parsed)


def _mmmu_options(dataset: Path) -> dict[str, tuple[str, ...]]:
    """id -> option texts from the ``validation-*.parquet`` files under ``dataset`` (columns ``id``, ``options``)."""
    files = _mmmu_parquet_files(dataset)
    import pyarrow.parquet as pq

    options: dict[str, tuple[str, ...]] = {}
    for path in files:
        try:
            rows = pq.read_table(path, columns=["id", "options"]).to_pylist()
        except (OSError, ValueError, KeyError) as err:  # pyarrow's errors derive from these
            raise ValueError(f"{path}: not a parquet file with 'id' and 'options' columns ({err})") from None
        for row in rows:
            options[row["id"]] = _mmmu_option_list(row["options"], f"{path} question {row['id']}")
    return options


def _mmmu_answers(annotations: Path) -> dict[str, tuple[str, str | tuple[str, ...], str]]:
    """id -> (question_type, ground truth, subject) from ``answer_dict_val.json``, the subject taken from the id
    as ``main_eval_only.py`` takes it (``"_".join(id.split("_")[1:-1])``)."""
    answers = _load_json(annotations, "MMMU answer file")
    if not isinstance(answers, dict) or not answers:
        raise ValueError(f"{annotations}: expected a non-empty object id -> {{question_type, ground_truth}}")
    parsed: dict[str, tuple[str, str | tuple[str, ...], str]] = {}
    for question_id, record in answers.items():
        where = f"{annotations} question {question_id}"
        subject = "_".join(question_id.split("_")[1:-1])
        if not subject:
            raise ValueError(f"{where}: the id is not '<split>_<Subject>_<number>'")
        if not isinstance(record, dict) or not isinstance(record.get("question_type"), str):
            raise ValueError(f"{where}: expected an object with a 'question_type' string")
        truth = record.get("ground_truth")
        if isinstance(truth, list) and truth and all(isinstance(answer, str) for answer in truth):
            truth = tuple(truth)
        elif not isinstance(truth, str):
            raise ValueError(f"{where}: ground_truth must be a string or a list of strings, got {truth!r}")
        parsed[question_id] = (record["question_type"], truth, subject)
    return parsed


def read_mmmu(annotations: Path, dataset: Path) -> dict[str, MMMUQuestion]:
    """MMMU's validation questions, keyed by MMMU's ids ("validation_Art_Theory_12"), as ``main_eval_only.py``
    scores them.

    annotations: ``answer_dict_val.json`` from MMMU-Benchmark/MMMU (``eval/``), the answers
    ``main_eval_only.py`` scores against: id -> ``{"question_type": "multiple-choice" | "short-answer",
    "ground_truth": letter, text or list of texts}``. The subject is the id between the split and the number.

    dataset: a local copy of the Hugging Face dataset MMMU/MMMU (``<Subject>/validation-00000-of-00001.parquet``,
    e.g. ``huggingface-cli download MMMU/MMMU --repo-type dataset``), read for the multiple-choice options only
    (columns ``id`` and ``options``). The answer file has no options, and the reference needs them: they are
    the letters a response may name and the texts it matches (``parse_multi_choice_response`` gets
    ``all_choices`` and ``index2ans`` from them). No JSON file of MMMU's holds them, so this needs pyarrow,
    imported here (ImportError telling to ``pip install pyarrow`` without it).

    Raises FileNotFoundError for a missing file or directory (or no ``validation-*.parquet`` under
    ``dataset``); ValueError naming the file and question for a malformed record, an options cell that is not a
    list of strings, a multiple-choice question without options, or a multiple-choice ground truth that is not
    one of its option letters.
    """
    answers = _mmmu_answers(annotations)
    options = _mmmu_options(dataset)
    questions: dict[str, MMMUQuestion] = {}
    for question_id, (question_type, truth, subject) in answers.items():
        where = f"{annotations} question {question_id}"
        choices: tuple[str, ...] = ()
        if question_type == "multiple-choice":
            choices = options.get(question_id, ())
            if not choices:
                raise ValueError(f"{where}: multiple-choice, but no options for it under {dataset}")
            letters = _mmmu_letters(len(choices))
            if any(answer not in letters for answer in ([truth] if isinstance(truth, str) else truth)):
                raise ValueError(f"{where}: ground_truth {truth!r} is not one of the option letters {letters}")
        questions[question_id] = MMMUQuestion(question_type, truth, subject, choices)
    return questions


MMMU_PROMPT = "Answer with the option's letter from the given choices directly."
"""lmms-eval's ``mmmu_val`` task's multiple-choice instruction (``lmms_eval_specific_kwargs.default``)."""
MMMU_OPEN_PROMPT = "Answer the question using a single word or phrase."
"""lmms-eval's ``mmmu_val`` instruction for the open (short-answer) questions."""
_MMMU_IMAGE_TAG = re.compile(r"<image (\d+)>")


def build_mmmu_questions(
    dataset: Path, out_dir: Path, prompt: str = MMMU_PROMPT, open_prompt: str = MMMU_OPEN_PROMPT
) -> Path:
    """MMMU's validation split (a local copy of the Hugging Face dataset MMMU/MMMU, ``<Subject>/validation-
    *.parquet``) -> ``out_dir/questions.jsonl`` for ``eval/run.py`` and the images under ``out_dir/images``.

    The prompt is built as lmms-eval's ``mmmu_val`` task builds it (``construct_prompt``): multiple-choice:
    the question, "\\n", the options as "A. text" lines, "\\n\\n", ``prompt``; open: the question, "\\n\\n",
    ``open_prompt``; the ``<image i>`` tags stay in the text. Ids are MMMU's ("validation_Art_Theory_1"),
    the keys of ``answer_dict_val.json`` (``read_mmmu``). Departure: lmms-eval hands the model every image
    the prompt names; a MambaVLM takes one, the first the prompt names by number (``image_1`` for most
    questions), written as ``images/<id>.<ext>`` from the parquet's bytes; a question that names none is
    text-only. Needs pyarrow. Raises FileNotFoundError for a missing directory or no parquet files,
    ValueError naming the file and question for a missing column, bad options or a named image that is
    not there.
    """
    files = _mmmu_parquet_files(Path(dataset))
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for path in files:
        try:
            rows = pq.read_table(path).to_pylist()
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: not a parquet file ({err})") from None
        for row in rows:
            where = f"{path} question {row.get('id')}"
            question_id, question = _field(row, "id", str, where), _field(row, "question", str, where)
            question_type = _field(row, "question_type", str, where)
            if question_type == "multiple-choice":
                options = _mmmu_option_list(row.get("options"), where)
                listed = "\n".join(f"{letter}. {option}" for letter, option in zip(_mmmu_letters(len(options)), options))
                text = f"{question}\n{listed}\n\n{prompt}"
            else:
                text = f"{question}\n\n{open_prompt}"
            line: dict[str, Any] = {"question_id": question_id, "text": text}
            numbers = sorted({int(n) for n in _MMMU_IMAGE_TAG.findall(text)})
            if numbers:
                image = row.get(f"image_{numbers[0]}")
                if not isinstance(image, dict) or not image.get("bytes"):
                    raise ValueError(f"{where}: the prompt names <image {numbers[0]}> but image_{numbers[0]} is empty")
                suffix = Path(image.get("path") or "x.png").suffix or ".png"
                name = f"images/{question_id}{suffix}"
                (out_dir / name).write_bytes(image["bytes"])
                line["image"] = name
            lines.append(line)
    out = out_dir / "questions.jsonl"
    with atomic_file(out) as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    return out
