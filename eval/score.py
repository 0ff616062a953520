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

ANNOTATIONS = {
    "vqav2": "v2_mscoco_val2014_annotations.json [--questions v2_OpenEnded_mscoco_val2014_questions.json]",
    "textvqa": "TextVQA_0.5.1_val.json",
    "vizwiz": "VizWiz val.json (ids: the position in the file)",
    "gqa": "testdev_balanced_questions.json",
    "pope": "coco_pope_{random,popular,adversarial}.json, or their folder",
    "scienceqa": "problems.json --split-file pid_splits.json",
    "mme": "the MME_Benchmark_release_version folder",
    "mmbench": "mmbench_dev_20230712.tsv",
    "seedbench": "SEED-Bench.json",
    "mmmu": "answer_dict_val.json --questions MMMU_DATASET_FOLDER (the Hugging Face MMMU/MMMU copy)",
    "tallyqa": "TallyQA test.json",
    "vsr": "VSR test.jsonl (ids: the line's position)",
}
"""Each known benchmark and the published files it is scored against (``BENCHMARKS[name].annotations`` of
``mambavlm.eval.benchmarks``), written out so that --help and a usage error answer before mambavlm is
imported: tests/test_entry_points.py checks them against ``BENCHMARKS``."""


def build_parser() -> argparse.ArgumentParser:
    """The command line, built without importing mambavlm (it loads torch, transformers and the model:
    seconds), so that --help and a usage error (an unknown benchmark, a missing option) answer at once."""
    files_help = "\n".join(f"  {name:<10} --annotations {files}" for name, files in ANNOTATIONS.items())
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=f"the published files each benchmark is scored against:\n{files_help}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("benchmark", choices=sorted(ANNOTATIONS))
    parser.add_argument("--answers", required=True, type=Path, help="answers JSONL (question_id, text, prompt)")
    parser.add_argument("--annotations", required=True, type=Path, help="the benchmark's published file or folder")
    parser.add_argument("--questions", type=Path, help="VQAv2's questions file (cross-checked); MMMU's dataset folder")
    parser.add_argument("--split-file", type=Path, help="ScienceQA's pid_splits.json")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Score the answers and print the report as JSON; returns it. Exits with status 2 and one ``error:``
    line where the scorer refuses the files (FileNotFoundError, ValueError or ImportError: a file missing,
    unreadable, or not the benchmark's; answers to questions the annotations do not hold)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # imported after parsing: importing mambavlm loads torch, transformers and the model (it registers
    # with transformers' Auto classes), seconds that --help and a usage error need not wait for
    from mambavlm.eval.benchmarks import AnnotationFiles, score_answers

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
