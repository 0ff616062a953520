"""Answer a benchmark with a MambaVLM: ``accelerate launch eval/run.py --model DIR --benchmark NAME --data
QUESTIONS.jsonl [--image-folder DIR] [--output-dir DIR] [--batch-size N] [--limit N] [--max-new-tokens N]
[--annotations FILE [--annotation-questions FILE] [--split-file FILE]]``.

The questions are a LLaVA-style JSONL (``question_id``, ``image``, ``text``; LLaVA-1.5's evaluation
files). Answers go to ``OUTPUT_DIR/answers.jsonl`` as batches finish (a killed run started again goes on
from them; several processes split the questions), then ``results.json`` and a summary. With
``--annotations`` (the benchmark's published files, read first so that a wrong one fails at once) the
answers are scored as ``eval/score.py`` scores them, into results.json's ``scores``.

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

from mambavlm.eval.benchmarks import BENCHMARKS, AnnotationFiles
from mambavlm.eval.model_dir import resolve_model_dir
from mambavlm.eval.runner import (
    RunSettings,
    SettingsMismatchError,
    check_benchmark_name,
    run_benchmark,
)


def _options(args: argparse.Namespace) -> tuple[str, ...] | None:
    """The closed set of --mode likelihood: --options, else the benchmark's own; ValueError if neither."""
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


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path,
                        help="a MambaVLM directory (save_pretrained), or a run's output_dir (its final/ after "
                             "fine-tuning, its student/ after distillation)")
    parser.add_argument("--benchmark", required=True,
                        help=f"its name, recorded in results.json: one of {', '.join(BENCHMARKS)} "
                             "(or your own with --custom-benchmark)")
    parser.add_argument("--custom-benchmark", action="store_true",
                        help="--benchmark is deliberately a name of your own, not a known benchmark: "
                             "answer the questions without a baseline prompt or scoring")
    parser.add_argument("--data", required=True, type=Path, help="question JSONL (LLaVA-1.5 evaluation format)")
    parser.add_argument("--image-folder", type=Path, help="image paths are relative to it (default: the JSONL's folder)")
    parser.add_argument("--output-dir", type=Path, help="default: outputs/eval/BENCHMARK")
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
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for name, path in (("--model", args.model), ("--data", args.data)):
        if not path.exists():
            parser.error(f"{name} {path} does not exist")
    try:
        check_benchmark_name(args.benchmark, args.custom_benchmark)  # before the options, which it names
        settings = RunSettings(
            model=resolve_model_dir(args.model),
            benchmark=args.benchmark,
            custom_benchmark=args.custom_benchmark,
            questions=args.data,
            output_dir=args.output_dir or Path("outputs/eval") / args.benchmark,
            image_root=args.image_folder,
            batch_size=args.batch_size,
            limit=args.limit,
            max_new_tokens=args.max_new_tokens,
            annotations=None if args.annotations is None
            else AnnotationFiles(args.annotations, args.annotation_questions, args.split_file),
            options=_options(args),
        )
        if settings.annotations is not None:
            BENCHMARKS[settings.benchmark].read(settings.annotations)  # a wrong file fails before any answer
    except (FileNotFoundError, ValueError, ImportError) as err:
        parser.error(str(err))
    try:
        results = run_benchmark(settings)
    except SettingsMismatchError as err:
        parser.error(str(err))
    if results:
        json.dump(results, sys.stdout, indent=1)
        print()
    return results


if __name__ == "__main__":
    main()
