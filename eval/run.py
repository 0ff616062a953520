"""Answer a benchmark with a MambaVLM: ``accelerate launch eval/run.py --model DIR --benchmark NAME --data
QUESTIONS.jsonl [--image-folder DIR] [--output-dir DIR] [--batch-size N] [--limit N] [--max-new-tokens N]
[--annotations FILE [--annotation-questions FILE] [--split-file FILE]]``.

The questions are a LLaVA-style JSONL (``question_id``, ``image``, ``text``; LLaVA-1.5's evaluation
files). Answers go to ``OUTPUT_DIR/answers.jsonl`` as batches finish (a killed run started again goes on
from them; several processes split the questions), then ``results.json`` and a summary. With
``--annotations`` (the benchmark's published files, read first so that a wrong one fails at once) the
answers are scored as ``eval/score.py`` scores them, into results.json's ``scores``. ``--data`` is
JSONL: a JSON array (a LLaVA training JSON) is refused before anything is answered.

Running again in the same --output-dir goes on: answered questions are kept, the missing ones answered,
and those skipped before (an image not found, say) retried, the log saying how many. Run again without
--annotations, a folder whose results.json was scored is scored again against the annotation files
results.json records (the log names them; --annotations picks others; a recorded file that cannot be
read now is an error), so the scores are not dropped. With --limit N only the first N questions are
asked and only their annotations scored (results.json: ``limit``, ``num_not_asked``, ``scores_cover``;
MME's image pairs and MMBench's circular passes are kept whole, a member not asked counting as
missing). With --annotations, a question file holding questions the annotation files do not (another
benchmark's or split's, or an id repeated) is refused before any answer. --mode likelihood with
--annotations needs a benchmark with a likelihood scorer (tallyqa, vsr): any other is refused before
answering. A run that answers no question at all (a wrong
--image-folder, say) exits with status 1 naming the first reasons, and writes no results.json.

NAME is one of the known benchmarks (an unknown name is an error), or, with ``--custom-benchmark``, a
name of your own for a question file answered without scoring. The settings that decide the answers
(model, benchmark, question file, image folder, --max-new-tokens, --mode/--options) are recorded in
``OUTPUT_DIR/run_settings.json``; a run into a folder whose answers were made with other settings stops
and names the differences: pass another --output-dir, or delete the old one.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mambavlm.eval.benchmarks import AnnotationFiles

BENCHMARK_NAMES = ("vqav2", "textvqa", "vizwiz", "gqa", "pope", "scienceqa", "mme", "mmbench", "seedbench", "mmmu",
                   "tallyqa", "vsr")
"""The known benchmarks (``mambavlm.eval.benchmarks.BENCHMARKS``), named literally so that --help and a usage
error answer before mambavlm is imported: tests/test_entry_points.py checks them against ``BENCHMARKS``."""

logger = logging.getLogger("run")


def build_parser() -> argparse.ArgumentParser:
    """The command line, built without importing mambavlm (it loads torch, transformers and the model:
    seconds), so that --help and a usage error answer at once."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path,
                        help="a MambaVLM directory (save_pretrained), or a run's output_dir (its final/ after "
                             "fine-tuning, its student/ after distillation)")
    parser.add_argument("--benchmark", required=True,
                        help=f"its name, recorded in results.json: one of {', '.join(BENCHMARK_NAMES)} "
                             "(or your own with --custom-benchmark)")
    parser.add_argument("--custom-benchmark", action="store_true",
                        help="--benchmark is deliberately a name of your own, not a known benchmark: "
                             "answer the questions without a baseline prompt or scoring")
    parser.add_argument("--data", required=True, type=Path, help="question JSONL (LLaVA-1.5 evaluation format)")
    parser.add_argument("--image-folder", type=Path, help="image paths are relative to it (default: the JSONL's folder)")
    parser.add_argument("--output-dir", type=Path,
                        help="default: outputs/eval/MODEL/BENCHMARK, MODEL the run's directory name for a run's "
                             "final/ or student/ (as eval/evaluate.py names its own)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, help="answer only the first N questions")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--annotations", type=Path,
                        help="the benchmark's published file to score against (as eval/score.py takes it)")
    parser.add_argument("--annotation-questions", type=Path, help="eval/score.py's --questions")
    parser.add_argument("--split-file", type=Path, help="eval/score.py's --split-file (ScienceQA)")
    parser.add_argument("--mode", choices=("generate", "likelihood"), default="generate",
                        help="likelihood: pick the option with the highest probability (Prismatic's mode; "
                             "TallyQA and VSR have their options built in, others take --options)")
    parser.add_argument("--options", help="comma-separated closed set for --mode likelihood")
    return parser


def _options(args: argparse.Namespace) -> tuple[str, ...] | None:
    """The closed set of --mode likelihood: --options, else the benchmark's own; ValueError if neither."""
    from mambavlm.eval.benchmarks import BENCHMARKS

    if args.mode == "generate":
        if args.options:
            raise ValueError("--options needs --mode likelihood")
        return None
    if args.options:
        return tuple(option.strip() for option in args.options.split(","))
    spec = BENCHMARKS.get(args.benchmark)
    if spec is None or not spec.likelihood_options:
        raise ValueError(f"--mode likelihood needs --options for benchmark {args.benchmark!r}")
    return spec.likelihood_options


def _annotations(args: argparse.Namespace, output_dir: Path) -> tuple[AnnotationFiles | None, bool]:
    """The files to score against: --annotations, else (a known benchmark) those that ``output_dir``'s
    results.json was scored against; and whether they are the recorded ones. Raises RecordFileError for a
    results.json that cannot be read, and ValueError for --annotation-questions or --split-file without
    --annotations (passed over, they would leave the run unscored, or scored against other files)."""
    from mambavlm.eval.benchmarks import AnnotationFiles
    from mambavlm.eval.runner import recorded_annotations

    if args.annotations is not None:
        return AnnotationFiles(args.annotations, args.annotation_questions, args.split_file), False
    for name, given in (("--annotation-questions", args.annotation_questions), ("--split-file", args.split_file)):
        if given is not None:
            raise ValueError(f"{name} goes with --annotations (the benchmark's published file to score against): "
                             "give both")
    if args.custom_benchmark:
        return None, False
    recorded = recorded_annotations(output_dir, args.benchmark)
    return recorded, recorded is not None


def main(argv: Sequence[str] | None = None) -> dict:
    """Run eval/run.py; returns results.json's content (``{}`` on processes other than the main one).
    Exits with status 2 (usage: a bad argument or file, settings that differ from the output folder's
    answers) before answering anything, with status 1 where no question could be answered, and with
    status 130 and one line saying where the answers so far are kept on Ctrl-C (KeyboardInterrupt).
    --help, and a usage error up to the output folder's checks, answer before mambavlm is imported."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for name, path in (("--model", args.model), ("--data", args.data)):
        if not path.exists():
            parser.error(f"{name} {path} does not exist")
    if not args.data.is_file():
        parser.error(f"--data {args.data} is a folder, not a question JSONL")
    if args.output_dir is not None and args.output_dir.exists() and not args.output_dir.is_dir():
        parser.error(f"--output-dir {args.output_dir} is a file, not a folder")
    # imported after the checks above: importing mambavlm loads torch, transformers and the model (it
    # registers with transformers' Auto classes), seconds that --help and a usage error need not wait for
    from mambavlm.eval.benchmarks import BENCHMARKS
    from mambavlm.eval.model_dir import model_label, resolve_model_dir
    from mambavlm.eval.questions import QuestionFileError
    from mambavlm.eval.runner import (
        RESULTS_FILE,
        NothingAnsweredError,
        RecordFileError,
        RunSettings,
        SettingsMismatchError,
        UnannotatedQuestionsError,
        check_benchmark_name,
        run_benchmark,
    )

    try:
        check_benchmark_name(args.benchmark, args.custom_benchmark)  # before the options, which it names
        model_dir = resolve_model_dir(args.model)
        # by default one folder per model and benchmark: a second model's answers do not meet the first's
        output_dir = args.output_dir or Path("outputs/eval") / model_label(model_dir) / args.benchmark
        if output_dir.exists() and not output_dir.is_dir():
            parser.error(f"{output_dir} is a file, not a folder")
        annotations, recorded = _annotations(args, output_dir)
        settings = RunSettings(
            model=model_dir,
            benchmark=args.benchmark,
            custom_benchmark=args.custom_benchmark,
            questions=args.data,
            output_dir=output_dir,
            image_root=args.image_folder,
            batch_size=args.batch_size,
            limit=args.limit,
            max_new_tokens=args.max_new_tokens,
            annotations=annotations,
            options=_options(args),
        )
    except (FileNotFoundError, ValueError, ImportError) as err:  # RecordFileError is a ValueError
        parser.error(str(err))
    if settings.annotations is not None:
        try:
            BENCHMARKS[settings.benchmark].read(settings.annotations)  # a wrong file fails before any answer
        except (FileNotFoundError, ValueError, ImportError) as err:
            if recorded:
                parser.error(f"{err} (the earlier run was scored against it, as {output_dir / RESULTS_FILE} records; "
                             f"pass --annotations to score against other files, or delete {output_dir / RESULTS_FILE} "
                             "to answer unscored)")
            parser.error(str(err))
        if recorded:
            files = ", ".join(str(path) for path in vars(settings.annotations).values() if path is not None)
            logger.info(f"no --annotations: scoring against the files {output_dir / RESULTS_FILE} records "
                        f"({files}), as the earlier run was scored")
    try:
        results = run_benchmark(settings)
    except (SettingsMismatchError, QuestionFileError, RecordFileError, UnannotatedQuestionsError) as err:
        parser.error(str(err))
    except NothingAnsweredError as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: interrupted: the answers written so far are kept in {output_dir}; "
                         "the same command run again goes on from them\n")
    if results:
        json.dump(results, sys.stdout, indent=1)
        print()
    return results


if __name__ == "__main__":
    main()
