"""Answer a benchmark's questions with a MambaVLM: batched, sharded over processes, resumable.

``run_benchmark`` is what ``accelerate launch eval/run.py`` runs. Each process answers every n-th
question (greedy, left-padded batches) and appends its answers to ``answers.RANK-of-N.jsonl`` as
batches finish, flushed to disk; a run started again reads every shard file already written (whatever
the number of processes was) and answers only what is missing. When all processes are done the main
process writes ``answers.jsonl`` (LLaVA's format: ``question_id``, ``prompt``, ``text``, ``model_id``, in
question order), ``skipped.jsonl`` (``question_id``, ``reason``) and ``results.json``, each atomically,
and prints a summary. results.json comes last, after an earlier run's is removed: a folder holding one
holds the answers it counts, and a run killed between the files leaves none (the same command run again
writes all three from the shard files). The settings that decide the answers (``answer_settings``: the model, the benchmark,
the question file and its content, the image folder, the decoding) are written to ``run_settings.json``
when a run starts; a run started again in a folder whose answers were made with other settings stops
with ``SettingsMismatchError`` naming each difference, instead of passing the old answers off as its own
(the batch size, ``limit`` and the number of processes may change between runs: they do not change an
answer). A question that cannot be answered (an unreadable image, a prompt that is not a
string, placeholders that do not match the image, a prompt too long for the model) is reported by its
id and counted; every other question is answered. A run started again answers the questions that are
missing and retries those skipped before (the images may have been put right since); answered ones are
kept. A run that ends with no question answered writes ``skipped.jsonl`` only and raises
``NothingAnsweredError`` (no results.json: no score over zero answers).

Scores: with ``annotations`` the answers are scored against the benchmark's published files
(``score_run``); a question file holding questions those files do not (another benchmark's or split's) is
refused before any answer (``check_questions_annotated``), as the scorer would refuse their answers. With ``limit`` below the number of questions, only the asked questions' annotations are
scored (as lmms-eval's ``--limit`` does), so ``scores`` covers those questions, the asked ones without an
answer (skipped) counting as missing; results.json says so in ``scores_cover`` and counts the questions
left out in ``num_not_asked``. ``recorded_annotations`` reads the annotation files an earlier run's
results.json was scored against, which ``eval/run.py`` reuses when it is run again without
``--annotations``.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import logging
import os
import subprocess
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from mambavlm.atomic import atomic_file
from mambavlm.eval.benchmarks import (
    BENCHMARKS,
    AnnotationFiles,
    check_annotation_files,
    ids_held_by,
    score_answers,
)
from mambavlm.eval.model_dir import model_label
from mambavlm.eval.questions import EvalQuestion, read_questions
from mambavlm.eval.scorers.closed_set import argmax_option
from mambavlm.eval.scorers.report import ScoreReport, format_report, unknown_ids_message
from mambavlm.eval.scorers.vqa import llava_textvqa_question, read_textvqa_llava_index
from mambavlm.model import MambaVLM
from mambavlm.processes import check_process_group
from mambavlm.training.evaluation import iter_answers
from mambavlm.vision.image import image_path_problem

__all__ = [
    "ANSWERS_FILE",
    "RESULTS_FILE",
    "SETTINGS_FILE",
    "SHOWN_SKIPS",
    "first_skips",
    "image_not_found",
    "no_image_opens",
    "SKIPPED_FILE",
    "NothingAnsweredError",
    "RecordFileError",
    "RunSettings",
    "SettingsMismatchError",
    "UnannotatedQuestionsError",
    "answer_settings",
    "check_benchmark_name",
    "check_questions_annotated",
    "file_sha256",
    "nothing_answered_message",
    "read_json_object",
    "recorded_annotations",
    "run_benchmark",
    "score_run",
    "settings_differences",
]

logger = logging.getLogger(__name__)

ANSWERS_FILE = "answers.jsonl"
SKIPPED_FILE = "skipped.jsonl"
RESULTS_FILE = "results.json"
SETTINGS_FILE = "run_settings.json"
SHOWN_SKIPS = 3
"""How many skipped questions (id and reason) the error of a run that answered nothing names."""


class SettingsMismatchError(ValueError):
    """An output folder holds answers made with other settings than this run's."""


class RecordFileError(ValueError):
    """A JSON file a run recorded (``run_settings.json``, ``results.json``) cannot be read back as a JSON
    object; the message names the file and what is wrong with it."""


class UnannotatedQuestionsError(ValueError):
    """Questions of the question file that the annotation files do not hold (``check_questions_annotated``):
    their answers could not be scored; the message names how many, the first ids and the files."""


class NothingAnsweredError(RuntimeError):
    """A run ended with no question answered (every one skipped, or none to answer); the message names
    how many were skipped and the first reasons."""


def read_json_object(path: Path, what: str = "settings") -> dict[str, Any]:
    """The JSON object recorded in ``path`` (``what`` it records, for the message: "settings", "results").

    Raises FileNotFoundError where ``path`` does not exist, and RecordFileError (a ValueError, one line
    naming ``path``) where it cannot be read, is not UTF-8 text (binary content), is not valid JSON, or
    holds JSON that is not an object (a list, a number, ...).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        problem = f"not UTF-8 text ({err.reason} at byte {err.start})"
    except FileNotFoundError:
        raise
    except OSError as err:
        problem = f"cannot be read ({err.strerror or err})"
    else:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            problem = f"not valid JSON ({err.msg}: line {err.lineno} column {err.colno})"
        else:
            if isinstance(value, dict):
                return value
            problem = f"JSON {type(value).__name__ if value is not None else 'null'}, not an object"
    raise RecordFileError(f"{path} is not a JSON object of {what}: {problem}")


def check_benchmark_name(benchmark: str, custom: bool = False) -> None:
    """ValueError unless ``benchmark`` is one of ``BENCHMARKS`` (listing them, and the nearest name), or
    ``custom`` says that it is deliberately a benchmark of one's own (then it must not be a known one)."""
    if custom:
        if benchmark in BENCHMARKS:
            raise ValueError(f"{benchmark!r} is a known benchmark; drop --custom-benchmark")
        return
    if benchmark not in BENCHMARKS:
        close = difflib.get_close_matches(benchmark, list(BENCHMARKS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown benchmark {benchmark!r}{hint}; expected one of {', '.join(BENCHMARKS)} "
            "(or pass --custom-benchmark to answer a question file of your own, unscored)"
        )


@dataclass(frozen=True)
class RunSettings:
    """One evaluation run. model: a MambaVLM directory. benchmark: its name (recorded). questions: a
    LLaVA-style question JSONL; image_root: what its image paths are relative to (None: its
    directory). output_dir: where answers and results go. batch_size: prompts per generate call;
    limit: answer only the first N questions; max_new_tokens: greedy decoding length. annotations:
    the benchmark's published files (``mambavlm.eval.benchmarks``): read before any question is
    answered (a wrong file fails at once; a questions or split file the benchmark does not read is a
    ValueError) and the answers scored into results.json. options: answer
    by likelihood over this closed set (``MambaVLM.option_logprobs``, Prismatic's mode) instead of
    generating; each answer row then also holds ``option_logprobs`` and ``text`` is the argmax.
    custom_benchmark: ``benchmark`` is deliberately not one of ``BENCHMARKS`` (answered, not scored);
    otherwise an unknown name (a typo) is a ValueError."""

    model: Path
    benchmark: str
    questions: Path
    output_dir: Path
    image_root: Path | None = None
    batch_size: int = 8
    limit: int | None = None
    max_new_tokens: int = 16
    annotations: AnnotationFiles | None = None
    options: tuple[str, ...] | None = None
    custom_benchmark: bool = False

    def __post_init__(self) -> None:
        check_benchmark_name(self.benchmark, self.custom_benchmark)
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.annotations is not None and self.benchmark not in BENCHMARKS:
            raise ValueError(f"scoring needs a known benchmark ({', '.join(BENCHMARKS)}), got {self.benchmark!r}")
        if self.annotations is not None:
            check_annotation_files(self.benchmark, self.annotations)
        if self.annotations is not None and self.options is not None and BENCHMARKS[self.benchmark].score_likelihood is None:
            with_one = [name for name, spec in BENCHMARKS.items() if spec.score_likelihood is not None]
            raise ValueError(
                f"{self.benchmark} has no likelihood scorer, so --mode likelihood answers cannot be scored with "
                f"--annotations: answer it by generation (drop --mode likelihood / --options), or drop --annotations "
                f"to answer it unscored (benchmarks with one: {', '.join(with_one)})"
            )


def _read_lines(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of a shard file (a line cut by a killed run is dropped)."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "question_id" in row:
            rows.append(row)
    return rows


def _shard_files(output_dir: Path, kind: str) -> list[Path]:
    return sorted(output_dir.glob(f"{kind}.*-of-*.jsonl"))


def _rewrite_whole_lines(path: Path) -> None:
    """Keep only complete lines, so that appending after a kill does not glue onto a cut one."""
    if path.is_file():
        rows = _read_lines(path)
        with atomic_file(path) as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's content (hex), as ``run_settings.json`` records a question file's."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def answer_settings(settings: RunSettings) -> dict[str, Any]:
    """What decides the answers of a run, as ``run_settings.json`` records it: the model folder, the
    benchmark, the question file (path and SHA-256 of its content: the prompts are in it), the image
    folder (paths resolved), the decoding mode, ``max_new_tokens`` (it also decides which prompts are
    too long) and the likelihood options."""
    return {
        "model": str(settings.model.resolve()),
        "benchmark": settings.benchmark,
        "questions": str(settings.questions.resolve()),
        "questions_sha256": file_sha256(settings.questions),
        "image_folder": str((settings.image_root or settings.questions.parent).resolve()),
        "mode": "generate" if settings.options is None else "likelihood",
        "max_new_tokens": settings.max_new_tokens,
        "options": None if settings.options is None else list(settings.options),
    }


def settings_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``KEY: OLD before, NEW now`` (values as repr) for each of ``current``'s settings that ``recorded``
    holds otherwise (or not at all), in ``current``'s order: how a refusal names what changed."""
    return [
        f"{key}: {recorded.get(key)!r} before, {value!r} now"
        for key, value in current.items()
        if recorded.get(key) != value
    ]


def _check_earlier_settings(out: Path, current: dict[str, Any], model_id: str) -> bool:
    """Raise SettingsMismatchError if ``out`` holds answers made with other settings than ``current``, or
    its run_settings.json cannot be read (one line naming it); returns whether ``run_settings.json``
    should be (re)written. A folder without answers takes the new settings whatever it recorded (its
    skips bind nothing: they are retried, so a run that answered nothing for a wrong image folder can be
    run again with the right one); one with answers but no settings file (written before settings were
    recorded) is only checked for the model's name in its rows, with a warning."""
    earlier = [row for p in _shard_files(out, "answers") for row in _read_lines(p)]
    recorded_path = out / SETTINGS_FILE
    if not earlier:
        return True
    if not recorded_path.is_file():
        names = sorted({row["model_id"] for row in earlier if isinstance(row.get("model_id"), str)} - {model_id})
        if names:
            raise SettingsMismatchError(
                f"{out} holds answers of another model ({', '.join(names)}, not {model_id}); "
                f"pass another --output-dir, or delete {out} to answer again"
            )
        logger.warning(f"{out} holds answers but no {SETTINGS_FILE}: going on from them as they are")
        return True
    try:
        recorded = read_json_object(recorded_path, "settings")
    except RecordFileError as err:
        raise SettingsMismatchError(
            f"{err}; cannot tell what settings the answers in {out} were made with: pass another --output-dir, "
            f"or delete {out} to answer again"
        ) from None
    differences = [f"  {difference}" for difference in settings_differences(recorded, current)]
    if differences:
        raise SettingsMismatchError(
            f"{out} holds {len(earlier)} questions answered with other settings ({recorded_path}):\n"
            + "\n".join(differences)
            + f"\nPass another --output-dir, or delete {out} to answer again with these settings."
        )
    return False


def _git_commit() -> str | None:
    """The commit of the checkout mambavlm runs from, or None outside one."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except OSError:
        return None
    return result.stdout.strip() or None


def recorded_annotations(output_dir: Path, benchmark: str) -> AnnotationFiles | None:
    """The annotation files the results.json in ``output_dir`` was scored against, for scoring a run
    started again without ``--annotations`` against the same files; None where there is no results.json,
    it holds no scores, or it is another benchmark's.

    Raises RecordFileError (naming the file) where results.json cannot be read as a JSON object, or its
    ``annotations`` entry is not an object of file paths with an ``annotations`` one.
    """
    path = output_dir / RESULTS_FILE
    if not path.is_file():
        return None
    results = read_json_object(path, "results")
    recorded = results.get("annotations")
    if recorded is None or results.get("benchmark") != benchmark:
        return None
    fields = ("annotations", "questions", "split_file")
    if (not isinstance(recorded, dict) or not isinstance(recorded.get("annotations"), str)
            or any(key not in fields or not isinstance(value, str) for key, value in recorded.items())):
        raise RecordFileError(
            f"{path}: 'annotations' is not an object of file paths ({', '.join(fields)}; 'annotations' "
            f"required): {recorded!r}"
        )
    return AnnotationFiles(**{key: Path(value) for key, value in recorded.items()})


_GROUP_KEYS: dict[str, Callable[[Any], Hashable]] = {
    "mme": lambda question: (question.category, question.image_id),  # acc+ scores an image's pair
    "mmbench": lambda question: question.base_index,  # CircularEval scores a question's passes together
}
"""The benchmarks whose scorer scores questions in groups: what groups them. A subset scored keeps each
group whole (its members not asked count as missing), as the scorer needs."""


def _item_keys(benchmark: str, items: Mapping[str, Any], questions: Sequence[EvalQuestion],
               files: AnnotationFiles) -> dict[str, str | None]:
    """Question id -> the key of its annotation item in ``items``: the question file's id, or (TextVQA run
    on LLaVA's file, whose id is the image's) the one found through the prompt as the scorer finds answers;
    None where the files hold no item for the question (or its TextVQA prompt is not a string, or not one
    the scorer reads a question from)."""
    keys = {q.question_id: str(q.source_id) if str(q.source_id) in items else None for q in questions}
    if benchmark == "textvqa" and None in keys.values():
        index = read_textvqa_llava_index(files.annotations)
        for question in questions:
            if keys[question.question_id] is not None or not isinstance(question.text, str):
                continue
            try:
                key = (str(question.source_id).split("#", 1)[0], llava_textvqa_question(question.text))
            except ValueError:
                continue
            keys[question.question_id] = index.get(key)
    return keys


def check_questions_annotated(benchmark: str, items: Mapping[str, Any], questions: Sequence[EvalQuestion],
                              files: AnnotationFiles, path: Path) -> None:
    """UnannotatedQuestionsError where a question of ``path`` (its string-prompted ``questions``: the others
    are skipped, not answered) has no annotation item in ``items``, so that its answer could not be scored
    (``score_answers`` refuses it): named before anything is answered, with how many, the first five ids (a
    repeated id reads ``ID#n``) and the files."""
    keys = _item_keys(benchmark, items, questions, files)
    unknown = [str(q.source_id) for q in questions if keys[q.question_id] is None and isinstance(q.text, str)]
    if unknown:
        message = unknown_ids_message(unknown, ids_held_by(benchmark, files), f"{benchmark}: {path} asks")
        raise UnannotatedQuestionsError(
            f"{message} (a question file of another benchmark or split, or ids it repeats, read as ID#n?): their "
            "answers could not be scored; nothing answered"
        )


def _asked_items(benchmark: str, items: dict[str, Any], asked: Sequence[EvalQuestion],
                 files: AnnotationFiles) -> dict[str, Any]:
    """The annotation items of the ``asked`` questions (``_item_keys``), MME's and MMBench's groups kept
    whole (``_GROUP_KEYS``)."""
    keys = {key for key in _item_keys(benchmark, items, asked, files).values() if key is not None}
    group_of = _GROUP_KEYS.get(benchmark)
    if group_of is not None:
        groups = {group_of(items[key]) for key in keys}
        keys |= {key for key, item in items.items() if group_of(item) in groups}
    return {key: item for key, item in items.items() if key in keys}


def score_run(benchmark: str, answers: Path, files: AnnotationFiles,
              asked: Sequence[EvalQuestion] | None = None) -> ScoreReport:
    """Score an answers JSONL with ``score_answers``; with ``asked`` (the questions a ``--limit`` run
    asked), against those questions' annotation items only (``_asked_items``), so that the questions not
    asked neither count as missing nor lower the overall (asked ones without an answer still count as
    missing, as the scorer counts them). Raises what ``score_answers`` raises: ValueError (an unknown
    benchmark, a likelihood-mode answers file for a benchmark without a likelihood scorer, an answer whose
    id the asked items do not hold, a malformed answers or annotation file) and FileNotFoundError.
    """
    if asked is None:
        return score_answers(benchmark, answers, files)
    subset = _asked_items(benchmark, dict(BENCHMARKS[benchmark].read(files)), asked, files)
    return score_answers(benchmark, answers, files, items=subset)


def first_skips(skipped: Sequence[tuple[str, str]]) -> str:
    """The first ``SHOWN_SKIPS`` skipped questions or records as ``id: reason`` and how many more, for the
    error of a run that answered nothing (``eval/run.py``'s and ``eval/evaluate.py``'s)."""
    shown = "; ".join(f"{item_id}: {reason}" for item_id, reason in skipped[:SHOWN_SKIPS])
    return shown + (f"; and {len(skipped) - SHOWN_SKIPS} more" if len(skipped) > SHOWN_SKIPS else "")


def image_not_found(skipped: Sequence[tuple[str, str]]) -> bool:
    """Whether any of ``skipped`` was skipped for an image file that was not found (the image folder may
    be wrong)."""
    return any(reason.startswith("image file not found") for _, reason in skipped)


def no_image_opens(items: Sequence[tuple[str, str | Path | None]]) -> list[tuple[str, str]] | None:
    """``(id, reason)`` for every ``(id, image path)`` of ``items`` that has an image, when there is one and none
    of them is a file (``image_path_problem``: a wrong image folder, say), else None. Checked before the model
    loads, so that such a run says it once rather than warning for every record after trying to read its image."""
    with_images = [(item_id, image) for item_id, image in items if image is not None]
    problems = [(item_id, problem) for item_id, image in with_images if (problem := image_path_problem(image))]
    return problems if with_images and len(problems) == len(with_images) else None


def nothing_answered_message(settings: RunSettings, skipped: list[tuple[str, str]]) -> str:
    """The one-line error of a run that answered no question: the count skipped, the first ``SHOWN_SKIPS``
    reasons, and a hint at --image-folder where an image was not found."""
    kept = f"no {RESULTS_FILE} written"
    if not skipped:
        return f"{settings.questions} holds no questions to answer: nothing answered; {kept}"
    hint = " (is --image-folder right? default: the question file's folder)" if image_not_found(skipped) else ""
    return (f"no question answered: all {len(skipped)} skipped ({first_skips(skipped)}; each listed in "
            f"{settings.output_dir / SKIPPED_FILE}){hint}; {kept}")


def run_benchmark(settings: RunSettings, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Answer ``settings.questions`` (sharded, resumable: answered questions are kept, skipped ones
    retried) and write the outputs; returns results.json's content on the main process (``{}`` elsewhere).
    Where none of a process's questions with an image can open it (a wrong image folder), they are skipped
    with one warning, before the model loads (not loaded at all where nothing else is left to answer).

    Raises FileNotFoundError for a missing model or question file, QuestionFileError (a ValueError) for a
    question file that is not JSONL, SettingsMismatchError where ``output_dir`` holds answers made with
    other settings or its run_settings.json cannot be read, the annotation readers' ValueError or
    FileNotFoundError for a wrong annotation file, UnannotatedQuestionsError (a ValueError) for questions
    the annotation files do not hold (all before any answer), and NothingAnsweredError (on
    the main process, after writing skipped.jsonl) where no question ends up answered.
    """
    acc = accelerator or Accelerator()
    check_process_group(acc)
    out = settings.output_dir
    items = None if settings.annotations is None else BENCHMARKS[settings.benchmark].read(settings.annotations)
    questions, problems = read_questions(settings.questions, settings.image_root)
    if acc.is_main_process:  # the file's own problems (the questions' are named as they are answered)
        for where, reason in problems:
            logger.warning("skipping %s: %s", where, reason)
    if items is not None:  # a wrong annotation or question file fails now, not after the answers
        check_questions_annotated(settings.benchmark, items, questions, settings.annotations, settings.questions)
    num_not_asked = 0
    if settings.limit is not None:
        num_not_asked = max(len(questions) - settings.limit, 0)
        questions = questions[: settings.limit]
    current = answer_settings(settings)
    model_id = model_label(settings.model.resolve())  # a run's name for its final/ or student/, as the output path
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    # every process checks the folder as it was before this run (the main process rewrites the settings
    # file only where it matches, or where there are no answers to go on from), so all stop or none
    write_settings = _check_earlier_settings(out, current, model_id)
    if acc.is_main_process and write_settings:
        with atomic_file(out / SETTINGS_FILE) as f:
            json.dump(current, f, indent=1)
    acc.wait_for_everyone()
    rank, world = acc.process_index, acc.num_processes
    answers_path = out / f"answers.{rank}-of-{world}.jsonl"
    skipped_path = out / f"skipped.{rank}-of-{world}.jsonl"
    for path in (answers_path, skipped_path):
        _rewrite_whole_lines(path)
    acc.wait_for_everyone()
    done = {row["question_id"] for p in _shard_files(out, "answers") for row in _read_lines(p)}
    skipped_before = {row["question_id"] for p in _shard_files(out, "skipped") for row in _read_lines(p)} - done
    acc.wait_for_everyone()  # every process has read the skips before the main process drops the retried ones
    if acc.is_main_process:
        _drop_skips(out, {q.question_id for q in questions})
    acc.wait_for_everyone()
    mine = [q for q in questions[rank::world] if q.question_id not in done]
    retried = sum(q.question_id in skipped_before for q in mine)
    logger.info(
        f"process {rank}/{world}: {len(mine)} of {len(questions[rank::world])} questions to answer "
        f"({len(done)} answered before, kept; {retried} of these skipped before, retried)"
    )
    # a wrong --image-folder: said once, before the model loads, rather than a warning a question
    no_image = no_image_opens([(q.question_id, q.image) for q in mine]) or []
    if no_image:
        logger.warning(f"process {rank}/{world}: none of the {len(no_image)} questions' images can be opened "
                       f"({first_skips(no_image)}): is --image-folder right? (default: the question file's "
                       "folder); they are skipped")
        gone = {question_id for question_id, _ in no_image}
        mine = [q for q in mine if q.question_id not in gone]
    prompts = {q.question_id: q.text for q in mine}
    items = [(q.question_id, q.image, q.text) for q in mine]
    batches: Iterable[tuple[list[tuple[str, Any]], list[tuple[str, str]]]] = [([], no_image)]
    if items:
        model = MambaVLM.from_pretrained(settings.model).to(acc.device).eval()
        batches = itertools.chain(batches, iter_answers(
            model, items, settings.batch_size, settings.max_new_tokens, show_progress=acc.is_local_main_process,
            options=settings.options,
        ))
    with answers_path.open("a") as answers_file, skipped_path.open("a") as skipped_file:
        for answers, skipped in batches:
            for question_id, answer in answers:
                row = {"question_id": question_id, "prompt": prompts[question_id], "text": answer, "model_id": model_id}
                if settings.options is not None:
                    row["text"] = argmax_option(answer)
                    row["option_logprobs"] = answer
                answers_file.write(json.dumps(row) + "\n")
            for question_id, reason in skipped:
                skipped_file.write(json.dumps({"question_id": question_id, "reason": reason}) + "\n")
            for f in (answers_file, skipped_file):
                f.flush()
                os.fsync(f.fileno())
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return {}
    return _finish(settings, questions, problems, model_id, num_not_asked)


def _drop_skips(out: Path, retried: set[str]) -> None:
    """Rewrite each skipped shard without the rows of the ``retried`` questions (each is answered or
    skipped again, with its reason of now, by this run); the skips of other questions are kept."""
    for path in _shard_files(out, "skipped"):
        rows = _read_lines(path)
        kept = [row for row in rows if row["question_id"] not in retried]
        if len(kept) != len(rows):
            with atomic_file(path) as f:
                for row in kept:
                    f.write(json.dumps(row) + "\n")


def _finish(
    settings: RunSettings, questions: list[EvalQuestion], problems: list[tuple[str, str]], model_id: str,
    num_not_asked: int = 0,
) -> dict[str, Any]:
    """Merge the shards in question order and write answers.jsonl, skipped.jsonl and results.json (scored
    over the asked questions' annotations where ``num_not_asked`` questions were left out by the limit).
    Raises NothingAnsweredError, after writing skipped.jsonl only, where no question is answered."""
    out = settings.output_dir
    answered = {row["question_id"]: row for p in _shard_files(out, "answers") for row in _read_lines(p)}
    skipped = {row["question_id"]: row for p in _shard_files(out, "skipped") for row in _read_lines(p)}
    order = [q.question_id for q in questions]
    source_ids = {q.question_id: q.source_id for q in questions}  # the ids as the question file gives them
    skipped_rows = [{"question_id": qid, "reason": reason} for qid, reason in problems]
    skipped_rows += [{**skipped[qid], "question_id": source_ids[qid]} for qid in order
                     if qid in skipped and qid not in answered]
    with atomic_file(out / SKIPPED_FILE) as f:
        for row in skipped_rows:
            f.write(json.dumps(row) + "\n")
    missing = [qid for qid in order if qid not in answered and qid not in skipped]
    if not any(qid in answered for qid in order):
        # earlier answers.jsonl and results.json (if any) are left as they were: no score over zero answers
        raise NothingAnsweredError(
            nothing_answered_message(settings, [(str(row["question_id"]), row["reason"]) for row in skipped_rows])
        )
    # results.json is written last and vouches for the answers beside it: an earlier run's goes first, so a
    # run killed in between leaves no results.json rather than one counting other answers
    (out / RESULTS_FILE).unlink(missing_ok=True)
    with atomic_file(out / ANSWERS_FILE) as f:
        for question_id in order:
            if question_id in answered:
                f.write(json.dumps({**answered[question_id], "question_id": source_ids[question_id]}) + "\n")
    results = {
        "benchmark": settings.benchmark,
        "model": str(settings.model),
        "model_id": model_id,
        "questions": str(settings.questions),
        "num_questions": len(order) + len(problems),
        "num_answered": sum(qid in answered for qid in order),
        "num_skipped": len(skipped_rows),
        "skipped_by_reason": dict(Counter(row["reason"].split(":")[0] for row in skipped_rows)),
        "num_missing": len(missing),
        "limit": settings.limit,
        "num_not_asked": num_not_asked,
        "decoding": (
            {"mode": "likelihood", "options": list(settings.options), "batch_size": settings.batch_size}
            if settings.options is not None
            else {"mode": "generate", "do_sample": False, "max_new_tokens": settings.max_new_tokens,
                  "batch_size": settings.batch_size}
        ),
        "prompt_example": next((answered[qid]["prompt"] for qid in order if qid in answered), None),
        "baseline_prompt": BENCHMARKS[settings.benchmark].prompt if settings.benchmark in BENCHMARKS else None,
        "commit": _git_commit(),
    }
    not_asked = (f"--limit {settings.limit}: {num_not_asked} more questions in {settings.questions} "
                 "not asked") if num_not_asked else ""
    if settings.annotations is not None:
        report = score_run(settings.benchmark, out / ANSWERS_FILE, settings.annotations,
                           questions if num_not_asked else None)
        results["scores"] = report.to_json()
        results["scores_cover"] = (
            f"the {len(order)} questions asked ({not_asked}, their annotations left out of the scores; "
            "asked ones not answered count as missing)" if num_not_asked
            else "every question in the annotation files (those not answered count as missing)"
        )
        results["annotations"] = {k: str(Path(v).resolve()) for k, v in vars(settings.annotations).items()
                                  if v is not None}
        logger.info("%s scores (%s):\n%s", settings.benchmark, results["scores_cover"], format_report(report))
    with atomic_file(out / RESULTS_FILE) as f:
        json.dump(results, f, indent=1)
    logger.info(
        f"{settings.benchmark}: {results['num_answered']} answered, {results['num_skipped']} skipped "
        f"of {results['num_questions']} questions" + (f" ({not_asked})" if not_asked else "")
        + f"; answers in {out / ANSWERS_FILE}"
    )
    return results
