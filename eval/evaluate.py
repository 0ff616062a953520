"""Score a trained MambaVLM by greedy exact match on a LLaVA-format JSON.

    python eval/evaluate.py --model OUTPUT_DIR --data VAL.json [--image-root DIR]
                            [--output-dir DIR | --out ANSWERS.jsonl] [--batch-size N]

``--model`` is a saved model directory, a Hub id, or a run's output_dir (fine-tuning's model is in
its ``final/``, distillation's in its ``student/``). Each record's first question is answered
greedily; the answers are written as JSONL rows ``{id, question, answer, reference, correct}`` to
``OUTPUT_DIR/answers.jsonl`` (default ``outputs/eval/<model>/<data file's stem>``, the model named by its
run's directory for a run's ``final/`` or ``student/``)
and the exact-match accuracy is printed. A record that cannot be answered (no human turn then
assistant turn, a missing or unreadable image, a prompt too long for the model) is named in a warning,
skipped, and listed as ``{id, reason}`` in ``skipped.jsonl`` beside the answers (``--out FILE``:
``FILE``'s stem + ``.skipped.jsonl``). When no record at all is answered (every one skipped: a wrong
``--image-root``, say) the script exits with status 1, naming the count and the first reasons, and writes
nothing: earlier answers are kept. Where no record's image exists it says so once, before loading the model
(and without a warning for each record).

The settings that decide the answers (model, data file and its content, image root, ``--blind``,
``--max-new-tokens``) are recorded beside the answers in ``run_settings.json`` (``--out FILE``: ``FILE``'s
stem + ``.settings.json``), as ``eval/run.py`` records its own. Evaluating again with the same settings
answers again and replaces the answers; with other settings, where answers already are, it stops and
names the differences (as ``eval/run.py`` does): pass another ``--output-dir`` (``--out``), or delete the
old answers. The batch size and the device are not recorded: they do not change an answer.

The answers, the skipped records and the settings are written as one set, each file whole or not at
all, the settings file last: it marks the set complete. A run killed while writing them leaves the
earlier set as it was, or no settings file beside the answers and skipped records (then perhaps one of
them new and the other earlier): the next run names such answers in a warning as unfinished, answers
again and replaces them.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ANSWERS_FILE = "answers.jsonl"
SKIPPED_FILE = "skipped.jsonl"
DEFAULT_OUTPUT_ROOT = Path("outputs/eval")


def build_parser() -> argparse.ArgumentParser:
    """The command line, built before the imports below so that --help and a usage error answer at once
    (importing mambavlm loads torch, transformers and the model: seconds). It names the run directories
    and the settings file literally: tests/test_entry_points.py checks them against ``FINAL_MODEL_DIR``,
    ``STUDENT_DIR`` and ``SETTINGS_FILE``."""
    parser = argparse.ArgumentParser(description="Greedy exact-match evaluation of a trained MambaVLM.")
    parser.add_argument("--model", required=True,
                        help="save_pretrained directory, Hub id, or a run's output_dir "
                             "(its final/ after fine-tuning, its student/ after distillation)")
    parser.add_argument("--data", type=Path, required=True, help="LLaVA-format JSON")
    parser.add_argument("--image-root", type=Path, default=None, help="default: the JSON's directory")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help=f"{ANSWERS_FILE}, {SKIPPED_FILE} and run_settings.json go there (default: "
                             f"{DEFAULT_OUTPUT_ROOT}/<the model's run or directory name>/<the data file's stem>)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSONL of answers instead (skipped records: its stem + .skipped.jsonl; "
                             "settings: its stem + .settings.json)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--blind", action="store_true", help="replace every image by a blank grey one")
    parser.add_argument("--device", default=None)  # None: CUDA where available, else the CPU
    return parser


if __name__ == "__main__":  # --help and usage errors exit here, before the heavy imports
    build_parser().parse_args()

import torch  # noqa: E402

from mambavlm.atomic import atomic_file  # noqa: E402
from mambavlm.eval.model_dir import model_label, resolve_model_dir  # noqa: E402
from mambavlm.eval.runner import (  # noqa: E402
    SETTINGS_FILE,
    RecordFileError,
    SettingsMismatchError,
    file_sha256,
    first_skips,
    image_not_found,
    no_image_opens,
    read_json_object,
    settings_differences,
)
from mambavlm.model import MambaVLM  # noqa: E402
from mambavlm.training.evaluation import VQAItem, generate_answers, read_vqa_items  # noqa: E402

logger = logging.getLogger("evaluate")


def load_items(data: Path, image_root: Path | None) -> tuple[list[VQAItem], list[tuple[str, str]]]:
    """The records' questions, and ``(id, reason)`` for each record without a human turn then an
    assistant turn (each named in a warning; training skips them too)."""
    return read_vqa_items(data, image_root if image_root is not None else data.parent)


def output_paths(args: argparse.Namespace, model_dir: Path) -> tuple[Path, Path, Path]:
    """(answers file, skipped file, settings file) of the command line; by default under
    ``outputs/eval/<model>/<data file's stem>``, so that two models' answers to one file do not
    overwrite each other (a fine-tuning and a distillation run both call theirs val.json)."""
    if args.out is not None:
        return (args.out, args.out.with_name(f"{args.out.stem}.skipped.jsonl"),
                args.out.with_name(f"{args.out.stem}.settings.json"))
    out_dir = args.output_dir
    if out_dir is None:
        out_dir = DEFAULT_OUTPUT_ROOT / model_label(model_dir) / args.data.stem
    return out_dir / ANSWERS_FILE, out_dir / SKIPPED_FILE, out_dir / SETTINGS_FILE


def answer_settings(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """What decides the answers, as the settings file records it: the model (its directory resolved, or
    the Hub id), the data file (path resolved, and the SHA-256 of its content: the questions and
    references are in it), the image root (resolved), ``blind`` and ``max_new_tokens`` (it also decides
    which prompts are too long)."""
    return {
        "model": str(model_dir.resolve()) if model_dir.exists() else str(model_dir),
        "data": str(args.data.resolve()),
        "data_sha256": file_sha256(args.data),
        "image_root": str((args.image_root if args.image_root is not None else args.data.parent).resolve()),
        "blind": args.blind,
        "max_new_tokens": args.max_new_tokens,
    }


def check_earlier_settings(args: argparse.Namespace, answers_path: Path, settings_path: Path,
                           current: dict[str, Any]) -> None:
    """SettingsMismatchError (one line) if ``answers_path`` exists and was made with other settings than
    ``current`` (or its settings file cannot be read), naming each difference and how to go on. Answers
    without a settings file (a run killed before it finished writing them, or one from before settings
    were recorded: see ``write_outputs``) are replaced, with a warning."""
    if not answers_path.is_file():
        return
    if args.out is not None:
        where, proceed = answers_path, f"pass another --out, or delete {answers_path}"
    else:
        where, proceed = answers_path.parent, f"pass another --output-dir, or delete {answers_path.parent}"
    if not settings_path.is_file():
        logger.warning("%s holds answers but no %s (an evaluation killed before it finished writing them, or "
                       "one from before settings were recorded): answering again and replacing them",
                       where, settings_path.name)
        return
    try:
        recorded = read_json_object(settings_path)
    except RecordFileError as err:
        raise SettingsMismatchError(
            f"{err}: cannot tell what settings the answers in {where} were made with; {proceed} to evaluate again"
        ) from None
    differences = settings_differences(recorded, current)
    if differences:
        raise SettingsMismatchError(
            f"{where} holds answers made with other settings ({settings_path}): {'; '.join(differences)}; "
            f"{proceed} to evaluate again with these settings"
        )


def nothing_answered(data: Path, skipped: list[tuple[str, str]], answers_path: Path, warned: bool = True) -> str:
    """The error of a run that answered no record: how many were skipped and the first reasons (``warned``:
    each skip was named in a warning too)."""
    kept = f"nothing written ({answers_path} left as it was)"
    if not skipped:
        return f"{data} holds no records: nothing to evaluate; {kept}"
    hint = " (is --image-root right? default: the data file's directory)" if image_not_found(skipped) else ""
    named = "; each named in a warning" if warned else ""
    return f"no record answered: all {len(skipped)} skipped ({first_skips(skipped)}{named}){hint}; {kept}"


def write_outputs(rows: list[dict[str, Any]], skipped: list[tuple[str, str]], settings: dict[str, Any],
                  paths: tuple[Path, Path, Path]) -> None:
    """Write the answers, the skipped records and the settings to ``paths`` (``output_paths``' answers,
    skipped and settings files) as one set, each file atomically (``atomic_file``), the settings file
    last: it marks the set complete. Both data files are written to temporary files first; then the
    earlier settings file is removed, the two renamed over the earlier files, and the settings written.
    A run killed on the way leaves the earlier set whole (killed before the removal), or answers and
    skipped records without a settings file, perhaps one new and one earlier (``check_earlier_settings``
    then warns and the run answers again). Raises OSError where a file cannot be written or renamed
    (what is left is as after a kill)."""
    answers_path, skipped_path, settings_path = paths
    with atomic_file(answers_path) as answers_file, atomic_file(skipped_path) as skipped_file:
        for row in rows:
            answers_file.write(json.dumps(row) + "\n")
        for record_id, reason in skipped:
            skipped_file.write(json.dumps({"id": record_id, "reason": reason}) + "\n")
        # the earlier set is about to be replaced: no settings file may vouch for a mixed one
        settings_path.unlink(missing_ok=True)
    with atomic_file(settings_path) as f:  # last: the set is complete
        json.dump(settings, f, indent=1)


def main(argv: Sequence[str] | None = None) -> float:
    """Run the evaluation; returns the accuracy. Exits with status 2 (usage) where the output location
    holds answers made with other settings, and with status 1 where no record could be answered."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.out is not None and args.output_dir is not None:
        parser.error("give --out or --output-dir, not both")
    if not args.data.is_file():
        parser.error(f"--data {args.data} is a folder, not a LLaVA-format JSON" if args.data.is_dir()
                     else f"--data {args.data} does not exist")
    if args.output_dir is not None and args.output_dir.exists() and not args.output_dir.is_dir():
        parser.error(f"--output-dir {args.output_dir} is a file, not a folder")
    if args.out is not None and args.out.is_dir():
        parser.error(f"--out {args.out} is a folder, not a file")
    try:
        model_dir = resolve_model_dir(args.model)
    except FileNotFoundError as err:
        parser.error(str(err))
    answers_path, skipped_path, settings_path = output_paths(args, model_dir)
    settings = answer_settings(args, model_dir)
    try:
        check_earlier_settings(args, answers_path, settings_path, settings)  # before the model is loaded
    except SettingsMismatchError as err:
        parser.error(str(err))
    try:
        items, skipped = load_items(args.data, args.image_root)
    except ValueError as err:  # not a JSON list of LLaVA records
        parser.error(f"--data: {err}")
    missing = no_image_opens([(item.id, item.image) for item in items])
    if missing is not None:  # a wrong --image-root: said once, before the model loads, not a warning a record
        skipped += missing
        items = [item for item in items if item.image is None]
        if not items:
            parser.exit(1, f"{parser.prog}: error: "
                           f"{nothing_answered(args.data, skipped, answers_path, warned=False)}\n")
        logger.warning(f"none of the {len(missing)} records' images can be opened ({first_skips(missing)}): "
                       f"is --image-root right? (default: the data file's directory); they are skipped, the "
                       f"text-only ones ({len(items)}) answered")
    rows: list[dict[str, Any]] = []
    if items:
        try:
            model = MambaVLM.from_pretrained(model_dir)
        except FileNotFoundError as err:
            parser.error(str(err))
        model = model.to(args.device).eval()
        rows, not_answered = generate_answers(model, items, args.batch_size, args.max_new_tokens, blind=args.blind)
        skipped += not_answered  # each named in a warning as it was skipped
    if not rows:  # earlier answers are kept rather than replaced by an empty file
        message = nothing_answered(args.data, skipped, answers_path, warned=missing is None)
        parser.exit(1, f"{parser.prog}: error: {message}\n")
    write_outputs(rows, skipped, settings, (answers_path, skipped_path, settings_path))
    accuracy = sum(r["correct"] for r in rows) / len(rows)
    print(f"exact match: {accuracy:.4f} ({sum(r['correct'] for r in rows)}/{len(rows)}; {len(skipped)} skipped)")
    print(f"answers written to {answers_path}")
    if skipped:
        print(f"skipped records listed in {skipped_path}")
    return accuracy


if __name__ == "__main__":
    main()
