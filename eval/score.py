"""Score a benchmark's answers against its published files, as the benchmark's reference scorer does.

    python eval/score.py BENCHMARK --answers ANSWERS.jsonl --annotations FILE [--questions FILE] [--split-file FILE]

ANSWERS.jsonl: LLaVA's answer format (``question_id``, ``text``, ``prompt``), as ``eval/run.py`` writes
it (or LLaVA's ``model_vqa_loader`` does). Prints one JSON object: ``overall`` (percent, or points for
MME, rounded as the official evaluator prints it), ``breakdowns`` and ``counts``. Which files each
benchmark takes: ``python eval/score.py --help``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from mambavlm.eval.benchmarks import BENCHMARKS, AnnotationFiles, score_answers


def main(argv: Sequence[str] | None = None) -> dict:
    files_help = "\n".join(f"  {name:<10} --annotations {spec.annotations}" for name, spec in BENCHMARKS.items())
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=f"the published files each benchmark is scored against:\n{files_help}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS))
    parser.add_argument("--answers", required=True, type=Path, help="answers JSONL (question_id, text, prompt)")
    parser.add_argument("--annotations", required=True, type=Path, help="the benchmark's published file or folder")
    parser.add_argument("--questions", type=Path, help="VQAv2's questions file (cross-checked); MMMU's dataset folder")
    parser.add_argument("--split-file", type=Path, help="ScienceQA's pid_splits.json")
    args = parser.parse_args(argv)
    try:
        report = score_answers(args.benchmark, args.answers, AnnotationFiles(args.annotations, args.questions, args.split_file))
    except (FileNotFoundError, ValueError, ImportError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    result = report.to_json()
    json.dump(result, sys.stdout, indent=1)
    print()
    return result


if __name__ == "__main__":
    main()
