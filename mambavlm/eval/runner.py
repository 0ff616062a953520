"""Answer a benchmark's questions with a MambaVLM: batched, sharded over processes, resumable.

``run_benchmark`` is what ``accelerate launch eval/run.py`` runs. Each process answers every n-th
question (greedy, left-padded batches) and appends its answers to ``answers.RANK-of-N.jsonl`` as
batches finish, flushed to disk; a run started again reads every shard file already written (whatever
the number of processes was) and answers only what is missing. When all processes are done the main
process writes ``answers.jsonl`` (LLaVA's format: ``question_id``, ``prompt``, ``text``, ``model_id``, in
question order), ``skipped.jsonl`` (``question_id``, ``reason``) and ``results.json``, each atomically,
and prints a summary. A question that cannot be answered (an unreadable image, a prompt that is not a
string, placeholders that do not match the image, a prompt too long for the model) is reported by its
id and counted; every other question is answered.
"""

from __future__ import annotations

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
from mambavlm.training.evaluation import iter_answers

__all__ = ["ANSWERS_FILE", "RESULTS_FILE", "SKIPPED_FILE", "RunSettings", "run_benchmark"]

logger = logging.getLogger(__name__)

ANSWERS_FILE = "answers.jsonl"
SKIPPED_FILE = "skipped.jsonl"
RESULTS_FILE = "results.json"


@dataclass(frozen=True)
class RunSettings:
    """One evaluation run. model: a MambaVLM directory. benchmark: its name (recorded). questions: a
    LLaVA-style question JSONL; image_root: what its image paths are relative to (None: its
    directory). output_dir: where answers and results go. batch_size: prompts per generate call;
    limit: answer only the first N questions; max_new_tokens: greedy decoding length. annotations:
    the benchmark's published files (``mambavlm.eval.benchmarks``): read before any question is
    answered (a wrong file fails at once) and the answers scored into results.json. options: answer
    by likelihood over this closed set (``MambaVLM.option_logprobs``, Prismatic's mode) instead of
    generating; each answer row then also holds ``option_logprobs`` and ``text`` is the argmax."""

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

    def __post_init__(self) -> None:
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
    question file."""
    acc = accelerator or Accelerator()
    out = settings.output_dir
    if settings.annotations is not None:
        BENCHMARKS[settings.benchmark].read(settings.annotations)  # fail now, not after the answers
    questions, problems = read_questions(settings.questions, settings.image_root)
    if settings.limit is not None:
        questions = questions[: settings.limit]
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
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
    model_id = settings.model.resolve().name
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
    with atomic_file(out / ANSWERS_FILE) as f:
        for question_id in order:
            if question_id in answered:
                f.write(json.dumps(answered[question_id]) + "\n")
    skipped_rows = [{"question_id": qid, "reason": reason} for qid, reason in problems]
    skipped_rows += [skipped[qid] for qid in order if qid in skipped and qid not in answered]
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
