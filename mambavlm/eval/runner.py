"""Answer a benchmark's questions with a MambaVLM: batched, sharded over processes, resumable.

``run_benchmark`` is what ``accelerate launch eval/run.py`` runs. Each process answers every n-th
question (greedy, left-padded batches) and appends its answers to ``answers.RANK-of-N.jsonl`` as
batches finish, flushed to disk; a run started again reads every shard file already written (whatever
the number of processes was) and answers only what is missing. When all processes are done the main
process writes ``answers.jsonl`` (LLaVA's format: ``question_id``, ``prompt``, ``text``, ``model_id``, in
question order), ``skipped.jsonl`` (``question_id``, ``reason``) and ``results.json``, each atomically,
and prints a summary. The settings that decide the answers (``answer_settings``: the model, the benchmark,
the question file and its content, the image folder, the decoding) are written to ``run_settings.json``
when a run starts; a run started again in a folder whose answers were made with other settings stops
with ``SettingsMismatchError`` naming each difference, instead of passing the old answers off as its own
(the batch size, ``limit`` and the number of processes may change between runs: they do not change an
answer). A question that cannot be answered (an unreadable image, a prompt that is not a
string, placeholders that do not match the image, a prompt too long for the model) is reported by its
id and counted; every other question is answered.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from mambavlm.atomic import atomic_file
from mambavlm.eval.benchmarks import BENCHMARKS, AnnotationFiles, score_answers
from mambavlm.eval.questions import EvalQuestion, read_questions
from mambavlm.eval.scorers.closed_set import argmax_option
from mambavlm.eval.scorers.report import format_report
from mambavlm.model import MambaVLM
from mambavlm.processes import check_process_group
from mambavlm.training.evaluation import iter_answers

__all__ = [
    "ANSWERS_FILE",
    "RESULTS_FILE",
    "SETTINGS_FILE",
    "SKIPPED_FILE",
    "RunSettings",
    "SettingsMismatchError",
    "answer_settings",
    "check_benchmark_name",
    "file_sha256",
    "run_benchmark",
    "settings_differences",
]

logger = logging.getLogger(__name__)

ANSWERS_FILE = "answers.jsonl"
SKIPPED_FILE = "skipped.jsonl"
RESULTS_FILE = "results.json"
SETTINGS_FILE = "run_settings.json"


class SettingsMismatchError(ValueError):
    """An output folder holds answers made with other settings than this run's."""


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
    answered (a wrong file fails at once) and the answers scored into results.json. options: answer
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
    """Raise SettingsMismatchError if ``out`` holds answers (or skips) made with other settings than
    ``current``; returns whether ``run_settings.json`` should be (re)written. A folder without answers
    takes the new settings whatever it recorded; one with answers but no settings file (written before
    settings were recorded) is only checked for the model's name in its rows, with a warning."""
    earlier = [row for kind in ("answers", "skipped") for p in _shard_files(out, kind) for row in _read_lines(p)]
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
        recorded = json.loads(recorded_path.read_text())
    except json.JSONDecodeError as err:
        raise SettingsMismatchError(
            f"{recorded_path} is not valid JSON ({err.msg}): cannot tell what settings the answers in {out} "
            f"were made with; pass another --output-dir, or delete {out} to answer again"
        ) from None
    differences = [f"  {difference}" for difference in settings_differences(recorded, current)]
    if differences:
        raise SettingsMismatchError(
            f"{out} holds {len(earlier)} questions answered or skipped with other settings ({recorded_path}):\n"
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


def run_benchmark(settings: RunSettings, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Answer ``settings.questions`` (sharded, resumable) and write the outputs; returns results.json's
    content on the main process (``{}`` elsewhere). Raises FileNotFoundError for a missing model or
    question file, SettingsMismatchError where ``output_dir`` holds answers made with other settings."""
    acc = accelerator or Accelerator()
    check_process_group(acc)
    out = settings.output_dir
    if settings.annotations is not None:
        BENCHMARKS[settings.benchmark].read(settings.annotations)  # fail now, not after the answers
    questions, problems = read_questions(settings.questions, settings.image_root)
    if settings.limit is not None:
        questions = questions[: settings.limit]
    current = answer_settings(settings)
    model_id = settings.model.resolve().name
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
    done = {row["question_id"] for kind in ("answers", "skipped") for p in _shard_files(out, kind) for row in _read_lines(p)}
    mine = [q for q in questions[rank::world] if q.question_id not in done]
    model = MambaVLM.from_pretrained(settings.model).to(acc.device).eval()
    logger.info(
        f"process {rank}/{world}: {len(mine)} of {len(questions[rank::world])} questions to answer "
        f"({len(done)} answered or skipped before)"
    )
    prompts = {q.question_id: q.text for q in mine}
    items = [(q.question_id, q.image, q.text) for q in mine]
    with answers_path.open("a") as answers_file, skipped_path.open("a") as skipped_file:
        for answers, skipped in iter_answers(
            model, items, settings.batch_size, settings.max_new_tokens, show_progress=acc.is_local_main_process,
            options=settings.options,
        ):
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
    return _finish(settings, questions, problems, model_id)


def _finish(
    settings: RunSettings, questions: list[EvalQuestion], problems: list[tuple[str, str]], model_id: str
) -> dict[str, Any]:
    """Merge the shards in question order and write answers.jsonl, skipped.jsonl and results.json."""
    out = settings.output_dir
    answered = {row["question_id"]: row for p in _shard_files(out, "answers") for row in _read_lines(p)}
    skipped = {row["question_id"]: row for p in _shard_files(out, "skipped") for row in _read_lines(p)}
    order = [q.question_id for q in questions]
    source_ids = {q.question_id: q.source_id for q in questions}  # the ids as the question file gives them
    with atomic_file(out / ANSWERS_FILE) as f:
        for question_id in order:
            if question_id in answered:
                f.write(json.dumps({**answered[question_id], "question_id": source_ids[question_id]}) + "\n")
    skipped_rows = [{"question_id": qid, "reason": reason} for qid, reason in problems]
    skipped_rows += [{**skipped[qid], "question_id": source_ids[qid]} for qid in order
                     if qid in skipped and qid not in answered]
    with atomic_file(out / SKIPPED_FILE) as f:
        for row in skipped_rows:
            f.write(json.dumps(row) + "\n")
    missing = [qid for qid in order if qid not in answered and qid not in skipped]
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
    if settings.annotations is not None:
        report = score_answers(settings.benchmark, out / ANSWERS_FILE, settings.annotations)
        results["scores"] = report.to_json()
        results["annotations"] = {k: str(v) for k, v in vars(settings.annotations).items() if v is not None}
        logger.info("%s scores:\n%s", settings.benchmark, format_report(report))
    with atomic_file(out / RESULTS_FILE) as f:
        json.dump(results, f, indent=1)
    logger.info(
        f"{settings.benchmark}: {results['num_answered']} answered, {results['num_skipped']} skipped "
        f"of {results['num_questions']} questions; answers in {out / ANSWERS_FILE}"
    )
    return results
